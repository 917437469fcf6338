// Host tests of csrc/include/madtp/prune_math.h, the per-sample math of score_and_prune's CUDA kernels.
// Besides the single functions, a host replay of score_kernel built from them (same passes, same split of
// rows over warps and of alignment tokens over lanes and tiles, same merge order) and of the compaction's
// keep / merge rule is checked against a float64 implementation written from the formulas of
// madtp_kernels/pruning.py, on random ragged batches: empty and length-1 samples, constant terms, ties at the
// threshold, samples longer than a token tile, K past an alignment-token tile, protected rows, NaN inputs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "madtp/prune_math.h"
#include "madtp/token_ops.h"
#include "check.h"

namespace {

using namespace madtp;

constexpr float kInf = std::numeric_limits<float>::infinity();
const float kNan = std::numeric_limits<float>::quiet_NaN();

// ------------------------------------------------------------------ single functions

void test_nan_reductions() {
  CHECK(nan_max(1.0f, 2.0f) == 2.0f && nan_min(1.0f, 2.0f) == 1.0f);
  CHECK(std::isnan(nan_max(kNan, 2.0f)) && std::isnan(nan_max(2.0f, kNan)));
  CHECK(std::isnan(nan_min(kNan, -kInf)) && std::isnan(nan_min(-kInf, kNan)));
  CHECK(nan_max(-kInf, -kInf) == -kInf && nan_min(kInf, 3.0f) == 3.0f);
  TermRange r = empty_range();
  CHECK(r.lo == kInf && r.hi == -kInf);
  r = range_add(r, 2.0f);
  CHECK(r.lo == 2.0f && r.hi == 2.0f);
  r = range_merge(r, range_add(range_add(empty_range(), -1.0f), 5.0f));
  CHECK(r.lo == -1.0f && r.hi == 5.0f);
  CHECK(range_merge(r, empty_range()).lo == -1.0f && range_merge(empty_range(), r).hi == 5.0f);
  CHECK(std::isnan(range_add(r, kNan).lo) && std::isnan(range_add(r, kNan).hi));
}

void test_candidates_and_head_weights() {
  CHECK(!is_candidate(0, false) && !is_candidate(0, true));
  CHECK(is_candidate(1, false) && !is_candidate(1, true) && is_candidate(1099, false));
  CHECK(head_weight(1.0f, 4.0f) == 0.25f);
  CHECK(head_weight(0.0f, 0.0f) == 0.0f);  // every norm 0: all weights 0, not NaN
  CHECK(head_weight(3.0f, 3.0f) == 1.0f);
  CHECK(std::isnan(head_weight(1.0f, kNan)) && std::isnan(head_weight(kNan, kNan)));  // NaN propagates
  CHECK(head_weight(1.0f, kInf) == 0.0f && std::isnan(head_weight(kInf, kInf)));
}

void test_normalisation() {
  const TermRange r{1.0f, 3.0f};
  CHECK(normalized_term(1.0f, r) == 0.0f && normalized_term(3.0f, r) == 1.0f && normalized_term(2.0f, r) == 0.5f);
  CHECK(normalized_term(7.0f, TermRange{7.0f, 7.0f}) == 0.0f);          // constant term
  // Non-finite spans are divided by (IEEE): only an exact 0 span means "constant".
  CHECK(std::isnan(normalized_term(1.0f, TermRange{-kInf, 4.0f})));    // (1 + inf) / inf
  CHECK(normalized_term(1.0f, TermRange{0.0f, kInf}) == 0.0f);          // 1 / inf
  CHECK(std::isnan(normalized_term(kInf, TermRange{0.0f, kInf})));      // inf / inf
  CHECK(std::isnan(normalized_term(1.0f, TermRange{kNan, kNan})));      // NaN span
  CHECK(std::isnan(normalized_term(1.0f, TermRange{0.0f, kNan})));
  CHECK(normalized_term(1.0f, TermRange{-3e38f, 3e38f}) == 0.0f);       // span overflows to inf
  CHECK(token_importance(3.0f, 0.0f, 2.0f, r, TermRange{0.0f, 1.0f}, TermRange{2.0f, 2.0f}) == 1.0f / 3.0f);
  CHECK(token_importance(3.0f, 1.0f, 5.0f, r, TermRange{0.0f, 1.0f}, TermRange{2.0f, 5.0f}) == 1.0f);
  // the largest term never normalises above 1, so TIS <= 1 < FLT_MAX (decision_threshold relies on it)
  std::mt19937 gen(1);
  std::uniform_real_distribution<float> u(-1e3f, 1e3f);
  for (int i = 0; i < 2000; ++i) {
    const float a = u(gen), b = u(gen);
    const TermRange t{a < b ? a : b, a < b ? b : a};
    CHECK(normalized_term(t.hi, t) <= 1.0f && normalized_term(t.lo, t) == 0.0f);
  }
}

void test_softmax_state() {
  CHECK(softmax_value(empty_softmax()) == 0.0f);  // no candidates: theta_k = 0
  // one candidate: weight exactly 1, so theta_k is its TIS exactly (the tie that drops a lone candidate)
  CHECK(softmax_value(softmax_add(empty_softmax(), 12.5f, 0.3f)) == 0.3f);
  CHECK(softmax_value(softmax_add(empty_softmax(), -1e30f, 0.7f)) == 0.7f);
  // -inf logits weigh exactly 0, also before the first finite one
  SoftmaxState s = softmax_add(empty_softmax(), -kInf, 0.9f);
  CHECK(softmax_value(s) == 0.0f);
  s = softmax_add(s, 1.0f, 0.25f);
  s = softmax_add(s, -kInf, 0.9f);
  CHECK(softmax_value(s) == 0.25f);
  // A NaN logit anywhere, or a +inf one (inf / inf): NaN, in any order (IEEE propagation, as the reference)
  CHECK(std::isnan(softmax_value(softmax_add(s, kNan, 0.1f))));
  CHECK(std::isnan(softmax_value(softmax_add(empty_softmax(), kNan, 0.1f))));
  CHECK(std::isnan(softmax_value(softmax_add(softmax_add(empty_softmax(), kNan, 0.1f), 2.0f, 0.5f))));
  CHECK(std::isnan(softmax_value(softmax_add(s, kInf, 0.1f))));
  CHECK(std::isnan(softmax_value(softmax_add(empty_softmax(), kInf, 0.1f))));
  CHECK(std::isnan(softmax_value(softmax_add(softmax_add(s, kInf, 0.1f), 3.0f, 0.5f))));
  CHECK(std::isnan(softmax_value(softmax_add(softmax_add(s, kInf, 0.1f), kInf, 0.5f))));
  // a NaN TIS weighs in even at weight 0 (0 * NaN = NaN), also where every logit is -inf
  CHECK(std::isnan(softmax_value(softmax_add(s, 1.0f, kNan))));
  CHECK(std::isnan(softmax_value(softmax_add(s, -kInf, kNan))));
  CHECK(std::isnan(softmax_value(softmax_add(empty_softmax(), -kInf, kNan))));
  CHECK(std::isnan(softmax_value(softmax_add(softmax_add(empty_softmax(), -kInf, kNan), 1.0f, 0.5f))));
  CHECK(softmax_value(softmax_add(softmax_add(empty_softmax(), -kInf, 0.9f), -kInf, 0.2f)) == 0.0f);
  // merge: empty is the identity, exactly; NaN survives a merge
  CHECK(softmax_value(softmax_merge(s, empty_softmax())) == 0.25f);
  CHECK(softmax_value(softmax_merge(empty_softmax(), s)) == 0.25f);
  CHECK(softmax_value(softmax_merge(empty_softmax(), empty_softmax())) == 0.0f);
  const SoftmaxState poisoned = softmax_add(empty_softmax(), kNan, 0.1f);
  CHECK(std::isnan(softmax_merge(s, poisoned).s) && std::isnan(softmax_merge(poisoned, s).s));
  CHECK(std::isnan(softmax_value(softmax_merge(s, poisoned))) && std::isnan(softmax_value(softmax_merge(poisoned, s))));
  const SoftmaxState infinite = softmax_add(empty_softmax(), kInf, 0.1f);
  CHECK(std::isnan(softmax_value(softmax_merge(s, infinite))) && std::isnan(softmax_value(softmax_merge(infinite, s))));
  const SoftmaxState zero_nan = softmax_add(empty_softmax(), -kInf, kNan);   // all -inf, a NaN TIS
  CHECK(std::isnan(softmax_value(softmax_merge(s, zero_nan))) && std::isnan(softmax_value(softmax_merge(zero_nan, s))));
  CHECK(std::isnan(softmax_value(softmax_merge(zero_nan, empty_softmax()))));
  // merge of two halves == one pass (two-point closed form)
  const SoftmaxState a = softmax_add(empty_softmax(), 0.5f, 1.0f), b = softmax_add(empty_softmax(), 2.5f, 0.0f);
  const double w = std::exp(0.5 - 2.5);
  CHECK_NEAR(softmax_value(softmax_merge(a, b)), w / (1.0 + w), 1e-6);
  CHECK_NEAR(softmax_value(softmax_merge(b, a)), w / (1.0 + w), 1e-6);
  CHECK_NEAR(softmax_value(softmax_add(a, 2.5f, 0.0f)), w / (1.0 + w), 1e-6);
  // theta = min over alignment tokens, NaN-propagating
  CHECK(threshold_add(threshold_add(kInf, 0.4f), 0.2f) == 0.2f);
  CHECK(std::isnan(threshold_add(threshold_add(kInf, kNan), 0.2f)));
}

void test_keep_rule() {
  CHECK(keep_row(false, 0.0f, 0.5f) && keep_row(false, kNan, kNan));  // first / protected: always kept
  CHECK(!keep_row(true, 0.5f, 0.5f));                                 // a tie drops
  CHECK(keep_row(true, 0.5000001f, 0.5f) && !keep_row(true, 0.0f, 0.0f));
  CHECK(!keep_row(true, 1.0f, kNan));                                 // NaN theta: every candidate drops
  // The compaction's encoding (keep_token, keep_first = 1) is the same rule on every row.
  const float values[] = {0.0f, 1e-30f, 0.25f, 0.5f, 0.99999994f, 1.0f, kNan};
  for (float tis : values) {  // a NaN TIS included: it drops, as keep_row says
    for (float theta : values) {
      for (int cand = 0; cand < 2; ++cand) {
        for (int64_t t = 1; t < 3; ++t) {
          CHECK(keep_token(t, 1, decision_score(cand != 0, tis), decision_threshold(theta)) ==
                keep_row(cand != 0, tis, theta));
        }
        CHECK(keep_token(0, 1, decision_score(cand != 0, tis), decision_threshold(theta)));  // row 0
      }
    }
  }
  CHECK(decision_threshold(kNan) == FLT_MAX && decision_threshold(0.5f) == 0.5f);
  // no saving, no pruning: only with merge, only for exactly one dropped candidate
  CHECK(keeps_all(true, 1) && !keeps_all(false, 1) && !keeps_all(true, 0) && !keeps_all(true, 2));
}

void test_official_terms() {
  // r / (sum r + 1e-8) + a / (sum a + 1e-8) + c, over 3 (models/vit.py), as a float32 expression
  CHECK(official_importance(1.0f, 0.5f, 2.0f, 4.0f, 8.0f) == (1.0f / (4.0f + 1e-8f) + 2.0f / (8.0f + 1e-8f) + 0.5f) / 3.0f);
  CHECK_NEAR(official_importance(1.0f, 0.5f, 2.0f, 4.0f, 8.0f), (0.25 + 0.25 + 0.5) / 3, 1e-7);
  CHECK_NEAR(official_importance(1.0f, 0.0f, -1.0f, 2.0f, -4.0f), (0.5 + 0.25) / 3, 1e-7);   // negative A as there
  CHECK(official_importance(0.0f, 0.0f, 0.0f, 0.0f, 0.0f) == 0.0f);                         // empty sums: 0, not NaN
  CHECK(official_cls_term(0.0f, 0.0f) == 0.0f);                                               // every norm 0
  CHECK_NEAR(official_cls_term(0.5f * 3.0f + 0.25f * 1.0f, 4.0f), (1.5 + 0.25) / (4.0 + 1e-8), 1e-7);
  CHECK(std::isnan(official_importance(1.0f, 0.5f, 2.0f, kNan, 8.0f)));                      // a NaN sum reaches all
  CHECK(std::isnan(official_cls_term(1.0f, kNan)));
}


// ------------------------------------------------------------------ batches

struct Batch {
  std::vector<int64_t> lengths;
  int64_t heads = 1, head_dim = 1, num_align = 1, cols = 1;
  float temperature = 1.0f;
  bool merge = true;
  bool official = false;  // importance="official": headmax and each row's own head norms
  std::vector<float> x, received, cls, attn_out, align;  // [T, C], [T, H], [T, H], [T, H, D], [T, K]
  std::vector<float> headmax;                            // [T]
  std::vector<char> protected_rows;                     // [T] or empty
  int64_t rows() const {
    int64_t t = 0;
    for (int64_t n : lengths) t += n;
    return t;
  }
};

struct Result {
  std::vector<double> importance;  // [T]
  std::vector<double> theta;       // [B]
  std::vector<char> keep;          // [T]
};

bool protected_at(const Batch& in, int64_t row) { return !in.protected_rows.empty() && in.protected_rows[row]; }

// float64, from the formulas, sharing nothing with prune_math.h.
Result reference(const Batch& in) {
  const int64_t T = in.rows(), H = in.heads, D = in.head_dim, K = in.num_align;
  Result out{std::vector<double>(T, 0.0), {}, std::vector<char>(T, 1)};
  int64_t start = 0;
  for (int64_t n : in.lengths) {
    std::vector<int64_t> cand;
    for (int64_t t = 1; t < n; ++t)
      if (!protected_at(in, start + t)) cand.push_back(start + t);
    double theta = 0.0;
    if (!cand.empty() && in.official) {
      // double125/MADTP models/vit.py: self_attn_w and token_attn_w over their sums (+ 1e-8), cls_attn weighted
      // by the token's own head_importance = norm / (sum over heads + 1e-8).
      double sum_r = 0.0, sum_a = 0.0;
      std::vector<double> a(cand.size()), c(cand.size());
      for (size_t j = 0; j < cand.size(); ++j) {
        const int64_t r = cand[j];
        sum_r += in.headmax[r];
        a[j] = -INFINITY;
        for (int64_t k = 0; k < K; ++k) a[j] = std::max<double>(a[j], in.align[r * K + k]);
        sum_a += a[j];
        std::vector<double> norm(H);
        double norm_sum = 0.0;
        for (int64_t h = 0; h < H; ++h) {
          double sq = 0.0;
          for (int64_t d = 0; d < D; ++d) sq += std::pow(static_cast<double>(in.attn_out[(r * H + h) * D + d]), 2);
          norm[h] = std::sqrt(sq);
          norm_sum += norm[h];
        }
        c[j] = 0.0;
        for (int64_t h = 0; h < H; ++h) c[j] += in.cls[r * H + h] * norm[h] / (norm_sum + 1e-8);
      }
      for (size_t j = 0; j < cand.size(); ++j)
        out.importance[cand[j]] = (in.headmax[cand[j]] / (sum_r + 1e-8) + a[j] / (sum_a + 1e-8) + c[j]) / 3.0;
    }
    if (!cand.empty() && !in.official) {
      std::vector<double> w(H);
      double sum = 0.0;
      for (int64_t h = 0; h < H; ++h) {
        double sq = 0.0;
        for (int64_t d = 0; d < D; ++d) sq += std::pow(static_cast<double>(in.attn_out[(start * H + h) * D + d]), 2);
        w[h] = std::sqrt(sq);
        sum += w[h];
      }
      for (int64_t h = 0; h < H; ++h) w[h] = sum > 0 ? w[h] / sum : 0.0;
      std::vector<double> terms[3];
      for (int64_t r : cand) {
        double rec = -INFINITY, c = 0.0, a = -INFINITY;
        for (int64_t h = 0; h < H; ++h) {
          rec = std::max<double>(rec, in.received[r * H + h]);
          c += w[h] * in.cls[r * H + h];
        }
        for (int64_t k = 0; k < K; ++k) a = std::max<double>(a, in.align[r * K + k]);
        terms[0].push_back(rec);
        terms[1].push_back(c);
        terms[2].push_back(a);
      }
      for (const auto& term : terms) {
        double lo = INFINITY, hi = -INFINITY;
        for (double v : term) lo = std::min(lo, v), hi = std::max(hi, v);
        for (size_t i = 0; i < cand.size(); ++i)
          out.importance[cand[i]] += (hi > lo ? (term[i] - lo) / (hi - lo) : 0.0) / 3.0;
      }
    }
    if (!cand.empty()) {
      theta = INFINITY;
      for (int64_t k = 0; k < K; ++k) {
        double peak = -INFINITY;
        for (int64_t r : cand) peak = std::max(peak, in.align[r * K + k] / static_cast<double>(in.temperature));
        double num = 0.0, den = 0.0;
        for (int64_t r : cand) {
          const double e = std::exp(in.align[r * K + k] / static_cast<double>(in.temperature) - peak);
          den += e;
          num += e * out.importance[r];
        }
        theta = std::min(theta, num / den);
      }
    }
    int64_t dropped = 0;
    for (int64_t r : cand) {
      out.keep[r] = out.importance[r] > theta;
      dropped += out.keep[r] ? 0 : 1;
    }
    if (in.merge && dropped == 1)  // n - 1 kept + 1 merged row saves nothing: keep it
      for (int64_t r : cand) out.keep[r] = 1;
    out.theta.push_back(theta);
    start += n;
  }
  return out;
}

// The xor butterfly of warp_sum / warp_max / warp_min over 32 lane values (all lanes end equal).
template <typename Op>
float butterfly(std::vector<float> v, Op op) {
  for (int o = 16; o > 0; o /= 2) {
    std::vector<float> next(32);
    for (int l = 0; l < 32; ++l) next[l] = op(v[l], v[l ^ o]);
    v = next;
  }
  return v[0];
}

float add(float a, float b) { return a + b; }

// score_kernel, replayed on the host: per sample, the same passes and orders as the CUDA code.
struct Replay {
  std::vector<float> importance, theta, decision, decision_threshold;
};

Replay replay(const Batch& in) {
  const int64_t T = in.rows(), H = in.heads, D = in.head_dim, K = in.num_align;
  Replay out{std::vector<float>(T, -1.0f), {}, std::vector<float>(T, -1.0f), {}};
  std::vector<float> terms(3 * T, 0.0f);
  int64_t start = 0;
  for (int64_t len : in.lengths) {
    if (len == 0) {
      out.theta.push_back(0.0f);
      out.decision_threshold.push_back(decision_threshold(0.0f));
      continue;
    }
    std::vector<float> head_w(H);
    for (int64_t h = 0; h < H && !in.official; ++h) {
      std::vector<float> lanes(32, 0.0f);
      for (int64_t d = 0; d < D; ++d) {
        const float v = in.attn_out[(start * H + h) * D + d];
        lanes[d % 32] += v * v;
      }
      head_w[h] = std::sqrt(butterfly(lanes, add));
    }
    std::vector<float> lanes(32, 0.0f);
    for (int64_t h = 0; h < H && !in.official; ++h) lanes[h % 32] += head_w[h];
    const float total = butterfly(lanes, add);
    for (int64_t h = 0; h < H && !in.official; ++h) head_w[h] = head_weight(head_w[h], total);

    TermRange ranges[kPruneWarps][3];
    float sums[kPruneWarps][2];
    for (int w = 0; w < kPruneWarps; ++w) {
      ranges[w][0] = ranges[w][1] = ranges[w][2] = empty_range();
      sums[w][0] = sums[w][1] = 0.0f;
      for (int64_t i = w; i < len; i += kPruneWarps) {
        const int64_t row = start + i;
        if (!is_candidate(i, protected_at(in, row))) continue;
        std::vector<float> r(32, -kInf), c(32, 0.0f), a(32, -kInf);
        if (in.official) {
          float weighted = 0.0f, norm_sum = 0.0f;
          for (int64_t h = 0; h < H; ++h) {
            std::vector<float> sq(32, 0.0f);
            for (int64_t d = 0; d < D; ++d) {
              const float v = in.attn_out[(row * H + h) * D + d];
              sq[d % 32] += v * v;
            }
            const float n = std::sqrt(butterfly(sq, add));
            weighted += in.cls[row * H + h] * n;
            norm_sum += n;
          }
          terms[row] = in.headmax[row];
          terms[T + row] = official_cls_term(weighted, norm_sum);
        } else {
          for (int64_t h = 0; h < H; ++h) {
            r[h % 32] = nan_max(r[h % 32], in.received[row * H + h]);
            c[h % 32] += head_w[h] * in.cls[row * H + h];
          }
          terms[row] = butterfly(r, nan_max);
          terms[T + row] = butterfly(c, add);
        }
        for (int64_t k = 0; k < K; ++k) a[k % 32] = nan_max(a[k % 32], in.align[row * K + k]);
        terms[2 * T + row] = butterfly(a, nan_max);
        sums[w][0] += terms[row];
        sums[w][1] += terms[2 * T + row];
        for (int j = 0; j < 3; ++j) ranges[w][j] = range_add(ranges[w][j], terms[j * T + row]);
      }
    }
    TermRange rr = ranges[0][0], rc = ranges[0][1], ra = ranges[0][2];
    float sum_r = sums[0][0], sum_a = sums[0][1];
    for (int w = 1; w < kPruneWarps; ++w) {
      rr = range_merge(rr, ranges[w][0]);
      rc = range_merge(rc, ranges[w][1]);
      ra = range_merge(ra, ranges[w][2]);
      sum_r += sums[w][0];
      sum_a += sums[w][1];
    }
    for (int64_t i = 0; i < len; ++i) {
      const int64_t row = start + i;
      const bool cand = is_candidate(i, protected_at(in, row));
      const float r = terms[row], c = terms[T + row], a = terms[2 * T + row];
      const float tis = !cand         ? 0.0f
                        : in.official ? official_importance(r, c, a, sum_r, sum_a)
                                      : token_importance(r, c, a, rr, rc, ra);
      out.importance[row] = tis;
      out.decision[row] = decision_score(cand, tis);
    }
    std::vector<float> theta_lane(32, kInf);
    for (int64_t k0 = 0; k0 < K; k0 += kAlignTile) {
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t k = k0 + lane;
        if (k >= K) continue;
        SoftmaxState states[kPruneWarps];
        for (int w = 0; w < kPruneWarps; ++w) {
          states[w] = empty_softmax();
          for (int64_t i = w; i < len; i += kPruneWarps) {
            const int64_t row = start + i;
            if (!is_candidate(i, protected_at(in, row))) continue;
            states[w] = softmax_add(states[w], in.align[row * K + k] / in.temperature, out.importance[row]);
          }
        }
        SoftmaxState merged = states[0];
        for (int w = 1; w < kPruneWarps; ++w) merged = softmax_merge(merged, states[w]);
        theta_lane[lane] = threshold_add(theta_lane[lane], softmax_value(merged));
      }
    }
    const float theta = butterfly(theta_lane, nan_min);
    out.theta.push_back(theta);
    out.decision_threshold.push_back(decision_threshold(theta));
    // Pass D: with merge, exactly one dropped candidate is kept (its decision score +inf).
    int64_t dropped = 0;
    for (int64_t i = 0; i < len; ++i)
      dropped += !keep_row(is_candidate(i, protected_at(in, start + i)), out.importance[start + i], theta);
    if (keeps_all(in.merge, dropped))
      for (int64_t i = 0; i < len; ++i)
        if (!keep_row(is_candidate(i, protected_at(in, start + i)), out.importance[start + i], theta))
          out.decision[start + i] = decision_score(false, 0.0f);
    start += len;
  }
  return out;
}

