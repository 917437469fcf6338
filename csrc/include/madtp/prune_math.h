// Per-sample math of score_and_prune (MADTP's token importance, threshold and keep rule), shared by the CUDA
// kernels (prune_kernels.cuh) and the host tests in csrc/tests. Torch-free and CUDA-free, so plain g++
// compiles it. The formulas are those of madtp_kernels/pruning.py's docstring. Non-finite values follow the rule
// of every backend (README "Non-finite values", reference/pruning.py): IEEE propagation where the formula reads
// a value and nowhere else. Maxima and minima propagate NaN, a term is 0 only where its span is exactly 0, a
// softmax over nothing but -inf logits has zero weights (and a zero weight times a NaN TIS is still NaN), a NaN
// or +inf logit makes theta NaN, and a NaN theta drops every candidate.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "madtp/token_ops.h"  // MADTP_HD, keep_token (the compaction's rule)

namespace madtp {

// The score kernel's shape, also used by the host tests to replay its order of operations: kPruneWarps
// warps split a sample's tokens, each lane owns one alignment token of a tile of kAlignTile.
constexpr int kPruneWarps = 8;
constexpr int kAlignTile = 32;

// torch.amax / amin semantics: a NaN operand wins (fmaxf / fminf would drop it).
MADTP_HD float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }
MADTP_HD float nan_min(float a, float b) { return (a < b || a != a) ? a : b; }

// Row 0 of a sample (its CLS / BOS) and protected rows are never candidates: never normalised, scored or dropped.
MADTP_HD bool is_candidate(int64_t t, bool protected_row) { return t > 0 && !protected_row; }

// The cls term's weight of head h: the norm of the attention output of the sample's first row in that
// head, over the norms' sum (all weights 0 when every norm is 0; NaN when the sum is NaN, as clamp_min).
MADTP_HD float head_weight(float norm, float norm_sum) {
  return norm / ((norm_sum > FLT_MIN || norm_sum != norm_sum) ? norm_sum : FLT_MIN);
}

// Min and max of one term over a sample's candidates; lo = +inf, hi = -inf while empty.
struct TermRange {
  float lo;
  float hi;
};

MADTP_HD TermRange empty_range() { return {INFINITY, -INFINITY}; }
MADTP_HD TermRange range_add(TermRange r, float v) { return {nan_min(r.lo, v), nan_max(r.hi, v)}; }
MADTP_HD TermRange range_merge(TermRange a, TermRange b) { return {nan_min(a.lo, b.lo), nan_max(a.hi, b.hi)}; }

// Min-max normalisation of a candidate's term: 0 where the term is constant over the candidates (span exactly
// 0), else (v - lo) / span by IEEE rules: a NaN or infinite term anywhere in the sample reaches every candidate.
MADTP_HD float normalized_term(float v, TermRange r) {
  const float span = r.hi - r.lo;
  return span != 0.0f ? (v - r.lo) / span : 0.0f;
}

// TIS = the mean of the three normalised terms (attention received, cls attention, alignment): in [0, 1], or NaN.
MADTP_HD float token_importance(float received, float cls, float align, TermRange rr, TermRange rc, TermRange ra) {
  return (normalized_term(received, rr) + normalized_term(cls, rc) + normalized_term(align, ra)) / 3.0f;
}

// importance="official" (double125/MADTP models/vit.py, Attention.forward and Block.Reduce_token): the received
// (stats.headmax) and alignment terms over their sums over the candidates, each sum + 1e-8 as there, and the cls
// attention weighted by the token's own head-output norms n_h: sum_h cls_h n_h / (sum_h n_h + 1e-8). Same
// order of operations as the torch reference; no span, no clamp: IEEE propagation of whatever the sums hold.
constexpr float kOfficialEps = 1e-8f;

MADTP_HD float official_cls_term(float cls_weighted, float norm_sum) {
  return cls_weighted / (norm_sum + kOfficialEps);
}

