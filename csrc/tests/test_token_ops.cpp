// Host tests of csrc/include/madtp/token_ops.h, the per-token math the CUDA kernels run. Besides the
// single functions, a host re-implementation of prune_tokens / pack / unpack built from them (same call
// order as the kernels) is checked against straightforward float64 references on many random ragged batches.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "madtp/token_ops.h"
#include "check.h"

namespace {

using madtp::ceil_div;
using madtp::chunk_width;
using madtp::column_chunks;
using madtp::keep_token;
using madtp::merge_denominator;
using madtp::merge_weight;
using madtp::pruned_rows;
using madtp::unpack_source_row;

void test_keep_token() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  // keep_first = 0: only the score decides, strictly greater.
  CHECK(!keep_token(0, 0, 0.5f, 0.5f));
  CHECK(keep_token(0, 0, 0.50001f, 0.5f));
  CHECK(!keep_token(0, 0, -1.0f, 0.0f));
  // the first keep_first tokens survive any score, NaN included.
  CHECK(keep_token(0, 1, -inf, 0.0f));
  CHECK(keep_token(2, 3, nan, 0.0f));
  CHECK(!keep_token(3, 3, -inf, 0.0f));
  // NaN scores or thresholds never compare greater: dropped.
  CHECK(!keep_token(5, 1, nan, 0.0f));
  CHECK(!keep_token(5, 1, 1.0f, nan));
  CHECK(keep_token(5, 1, inf, 1e30f));
  CHECK(!keep_token(5, 1, inf, inf));
  // keep_first larger than any length keeps everything; a negative one keeps by score only.
  CHECK(keep_token(1000000, int64_t{1} << 40, -inf, inf));
  CHECK(!keep_token(0, -1, 0.0f, 0.0f));
  // fp32 compare: values that differ only beyond fp16 precision still order correctly.
  CHECK(keep_token(4, 0, 1.0f + 1e-7f, 1.0f));
}

void test_pruned_rows() {
  CHECK(pruned_rows(0, 0, true) == 0);   // empty sample: nothing dropped, no merged row
  CHECK(pruned_rows(0, 0, false) == 0);
  CHECK(pruned_rows(1, 1, true) == 1);   // length 1, kept
  CHECK(pruned_rows(0, 1, true) == 1);   // length 1, dropped -> the merged row alone
  CHECK(pruned_rows(0, 1, false) == 0);
  CHECK(pruned_rows(3, 10, true) == 4);
  CHECK(pruned_rows(3, 10, false) == 3);
  CHECK(pruned_rows(10, 10, true) == 10);
  for (int64_t len = 0; len < 50; ++len)
    for (int64_t kept = 0; kept <= len; ++kept)
      CHECK(pruned_rows(kept, len, true) <= len);  // T' <= T: the upper-bound buffer of T rows suffices
}

void test_merge_rule() {
  CHECK(merge_weight(0.25f, 1.0f) == 0.25f);
  CHECK(merge_weight(0.0f, 1.0f) == 0.0f);
  CHECK(merge_weight(0.25f, 0.0f) == 1.0f);  // zero sum: plain mean
  CHECK(merge_weight(-3.0f, -0.0f) == 1.0f);  // -0 is exactly zero too
  CHECK(merge_denominator(2.5f, 7) == 2.5f);
  CHECK(merge_denominator(0.0f, 7) == 7.0f);
  CHECK(merge_denominator(-0.0f, 1) == 1.0f);
  // weights that cancel exactly (+1, -1) also fall back to the plain mean: the rule looks at the sum only.
  const float s = 1.0f + -1.0f;
  CHECK(merge_weight(1.0f, s) == 1.0f && merge_denominator(s, 2) == 2.0f);
  // a tiny but nonzero sum stays a weighted mean.
  CHECK(merge_weight(0.5f, 1e-30f) == 0.5f && merge_denominator(1e-30f, 3) == 1e-30f);
  // Non-finite sums are not 0: a NaN or infinite dropped score stays a weighted mean, which is NaN (IEEE).
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(merge_weight(0.5f, nan) == 0.5f && std::isnan(merge_denominator(nan, 3)));
  CHECK(std::isnan(merge_weight(nan, nan)));
  CHECK(merge_weight(inf, inf) == inf && merge_denominator(inf, 2) == inf);
  CHECK(std::isnan(merge_weight(inf, inf) * 2.0f / merge_denominator(inf, 2)));   // inf / inf
  CHECK(std::isnan(merge_weight(0.0f, 1.0f) * inf));   // a dropped inf row with weight 0: 0 * inf
}