Batch random_batch(std::mt19937& gen, std::vector<int64_t> lengths, int64_t heads, int64_t head_dim,
                   int64_t num_align, float temperature, double protect, bool constant = false,
                   bool official = false) {
  Batch in;
  in.lengths = std::move(lengths);
  in.heads = heads, in.head_dim = head_dim, in.num_align = num_align, in.temperature = temperature;
  in.cols = 1 + static_cast<int64_t>(gen() % 9);
  in.merge = gen() % 4 != 0;
  const int64_t T = in.rows();
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform;
  for (int64_t i = 0; i < T * in.cols; ++i) in.x.push_back(normal(gen));
  for (int64_t i = 0; i < T * heads; ++i) {
    in.received.push_back(constant ? 1.0f : 3.0f * uniform(gen));
    in.cls.push_back(constant ? 0.25f : uniform(gen));
  }
  for (int64_t i = 0; i < T * heads * head_dim; ++i) in.attn_out.push_back(normal(gen));
  for (int64_t i = 0; i < T * num_align; ++i) in.align.push_back(constant ? 1.0f : normal(gen));
  if (protect > 0)
    for (int64_t i = 0; i < T; ++i) in.protected_rows.push_back(uniform(gen) < protect);
  in.official = official;
  for (int64_t i = 0; i < T; ++i) in.headmax.push_back(constant ? 2.0f : 3.0f * uniform(gen));
  return in;
}