MADTP_HD float official_importance(float headmax, float cls_term, float align, float sum_received, float sum_align) {
  return (headmax / (sum_received + kOfficialEps) + align / (sum_align + kOfficialEps) + cls_term) / 3.0f;
}

// Online softmax over a sample's candidates for one alignment token k: running max m of the logits
// A_ik / temperature, s = sum exp(logit - m), n = sum exp(logit - m) TIS_i. theta_k = n / s.
struct SoftmaxState {
  float m;
  float s;
  float n;
};

MADTP_HD SoftmaxState empty_softmax() { return {-INFINITY, 0.0f, 0.0f}; }

MADTP_HD SoftmaxState softmax_add(SoftmaxState st, float logit, float value) {
  if (logit > st.m) {  // new max (the first finite one included: exp(-inf) = 0 clears the empty sums)
    const float scale = expf(st.m - logit);
    const float e = expf(logit - logit);  // 1, or NaN for a +inf logit (inf / inf in the softmax)
    return {logit, st.s * scale + e, st.n * scale + e * value};
  }
  // A -inf logit weighs exactly 0, and 0 * value is still added (0 * NaN = NaN, as in the reference's product).
  if (logit == -INFINITY) return {st.m, st.s, st.n + 0.0f * value};
  const float e = expf(logit - st.m);  // a NaN logit (or a second +inf) makes s and n NaN
  return {st.m, st.s + e, st.n + e * value};
}

MADTP_HD SoftmaxState softmax_merge(SoftmaxState a, SoftmaxState b) {
  const float m = a.m > b.m ? a.m : b.m;
  const float ref = m == -INFINITY ? 0.0f : m;  // two states without a finite logit: no (-inf) - (-inf)
  const float sa = expf(a.m - ref), sb = expf(b.m - ref);
  return {m, a.s * sa + b.s * sb, a.n * sa + b.n * sb};
}

// sum_i softmax_i TIS_i. Where every logit is -inf (or there is none), the weights are all 0 and so is s: the
// value is n, the sum of 0 * TIS_i (0, or NaN from a NaN TIS). A NaN s (NaN or +inf logit) gives NaN.
MADTP_HD float softmax_value(SoftmaxState st) { return st.s == 0.0f ? st.n : st.n / st.s; }

// theta_b = min over alignment tokens of softmax_value: start from +inf; NaN-propagating.
MADTP_HD float threshold_add(float theta, float value) { return nan_min(theta, value); }
MADTP_HD float threshold_final(float theta, int64_t num_tokens) { return num_tokens > 0 ? theta : 0.0f; }

// The keep rule: a row stays iff it is not a candidate or its TIS is strictly above the sample's theta
// (a tie drops; a NaN TIS drops; a NaN theta drops every candidate).
MADTP_HD bool keep_row(bool candidate, float tis, float theta) { return !candidate || tis > theta; }

// No saving, no pruning: with merge, a sample that would drop exactly one candidate keeps it (n - 1 kept rows and
// the merged row are n rows; the official code skips the layer when at most one token would go). Without merge
// the one row is saved and goes.
MADTP_HD bool keeps_all(bool merge, int64_t dropped) { return merge && dropped == 1; }

// The same rule encoded for the prune_tokens compaction (keep_token with keep_first = 1): non-candidates
// score +inf and the threshold is made finite, so keep_token(t, 1, decision_score, decision_threshold) ==
// keep_row for every t >= 1 (row 0 is kept by keep_first), NaN theta included. A minmax TIS is in [0, 1] or NaN;
// an official one is finite and far below FLT_MAX unless its sums are pathological (near -1e-8) or NaN. A row that
// keeps_all keeps gets decision_score(false, .) = +inf.
MADTP_HD float decision_score(bool candidate, float tis) { return candidate ? tis : INFINITY; }
MADTP_HD float decision_threshold(float theta) { return theta != theta ? FLT_MAX : theta; }

}  // namespace madtp
