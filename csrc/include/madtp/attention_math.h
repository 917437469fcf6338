// Per-tile math of varlen attention (online softmax, causal mask, statistics, work list), shared by the CUDA
// kernels in attention_kernels.cuh and the host tests in csrc/tests. Torch-free and CUDA-free so that plain
// g++ compiles it: the host tests drive exactly these functions through a tiled attention in the kernels'
// tile order.
//
// Scores are kept in the log2 domain (s2 = scale * log2(e) * q.k) so that every exponential is one exp2,
// the instruction the GPU has. The LSE the forward returns (and the statistics pass reads) is the natural
// log-sum-exp, as in flash-attn and the torch / Triton backends, so that backward passes can share it.
#pragma once

#include <cmath>
#include <cstdint>

#include "madtp/token_ops.h"  // MADTP_HD, ceil_div

namespace madtp {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Bottom-right causal alignment (flash-attn): query i of a sequence with lq queries and lk keys sees key j
// iff j <= i + lk - lq. Positions outside the sequence (i >= lq: padding rows of the last query block;
// j >= lk: padding columns of the last key block) are never visible, whatever causal says.
MADTP_HD bool key_visible(int64_t i, int64_t j, int64_t lq, int64_t lk, bool causal) {
  return i < lq && j < lk && (!causal || j <= i + lk - lq);
}

// Keys [0, key_end) are all a query block [.., m_end) can see: the forward skips key blocks past it.
MADTP_HD int64_t key_end(int64_t m_end, int64_t lq, int64_t lk, bool causal) {
  if (!causal) return lk;
  const int64_t end = m_end + lk - lq;
  return end < 0 ? 0 : (end < lk ? end : lk);
}

// Queries before query_begin see none of the keys [n0, ..): the statistics pass skips those query blocks.
MADTP_HD int64_t query_begin(int64_t n0, int64_t lq, int64_t lk, bool causal) {
  if (!causal) return 0;
  const int64_t begin = n0 - (lk - lq);
  return begin < 0 ? 0 : (begin < lq ? begin : lq);
}

MADTP_HD float mask_score(float s2, bool visible) { return visible ? s2 : -INFINITY; }

// The value subtracted before exponentiating: the running max, except for a row that has seen only masked
// scores (max -inf), where it is 0 so that exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN.
MADTP_HD float softmax_offset(float row_max) { return row_max == -INFINITY ? 0.0f : row_max; }

// Online softmax step: folds a tile's row max into the running max and returns the factor by which the
// running sum and the output accumulator must be scaled (0 while the row had seen nothing: both are 0).
MADTP_HD float online_softmax_update(float& row_max, float tile_max) {
  const float new_max = row_max > tile_max ? row_max : tile_max;  // fmaxf semantics without NaN inputs
  const float alpha = exp2f(row_max - softmax_offset(new_max));
  row_max = new_max;
  return alpha;
}

// Unnormalised probability of a (masked) log2-domain score under the current running max.
MADTP_HD float softmax_prob(float s2, float row_max) { return exp2f(s2 - softmax_offset(row_max)); }

// Output scale at the end: a query that saw no key (row sum 0) outputs 0, never 0/0.
MADTP_HD float softmax_inv_sum(float row_sum) { return row_sum > 0.0f ? 1.0f / row_sum : 0.0f; }

// Natural log-sum-exp of the row's scores; +inf for a query that saw no key, so that any probability
// recomputed from it, exp(s - lse), is 0 (also for s = -inf).
// An empty row (sum exactly 0) has LSE +inf, so its probabilities are 0; a NaN sum (a NaN or +inf score)
// stays NaN, as on the torch and Triton backends.
MADTP_HD float softmax_lse(float row_max, float row_sum) {
  return row_sum == 0.0f ? INFINITY : (row_max + log2f(row_sum)) * kLn2;
}

// Statistics pass: probability query i gives key j, recomputed from the raw log2-domain score and the
// forward's natural LSE. Masked positions contribute exactly 0 (the score of a masked pair is not even
// looked at).
MADTP_HD float stats_prob(float s2, float lse, bool visible) { return visible ? exp2f(s2 - lse * kLog2e) : 0.0f; }

// headmax (the official MADTP received term): key j gets, summed over its sequence's queries other than the
// first (the official reads attn[:, :, 1:, 1:]), the largest probability any head gives it. Query i counts for
// key j iff it sees j and is not query 0.
MADTP_HD bool headmax_counted(int64_t i, int64_t j, int64_t lq, int64_t lk, bool causal) {
  return i > 0 && key_visible(i, j, lq, lk, causal);
}

// The running max over heads: a NaN wins whichever side it is on (torch.amax and the Triton kernel propagate
// it), so a NaN input reaches headmax as it reaches received; fmaxf would drop it.
MADTP_HD float nan_max(float a, float b) { return (b != b || b > a) ? b : a; }

// ---- P V on causal diagonal tiles ----------------------------------------------------------------------------
// The output sums p * v over the visible keys only (0 * NaN = NaN for a visible key; a hidden key is never
// read). The tensor-core P V of a tile also multiplies the hidden keys' v by p = 0, so a tile that hides keys
// and holds a non-finite v feeds the mma the finite part of v (pv_operand) and adds each visible non-finite
// term separately (pv_nonfinite_term): inf + -inf and NaN then propagate exactly as in the formula.

// Whether a causal tile of queries [m0, ..) and keys [n0, n0 + block_n) hides a real key from one of its
// real queries (the first query of the tile sees the fewest keys).
MADTP_HD bool tile_hides_keys(int64_t m0, int64_t n0, int64_t block_n, int64_t lq, int64_t lk, bool causal) {
  const int64_t last_key = (n0 + block_n < lk ? n0 + block_n : lk) - 1;
  return causal && last_key > m0 + lk - lq;
}

MADTP_HD float pv_operand(float v) { return std::isfinite(v) ? v : 0.0f; }

// p * v for a visible non-finite v (p = 0 or NaN gives NaN, as 0 * inf does), 0 otherwise.
MADTP_HD float pv_nonfinite_term(float p, float v, bool visible) {
  return visible && !std::isfinite(v) ? (p > 0.0f ? v : NAN) : 0.0f;
}

// ---- work list: one tile per (sequence, block of rows) -------------------------------------------------

MADTP_HD int64_t num_blocks(int64_t len, int64_t block) { return len > 0 ? ceil_div(len, block) : 0; }

// Upper bound on sum_b num_blocks(len_b) known without reading the lengths back to the host:
// each sequence wastes less than one block, and none is longer than max_len. Sizes the grid (no sync);
// blocks past the real tile count exit at once.
MADTP_HD int64_t tile_bound(int64_t total_rows, int64_t batch, int64_t max_len, int64_t block) {
  const int64_t by_total = total_rows / block + batch;
  const int64_t by_max = batch * num_blocks(max_len, block);
  return by_total < by_max ? by_total : by_max;
}

// Sequence owning tile t, given the exclusive prefix sum offsets[0..n] of per-sequence tile counts
// (offsets[0] = 0, offsets[n] = total, t < total): the last b with offsets[b] <= t, skipping sequences that
// own no tile. Binary search, so one very long sequence costs the same as many short ones.
template <typename Offsets>
MADTP_HD int64_t tile_sequence(const Offsets& offsets, int64_t n, int64_t t) {
  int64_t lo = 0, hi = n - 1;  // invariant: offsets[lo] <= t < offsets[hi + 1]
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace madtp