// Checks one batch: importance and theta within tol of float64, the decisions (exact where no candidate lies
// within 2 tol of theta, else the replay's own numbers), the compaction's encoding, row counts, merged rows.
void check_batch(const Batch& in, double tol, const char* what) {
  const int before = madtp_test::failures;
  const Result ref = reference(in);
  const Replay got = replay(in);
  const int64_t T = in.rows();
  for (int64_t r = 0; r < T; ++r) CHECK_NEAR(got.importance[r], ref.importance[r], tol);
  for (size_t b = 0; b < in.lengths.size(); ++b) CHECK_NEAR(got.theta[b], ref.theta[b], tol);
  int64_t start = 0;
  for (size_t b = 0; b < in.lengths.size(); ++b) {
    const int64_t len = in.lengths[b];
    bool close = false;
    for (int64_t i = 1; i < len; ++i)
      if (is_candidate(i, protected_at(in, start + i)) &&
          std::fabs(ref.importance[start + i] - ref.theta[b]) <= 2 * tol)
        close = true;
    int64_t kept = 0, rule_drops = 0;
    float wsum = 0.0f;
    std::vector<char> keep(len);
    for (int64_t i = 0; i < len; ++i)
      rule_drops += !keep_row(is_candidate(i, protected_at(in, start + i)), got.importance[start + i], got.theta[b]);
    for (int64_t i = 0; i < len; ++i) {
      const int64_t row = start + i;
      const bool cand = is_candidate(i, protected_at(in, row));
      keep[i] = keep_token(i, 1, got.decision[row], got.decision_threshold[b]);  // what the compaction does
      CHECK(keep[i] == (keep_row(cand, got.importance[row], got.theta[b]) || keeps_all(in.merge, rule_drops)));
      if (!close) CHECK(keep[i] == ref.keep[row]);
      if (!cand) CHECK(keep[i] && got.importance[row] == 0.0f);
      if (keep[i]) ++kept; else wsum += got.decision[row];
    }
    const int64_t dropped = len - kept;
    CHECK(pruned_rows(kept, len, in.merge) == kept + ((in.merge && dropped > 0) ? 1 : 0));
    if (in.merge && dropped > 0) {
      // the merged row by the compaction's rule vs the TIS-weighted mean in float64 (on the same decisions)
      double ref_sum = 0.0;
      for (int64_t i = 0; i < len; ++i)
        if (!keep[i]) ref_sum += ref.importance[start + i];
      for (int64_t c = 0; c < in.cols; ++c) {
        float acc = 0.0f;
        double ref_acc = 0.0;
        for (int64_t i = 0; i < len; ++i) {
          if (keep[i]) continue;
          const int64_t row = start + i;
          acc += merge_weight(got.decision[row], wsum) * in.x[row * in.cols + c];
          ref_acc += (ref_sum != 0 ? ref.importance[row] : 1.0) * in.x[row * in.cols + c];
        }
        CHECK_NEAR(acc / merge_denominator(wsum, dropped), ref_acc / (ref_sum != 0 ? ref_sum : dropped), 20 * tol);
      }
    }
    start += len;
  }
  if (madtp_test::failures != before) std::fprintf(stderr, "  in batch: %s\n", what);
}

