// Per-token math of the token ops (pack / unpack / prune_tokens), shared by the CUDA kernels and the
// host-side tests in csrc/tests. Torch-free and CUDA-free so that plain g++ compiles it: the kernels and
// the tests must agree bit for bit on which token is kept and how the merged token is weighted.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MADTP_HD __host__ __device__ __forceinline__
#else
#define MADTP_HD inline
#endif

namespace madtp {

// Token t of a sample survives pruning when it is one of the first keep_first tokens (CLS and friends) or
// its score beats the sample's threshold. Both sides are compared in fp32 whatever the input dtype, so
// the CUDA, Triton and torch backends agree on ties; a NaN score is never "greater" and is dropped.
MADTP_HD bool keep_token(int64_t t, int64_t keep_first, float score, float threshold) {
  return t < keep_first || score > threshold;
}

// Rows a sample owns after pruning: its kept tokens plus, when merging, one fused token, but only if
// something was dropped (a sample that keeps everything gets no empty merged token).
MADTP_HD int64_t pruned_rows(int64_t kept, int64_t length, bool merge) {
  return kept + ((merge && kept < length) ? 1 : 0);
}

// The merged token is sum_d w_d x_d / sum_d w_d with w = score (fp32). When the dropped weights sum to
// exactly zero (typically all dropped scores are 0) that quotient is undefined, and the merged token is
// the plain mean of the dropped tokens instead. Because weight_sum is known before any row is read
// (it depends on scores only), the kernels pick the weight per row up front and keep ONE accumulator
// per column instead of two: w = merge_weight(score, weight_sum), result = acc / merge_denominator(...).
// Non-finite values (README "Non-finite values", the rule of every backend): IEEE propagation over the
// dropped rows only. A NaN or infinite weight sum is not 0, so the mean stays weighted (and NaN); the kernels
// accumulate dropped rows only, so a kept row's values never reach the merged row.
MADTP_HD float merge_weight(float score, float weight_sum) { return weight_sum != 0.0f ? score : 1.0f; }

MADTP_HD float merge_denominator(float weight_sum, int64_t dropped) {
  return weight_sum != 0.0f ? weight_sum : static_cast<float>(dropped);
}

// unpack: output row (b, t) reads packed row cu_b + t when t is inside sample b, else it is padding (-1).
MADTP_HD int64_t unpack_source_row(int64_t cu_b, int64_t length_b, int64_t t) {
  return t < length_b ? cu_b + t : -1;
}

MADTP_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Compaction work is split into (sample, column chunk) items so that a sample's tokens are scanned in
// order by one block (its output positions are a running prefix) while wide rows still spread over
// several blocks. A zero-width row still needs one item per sample: that item writes kept_index.
MADTP_HD int64_t column_chunks(int64_t cols, int64_t chunk_width) {
  return cols > 0 ? ceil_div(cols, chunk_width) : 1;
}

// Columns [begin, begin + width) of chunk j; width may be 0 (C == 0) or shorter than chunk_width (tail).
MADTP_HD int64_t chunk_width(int64_t cols, int64_t chunk_cols, int64_t j) {
  const int64_t begin = j * chunk_cols;
  const int64_t rest = cols - begin;
  return rest <= 0 ? 0 : (rest < chunk_cols ? rest : chunk_cols);
}

}  // namespace madtp