void test_index_math() {
  CHECK(unpack_source_row(10, 3, 0) == 10);
  CHECK(unpack_source_row(10, 3, 2) == 12);
  CHECK(unpack_source_row(10, 3, 3) == -1);
  CHECK(unpack_source_row(10, 0, 0) == -1);  // empty sample: all padding
  CHECK(unpack_source_row(int64_t{3} << 31, 5, 4) == (int64_t{3} << 31) + 4);  // 64-bit rows
  CHECK(ceil_div(0, 32) == 0 && ceil_div(1, 32) == 1 && ceil_div(32, 32) == 1 && ceil_div(33, 32) == 2);
  CHECK(column_chunks(0, 256) == 1);  // C == 0 still needs one item per sample (it writes kept_index)
  CHECK(column_chunks(1, 256) == 1 && column_chunks(256, 256) == 1 && column_chunks(257, 256) == 2);
  CHECK(column_chunks(768, 256) == 3);
  for (int64_t cols : {0, 1, 3, 31, 32, 33, 255, 256, 257, 768, 1000}) {
    for (int64_t w : {32, 128, 256}) {
      int64_t covered = 0;
      for (int64_t j = 0; j < column_chunks(cols, w); ++j) {
        const int64_t cw = chunk_width(cols, w, j);
        CHECK(cw >= 0 && cw <= w);
        covered += cw;
      }
      CHECK(covered == cols);  // chunks tile the row exactly, no overlap, no gap
    }
  }
  CHECK(chunk_width(100, 32, 10) == 0);
}

// Host model of the prune kernel, composed from the header functions in the kernel's order.
struct Pruned {
  std::vector<float> y;
  std::vector<int32_t> cu;
  std::vector<int32_t> kept_index;
};

Pruned prune_host(const std::vector<float>& x, int64_t C, const std::vector<int32_t>& cu,
                  const std::vector<float>& scores, const std::vector<float>& thr, int64_t keep_first, bool merge) {
  const int64_t B = static_cast<int64_t>(cu.size()) - 1;
  Pruned out;
  out.cu.assign(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = cu[b], len = cu[b + 1] - cu[b];
    int64_t kept = 0;
    float wsum = 0.0f;
    for (int64_t t = 0; t < len; ++t) {
      if (keep_token(t, keep_first, scores[start + t], thr[b])) ++kept; else wsum += scores[start + t];
    }
    out.cu[b + 1] = out.cu[b] + static_cast<int32_t>(pruned_rows(kept, len, merge));
    std::vector<float> acc(C, 0.0f);
    int64_t dropped = 0;
    for (int64_t t = 0; t < len; ++t) {
      const float s = scores[start + t];
      if (keep_token(t, keep_first, s, thr[b])) {
        out.y.insert(out.y.end(), x.begin() + (start + t) * C, x.begin() + (start + t + 1) * C);
        out.kept_index.push_back(static_cast<int32_t>(start + t));
      } else {
        ++dropped;
        for (int64_t c = 0; c < C; ++c) acc[c] += merge_weight(s, wsum) * x[(start + t) * C + c];
      }
    }
    if (merge && dropped > 0) {
      for (int64_t c = 0; c < C; ++c) out.y.push_back(acc[c] / merge_denominator(wsum, dropped));
      out.kept_index.push_back(-1);
    }
  }
  return out;
}