void test_one_drop_is_kept_with_merge() {
  // Length 2: one candidate, theta == its TIS (the softmax weight is exactly 1), so the rule drops it; with merge
  // that is n - 1 + 1 = n rows: it stays (decision +inf); without merge it goes. Both formulas.
  std::mt19937 gen(17);
  for (int official = 0; official < 2; ++official) {
    for (int merge = 0; merge < 2; ++merge) {
      Batch in = random_batch(gen, {2, 5}, 2, 8, 4, 0.5f, 0.0, false, official != 0);
      in.merge = merge != 0;
      const Replay got = replay(in);
      CHECK(got.theta[0] == got.importance[1]);
      CHECK(keep_token(1, 1, got.decision[1], got.decision_threshold[0]) == (merge != 0));
      check_batch(in, 2e-5, "one candidate");
    }
  }
}

void test_random_batches() {
  std::mt19937 gen(20240607);
  const int64_t length_pool[] = {0, 1, 2, 3, 6, 11, 40};
  const int64_t heads_pool[] = {1, 3, 12, 40};
  const int64_t dim_pool[] = {1, 8, 33, 64};
  const int64_t align_pool[] = {1, 4, 31, 32, 33, 100};
  const float tau_pool[] = {1e-3f, 0.3f, 1.0f, 50.0f};
  for (int it = 0; it < 120; ++it) {
    std::vector<int64_t> lengths(1 + gen() % 6);
    for (auto& n : lengths) n = length_pool[gen() % 7];
    if (gen() % 3 == 0) lengths[gen() % lengths.size()] = 257 + gen() % 200;  // past one token tile
    const Batch in = random_batch(gen, lengths, heads_pool[gen() % 4], dim_pool[gen() % 4], align_pool[gen() % 6],
                                  tau_pool[gen() % 4], gen() % 2 ? 0.0 : 0.2, false, /*official=*/it % 2 == 1);
    check_batch(in, 2e-5, in.official ? "random, official" : "random, minmax");
  }
}

