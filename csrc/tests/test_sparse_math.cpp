// Host tests of csrc/include/madtp/sparse_math.h: the padding and shape rules the cuSPARSELt linear applies
// before any descriptor is built, and the plan-cache key (distinct problems must never share a plan).
#include <cstdint>
#include <cstdio>
#include <memory>
#include <set>
#include <string>
#include <unordered_set>
#include <vector>

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

void test_token_bucket() {
  // Up to 64 tokens the bucket is the padded count; past it, 8 buckets per octave (ViT-B/16's 197 tokens x 8
  // images = 1576 -> 1664; ViT-L/14-336's 577 -> 640).
  const int64_t cases[][2] = {{0, 0}, {1, 8}, {8, 8}, {9, 16}, {63, 64}, {64, 64}, {65, 72}, {127, 128},
                              {128, 128}, {129, 144}, {577, 640}, {1000, 1024}, {1576, 1664}, {4097, 4608}};
  for (const auto& c : cases) CHECK(madtp::token_bucket(c[0], 2) == c[1]);
  std::set<int64_t> buckets;
  int64_t previous = 0;
  for (int64_t m = 1; m <= 1 << 16; ++m) {
    const int64_t b = madtp::token_bucket(m, 2);
    CHECK(b >= m && b % 8 == 0);                     // cuSPARSELt's dense multiple for 16-bit values
    CHECK(8 * (b - m) <= m || b - m < 8);            // at most 12.5% padded rows (or under one dense group)
    CHECK(b >= previous);                            // monotonic: a bucket is a range of token counts
    CHECK(madtp::token_bucket(b, 2) == b);           // a bucket is its own bucket (padded input re-plans nothing)
    previous = b;
    buckets.insert(b);
  }
  // 8 for M <= 64, then 8 per octave up to 2^16: plans grow with log M, not M.
  CHECK(buckets.size() == 8 + 8 * 10);
}

void test_lru_cache() {
  madtp::LruCache<int, std::unique_ptr<std::string>> cache(3);
  for (int k = 0; k < 3; ++k) cache.insert(k, std::make_unique<std::string>(std::to_string(k)));
  CHECK(cache.size() == 3 && cache.capacity() == 3);
  const std::string* zero = cache.find(0)->get();  // 0, inserted first, is now the most recent: 1 the least
  cache.insert(3, std::make_unique<std::string>("3"));
  CHECK(cache.size() == 3);
  CHECK(cache.find(1) == nullptr);
  CHECK(cache.find(0) != nullptr && cache.find(0)->get() == zero);  // values never move
  std::vector<int> order;
  for (const auto& item : cache) order.push_back(item.first);
  CHECK((order == std::vector<int>{0, 3, 2}));
  cache.insert(4, std::make_unique<std::string>("4"));  // evicts 2, the least recent
  CHECK(cache.find(2) == nullptr && cache.size() == 3);
  // Replacing a key keeps the size and makes it the most recent.
  cache.insert(2, std::make_unique<std::string>("two"));
  CHECK(cache.size() == 3 && *cache.find(2)->get() == "two");
  CHECK(cache.begin()->first == 2);
  // A sweep far past capacity stays bounded.
  madtp::LruCache<PlanKey, int, PlanKeyHash> plans(256);
  for (int64_t m = 8; m <= 1 << 16; m += 8) plans.insert(PlanKey{0, 5, m, 768, 3072, true}, 0);
  CHECK(plans.size() == 256);
  CHECK(plans.find(PlanKey{0, 5, 1 << 16, 768, 3072, true}) != nullptr);
  CHECK(plans.find(PlanKey{0, 5, 8, 768, 3072, true}) == nullptr);
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
  test_token_bucket();
  test_lru_cache();
  test_weight_shape();
  test_plan_key();
  return madtp_test::report("test_sparse_math");
}