// Float64 reference written from the spec, not from the header.
void check_prune_against_reference(std::mt19937& rng, int64_t B, int64_t C, int64_t max_len, int64_t keep_first,
                                   bool merge, bool zero_scores, bool one_long) {
  std::uniform_int_distribution<int64_t> len_dist(0, max_len);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<int32_t> cu(1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = (one_long && b == 0) ? 1000 * std::max<int64_t>(max_len, 1) : len_dist(rng);
    cu.push_back(cu.back() + static_cast<int32_t>(len));
  }
  const int64_t T = cu.back();
  std::vector<float> x(T * C), scores(T), thr(B);
  for (auto& v : x) v = normal(rng);
  for (auto& v : scores) v = zero_scores ? 0.0f : std::fabs(normal(rng));
  for (auto& v : thr) v = zero_scores ? 0.0f : std::fabs(normal(rng));

  const Pruned got = prune_host(x, C, cu, scores, thr, keep_first, merge);
  CHECK(static_cast<int64_t>(got.cu.size()) == B + 1);
  CHECK(got.cu.back() <= T);
  CHECK(static_cast<int64_t>(got.kept_index.size()) == got.cu.back());
  CHECK(static_cast<int64_t>(got.y.size()) == int64_t{got.cu.back()} * C);

  int64_t row = 0;
  for (int64_t b = 0; b < B && madtp_test::failures == 0; ++b) {
    const int64_t start = cu[b], len = cu[b + 1] - cu[b];
    std::vector<int64_t> kept, dropped;
    for (int64_t t = 0; t < len; ++t) {
      const bool keep = t < keep_first || static_cast<double>(scores[start + t]) > static_cast<double>(thr[b]);
      (keep ? kept : dropped).push_back(start + t);
    }
    CHECK(got.cu[b] == row);
    for (int64_t r : kept) {
      CHECK(got.kept_index[row] == r);
      for (int64_t c = 0; c < C; ++c) CHECK(got.y[row * C + c] == x[r * C + c]);  // copies are exact
      ++row;
    }
    if (merge && !dropped.empty()) {
      CHECK(got.kept_index[row] == -1);
      double wsum = 0.0;
      for (int64_t r : dropped) wsum += scores[r];
      for (int64_t c = 0; c < C; ++c) {
        double num = 0.0;
        for (int64_t r : dropped) num += (wsum != 0.0 ? scores[r] : 1.0) * x[r * C + c];
        const double expect = num / (wsum != 0.0 ? wsum : static_cast<double>(dropped.size()));
        // fp32 accumulation over up to ~1000 * max_len rows against a float64 reference.
        CHECK_NEAR(got.y[row * C + c], expect, 1e-4 * std::sqrt(static_cast<double>(dropped.size())));
      }
      ++row;
    }
  }
  CHECK(row == got.cu.back() || madtp_test::failures > 0);
}

void test_prune_random() {
  std::mt19937 rng(1234);
  for (int64_t B : {1, 2, 7, 97}) {
    for (int64_t C : {0, 1, 5, 64}) {
      for (int64_t keep_first : {0, 1, 3}) {
        for (int merge = 0; merge < 2; ++merge) {
          for (int64_t max_len : {0, 1, 17}) {
            check_prune_against_reference(rng, B, C, max_len, keep_first, merge, false, false);
            check_prune_against_reference(rng, B, C, max_len, keep_first, merge, true, false);
          }
        }
      }
    }
  }
  // one sample 1000x longer than the rest
  check_prune_against_reference(rng, 5, 8, 12, 1, true, false, true);
  check_prune_against_reference(rng, 5, 8, 12, 0, true, true, true);
}

// pack and unpack round trip, composed the way the kernels index rows.
void test_pack_unpack_roundtrip() {
  std::mt19937 rng(99);
  std::bernoulli_distribution coin(0.4);
  for (int64_t B : {1, 3, 16}) {
    for (int64_t N : {0, 1, 9}) {
      const int64_t C = 3;
      std::vector<float> x(B * N * C);
      for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i);
      std::vector<bool> mask(B * N);
      for (size_t i = 0; i < mask.size(); ++i) mask[i] = coin(rng);
      std::vector<int32_t> cu(1, 0);
      std::vector<float> packed;
      for (int64_t b = 0; b < B; ++b) {
        int32_t count = 0;
        for (int64_t t = 0; t < N; ++t) {
          if (mask[b * N + t]) {
            packed.insert(packed.end(), x.begin() + (b * N + t) * C, x.begin() + (b * N + t + 1) * C);
            ++count;
          }
        }
        cu.push_back(cu.back() + count);
      }
      const int64_t max_len = N + 2;  // wider than any sample: trailing rows are padding
      for (int64_t b = 0; b < B; ++b) {
        int64_t t_src = 0;
        for (int64_t t = 0; t < max_len; ++t) {
          const int64_t src = unpack_source_row(cu[b], cu[b + 1] - cu[b], t);
          if (t < cu[b + 1] - cu[b]) {
            while (!mask[b * N + t_src]) ++t_src;
            CHECK(src == cu[b] + t);
            CHECK(packed[src * C] == x[(b * N + t_src) * C]);
            ++t_src;
          } else {
            CHECK(src == -1);
          }
        }
      }
    }
  }
}

}  // namespace

int main() {
  test_keep_token();
  test_pruned_rows();
  test_merge_rule();
  test_index_math();
  test_prune_random();
  test_pack_unpack_roundtrip();
  return madtp_test::report("test_token_ops");
}
