// Per-sample math of score_and_prune (MADTP's token importance, threshold and keep rule), shared by the CUDA
// kernels (prune_kernels.cuh) and the host tests in csrc/tests. Torch-free and CUDA-free, so plain g++
// compiles it. The formulas are those of madtp_kernels/pruning.py's docstring; the non-finite corner cases
// follow the torch reference (reference/pruning.py), whose reductions propagate NaN.
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
// head, over the norms' sum (all weights 0 when every norm is 0).
MADTP_HD float head_weight(float norm, float norm_sum) { return norm / (norm_sum > FLT_MIN ? norm_sum : FLT_MIN); }

// Min and max of one term over a sample's candidates; lo = +inf, hi = -inf while empty.
struct TermRange {
  float lo;
  float hi;
};

MADTP_HD TermRange empty_range() { return {INFINITY, -INFINITY}; }
MADTP_HD TermRange range_add(TermRange r, float v) { return {nan_min(r.lo, v), nan_max(r.hi, v)}; }
MADTP_HD TermRange range_merge(TermRange a, TermRange b) { return {nan_min(a.lo, b.lo), nan_max(a.hi, b.hi)}; }

// Min-max normalisation of a candidate's term: 0 where the term is constant over the candidates, and where
// the span is not finite (a NaN or infinite term anywhere in the sample), as in the reference.
MADTP_HD float normalized_term(float v, TermRange r) {
  const float span = r.hi - r.lo;
  return (span > 0.0f && span <= FLT_MAX) ? (v - r.lo) / span : 0.0f;
}

// TIS = the mean of the three normalised terms (attention received, cls attention, alignment), in [0, 1].
MADTP_HD float token_importance(float received, float cls, float align, TermRange rr, TermRange rc, TermRange ra) {
  return (normalized_term(received, rr) + normalized_term(cls, rc) + normalized_term(align, ra)) / 3.0f;
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
    return {logit, st.s * scale + 1.0f, st.n * scale + value};
  }
  if (logit == -INFINITY) return st;  // weight exactly 0, as the reference's masked entries
  const float e = expf(logit - st.m);  // a NaN logit poisons s (and n): softmax_value gives 0
  return {st.m, st.s + e, st.n + e * value};
}

MADTP_HD SoftmaxState softmax_merge(SoftmaxState a, SoftmaxState b) {
  if (b.m == -INFINITY && b.s == 0.0f) return a;  // empty (a NaN-poisoned state has s = NaN, so is kept)
  if (a.m == -INFINITY && a.s == 0.0f) return b;
  const float m = a.m > b.m ? a.m : b.m;
  const float sa = expf(a.m - m), sb = expf(b.m - m);
  return {m, a.s * sa + b.s * sb, a.n * sa + b.n * sb};
}

// sum_i softmax_i TIS_i, and 0 where that softmax is undefined: without candidates (or with every logit
// -inf), with a NaN logit (s is NaN) or an infinite max. The reference's softmax(...).nan_to_num(0).
MADTP_HD float softmax_value(SoftmaxState st) { return (st.s > 0.0f && st.m < INFINITY) ? st.n / st.s : 0.0f; }

// theta_b = min over alignment tokens of softmax_value: start from +inf; NaN-propagating, although every
// softmax_value is finite.
MADTP_HD float threshold_add(float theta, float value) { return nan_min(theta, value); }
MADTP_HD float threshold_final(float theta, int64_t num_tokens) { return num_tokens > 0 ? theta : 0.0f; }

// The keep rule: a row stays iff it is not a candidate or its TIS is strictly above the sample's theta
// (a tie drops; a NaN theta, which the kernels never produce, would drop every candidate).
MADTP_HD bool keep_row(bool candidate, float tis, float theta) { return !candidate || tis > theta; }

// The same rule encoded for the prune_tokens compaction (keep_token with keep_first = 1): non-candidates
// score +inf and the threshold is made finite, so keep_token(t, 1, decision_score, decision_threshold) ==
// keep_row for every t >= 1 (row 0 is kept by keep_first), NaN theta included. TIS is always in [0, 1].
MADTP_HD float decision_score(bool candidate, float tis) { return candidate ? tis : INFINITY; }
MADTP_HD float decision_threshold(float theta) { return theta != theta ? FLT_MAX : theta; }

}  // namespace madtp