void test_long_sample_many_alignment_tokens() {
  std::mt19937 gen(7);
  for (int64_t K : {256, 300}) {  // K = 256: 8 full tiles; 300: a partial ninth
    const Batch in = random_batch(gen, {1100, 3, 0, 257, 1}, 2, 16, K, 0.5f, 0.05);
    check_batch(in, 2e-5, "1100 tokens, K >= 256");
  }
}

void test_constant_terms_drop_every_candidate() {
  std::mt19937 gen(3);
  const Batch in = random_batch(gen, {4, 1, 0, 7, 300}, 3, 4, 5, 1.0f, 0.0, /*constant=*/true);
  const Replay got = replay(in);
  int64_t start = 0;
  for (size_t b = 0; b < in.lengths.size(); ++b) {
    CHECK(got.theta[b] == 0.0f);
    for (int64_t i = 0; i < in.lengths[b]; ++i) {
      CHECK(got.importance[start + i] == 0.0f);
      CHECK(keep_token(i, 1, got.decision[start + i], got.decision_threshold[b]) == (i == 0));
    }
    start += in.lengths[b];
  }
  check_batch(in, 1e-6, "constant terms");
}

void test_tie_at_threshold() {
  // tau -> 0 with alignment scores 1 apart: the softmax is exactly one-hot (exp(-1000) == 0 in float), so
  // theta is exactly the TIS of the argmax row of the worst alignment token, which must then be dropped.
  std::mt19937 gen(11);
  for (int64_t len : {5, 70, 600}) {
    Batch in = random_batch(gen, {len}, 2, 8, 3, 1e-3f, 0.0);
    for (int64_t k = 0; k < 3; ++k) {  // distinct scores per alignment token: a unique argmax
      std::vector<float> perm(len);
      for (int64_t i = 0; i < len; ++i) perm[i] = static_cast<float>(i);
      std::shuffle(perm.begin(), perm.end(), gen);
      for (int64_t i = 0; i < len; ++i) in.align[i * 3 + k] = perm[i];
    }
    const Replay got = replay(in);
    bool tie = false;
    for (int64_t i = 1; i < len; ++i) {
      if (got.importance[i] == got.theta[0]) {
        tie = true;
        CHECK(!keep_token(i, 1, got.decision[i], got.decision_threshold[0]));
      }
    }
    CHECK(tie);
    check_batch(in, 2e-5, "tie at the threshold");
  }
  // a lone candidate ties with itself: theta == its TIS (0), dropped (without merge: test_one_drop_is_kept_with_merge)
  Batch two = random_batch(gen, {2}, 1, 4, 4, 0.3f, 0.0);
  two.merge = false;
  const Replay got = replay(two);
  CHECK(got.theta[0] == got.importance[1] && !keep_token(1, 1, got.decision[1], got.decision_threshold[0]));
}

