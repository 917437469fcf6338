// Host tests of csrc/include/madtp/sparse_math.h: the padding and shape rules the cuSPARSELt linear applies
// before any descriptor is built, and the plan-cache key (distinct problems must never share a plan).
#include <cstdint>
#include <cstdio>
#include <unordered_set>

#include "madtp/sparse_math.h"
#include "check.h"

namespace {

using madtp::PlanKey;
using madtp::PlanKeyHash;

// cuSPARSELt's table: structured 32 / 16 / 8 and dense 16 / 8 / 4 elements for 8 / 16 / 32-bit values.
static_assert(madtp::structured_multiple(1) == 32 && madtp::structured_multiple(2) == 16 &&
              madtp::structured_multiple(4) == 8);
static_assert(madtp::dense_multiple(1) == 16 && madtp::dense_multiple(2) == 8 && madtp::dense_multiple(4) == 4);

void test_padded_tokens() {
  // Every M the GPU tests use, and the edges around a multiple.
  const int64_t cases[][2] = {{0, 0}, {1, 8}, {7, 8}, {8, 8}, {9, 16}, {15, 16}, {16, 16}, {64, 64}, {4095, 4096},
                              {4096, 4096}, {4097, 4104}};
  for (const auto& c : cases) CHECK(madtp::padded_tokens(c[0], 2) == c[1]);
  for (int64_t m = 0; m < 1000; ++m) {
    const int64_t p = madtp::padded_tokens(m, 2);
    CHECK(p >= m && p - m < 8 && p % 8 == 0);  // smallest aligned count: never pads a whole extra group
  }
}

void test_weight_shape() {
  CHECK(madtp::valid_weight_shape(768, 3072, 2));
  CHECK(madtp::valid_weight_shape(3072, 768, 2));
  CHECK(madtp::valid_weight_shape(1024, 4096, 2));
  CHECK(madtp::valid_weight_shape(64, 128, 2));
  CHECK(madtp::valid_weight_shape(16, 16, 2));
  CHECK(!madtp::valid_weight_shape(0, 128, 2));
  CHECK(!madtp::valid_weight_shape(64, 0, 2));
  CHECK(!madtp::valid_weight_shape(8, 128, 2));    // dense multiple, not the structured one
  CHECK(!madtp::valid_weight_shape(64, 132, 2));   // 2:4-compatible (multiple of 4) but not of 16
  CHECK(!madtp::valid_weight_shape(-16, 128, 2));
}

void test_plan_key() {
  const PlanKey base{0, 5, 64, 768, 3072, true};
  const PlanKey variants[] = {
      {1, 5, 64, 768, 3072, true},   // device
      {0, 15, 64, 768, 3072, true},  // dtype
      {0, 5, 72, 768, 3072, true},   // M_padded
      {0, 5, 64, 3072, 768, true},   // N and K swapped
      {0, 5, 64, 768, 3072, false},  // bias
  };
  const PlanKeyHash hash;
  CHECK(base == PlanKey(base));
  CHECK(hash(base) == hash(PlanKey(base)));
  for (const PlanKey& v : variants) {
    CHECK(!(v == base));
    CHECK(hash(v) != hash(base));  // not required of a hash, but these are the collisions that would hurt
  }
  // A realistic sweep (4 ViT shapes x 2 dtypes x 512 token counts x bias) lands in distinct buckets of a set.
  std::unordered_set<PlanKey, PlanKeyHash> keys;
  const int64_t shapes[][2] = {{768, 3072}, {3072, 768}, {1024, 4096}, {4096, 1024}};
  size_t inserted = 0;
  for (const auto& s : shapes)
    for (int dtype : {5, 15})
      for (int64_t m = 8; m <= 4096; m += 8)
        for (bool bias : {false, true}) {
          keys.insert(PlanKey{0, dtype, m, s[0], s[1], bias});
          ++inserted;
        }
  CHECK(keys.size() == inserted);
  std::unordered_set<size_t> hashes;
  for (const PlanKey& k : keys) hashes.insert(hash(k));
  CHECK(hashes.size() == keys.size());
}

}  // namespace

int main() {
  test_padded_tokens();
  test_weight_shape();
  test_plan_key();
  return madtp_test::report("test_sparse_math");
}