void test_protected_and_nan() {
  std::mt19937 gen(5);
  // every candidate protected: nothing to score, theta 0, everything kept
  Batch all = random_batch(gen, {9, 300}, 3, 8, 40, 1.0f, 0.0);
  all.protected_rows.assign(all.rows(), 1);
  const Replay g = replay(all);
  CHECK(g.theta[0] == 0.0f && g.theta[1] == 0.0f);
  for (int64_t r = 0; r < all.rows(); ++r) CHECK(g.importance[r] == 0.0f && g.decision[r] == kInf);
  // A NaN input of a candidate (alignment score, received, cls) or a NaN / inf in the first row's attention
  // output reaches every candidate (min-max normalisation, head weights): NaN TIS on every candidate. A +inf
  // term makes its own TIS NaN (inf / inf; the others' term is finite / inf = 0). Either way theta is NaN, every
  // candidate drops, the rows that always stay stay (decision threshold FLT_MAX), the other sample is untouched.
  const float bad_values[] = {kNan, kInf};
  for (int where = 0; where < 4; ++where) {
    for (float bad : bad_values) {
      Batch in = random_batch(gen, {50, 20}, 2, 8, 40, 1.0f, 0.3);
      in.protected_rows[0] = 0;
      int64_t victim = 1;
      while (in.protected_rows[victim]) ++victim;
      if (where == 0) in.align[victim * 40 + 17] = bad;
      if (where == 1) in.received[victim * 2 + 1] = bad;
      if (where == 2) in.cls[victim * 2] = bad;
      if (where == 3) in.attn_out[5] = bad;   // row 0, head 0
      const Replay got = replay(in);
      CHECK(std::isnan(got.theta[0]) && got.decision_threshold[0] == FLT_MAX);
      for (int64_t i = 0; i < 50; ++i) {
        const bool cand = is_candidate(i, in.protected_rows[i]);
        const bool all = std::isnan(bad) || where == 3;
        if (!cand) CHECK(got.importance[i] == 0.0f);
        else if (all || i == victim) CHECK(std::isnan(got.importance[i]));
        else CHECK(got.importance[i] >= 0.0f && got.importance[i] <= 1.0f);
        CHECK(keep_token(i, 1, got.decision[i], got.decision_threshold[0]) == !cand);
      }
      CHECK(std::isfinite(got.theta[1]));
      for (int64_t i = 50; i < 70; ++i) CHECK(std::isfinite(got.importance[i]));
    }
  }
  // A NaN in a row that is not a candidate (first or protected) is never read by the scoring.
  Batch in = random_batch(gen, {50}, 2, 8, 40, 1.0f, 0.3);
  in.protected_rows[0] = 0;
  Batch dirty = in;
  for (int64_t i = 0; i < 50; ++i) {
    if (is_candidate(i, in.protected_rows[i])) continue;
    for (int64_t k = 0; k < 40; ++k) dirty.align[i * 40 + k] = kNan;
    for (int64_t h = 0; h < 2; ++h) dirty.received[i * 2 + h] = dirty.cls[i * 2 + h] = kNan;
  }
  const Replay a = replay(in), b = replay(dirty);
  CHECK(a.theta[0] == b.theta[0]);
  for (int64_t i = 0; i < 50; ++i) CHECK(a.importance[i] == b.importance[i] && a.decision[i] == b.decision[i]);
  // A -inf alignment score masks that one entry (weight 0): the result stays finite and matches float64.
  Batch masked = random_batch(gen, {50}, 2, 8, 40, 1.0f, 0.0);
  masked.align[7 * 40 + 3] = -kInf;
  check_batch(masked, 2e-5, "a -inf alignment score");
  CHECK(std::isfinite(replay(masked).theta[0]));
}

}  // namespace

int main() {
  test_nan_reductions();
  test_candidates_and_head_weights();
  test_normalisation();
  test_softmax_state();
  test_keep_rule();
  test_official_terms();
  test_one_drop_is_kept_with_merge();
  test_random_batches();
  test_long_sample_many_alignment_tokens();
  test_constant_terms_drop_every_candidate();
  test_tie_at_threshold();
  test_protected_and_nan();
  return madtp_test::report("test_prune_math");
}
