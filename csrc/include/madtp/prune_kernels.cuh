// CUDA kernels of score_and_prune on raw pointers. Torch headers MUST NOT be included here (see
// token_kernels.cuh). The op runs as three launches, none of which needs the host to know a size:
//   1. score_kernel, one block per sample: TIS of every row, theta of every sample, and the keep decision
//      encoded for the compaction (prune_math.h: decision_score / decision_threshold);
//   2. compact_rows_kernel of prune_tokens (token_kernels.cuh) on those decisions with keep_first = 1: the new
//      cu_seqlens (its own per-sample counts and scan), kept rows in order, kept_index, the merged rows;
//   3. finish_kernel: protected flags of the output rows, zeros in every capacity row past cu_new[B].
// The score kernel does not depend on x's dtype (it never reads x), and the compaction's instantiations are
// prune_tokens' own: the op adds two kernels to the fatbin.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "madtp/prune_math.h"
#include "madtp/token_kernels.cuh"  // kThreads, ScoreType, load_score

namespace madtp {

static_assert(kPruneWarps * 32 == kThreads, "score_kernel: one warp per token row, kPruneWarps warps per block");

struct ScoreParams {
  const int32_t* cu_seqlens;  // [B + 1]
  const float* received;      // [T, H]
  const float* cls;           // [T, H]
  const void* attn_out;       // [T, H, D], attn_type
  ScoreType attn_type;
  const float* align;           // [T, K]
  const bool* protected_rows;   // [T] or nullptr
  const float* headmax;         // [T]: read only when official
  bool official;                // importance="official" (else "minmax")
  bool merge;                   // the no-saving rule applies only with a merged row
  int64_t batch;
  int64_t rows;  // T: the stride of the terms' planes
  int64_t heads;
  int64_t head_dim;
  int64_t num_align;  // K
  float temperature;
  float* importance;          // [T] out: TIS, 0 on rows that are not candidates
  float* theta;               // [B] out
  float* decision;            // [T] out: decision_score of every row (the compaction's scores)
  float* decision_threshold;  // [B] out: decision_threshold of every sample (the compaction's thresholds)
  float* terms;               // [3, T] workspace: the raw received / cls / alignment terms of the candidates
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = nan_min(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Residency hint: 4 blocks of 8 warps per SM allows 64 registers. Without it CUDA 13's ptxas packs the kernel
// for sm_90a into 40 registers and spills (as for the compaction, see kCompactMinBlocksPerSm).
constexpr int kScoreMinBlocksPerSm = 4;

// Launch: grid = B, block = kThreads, dynamic shared memory = H floats (the head weights).
// Every sum and reduction has a fixed order (xor trees, warps merged in index order): deterministic.
// Three passes over a sample, each a loop over tiles of its tokens, so any length works:
//   A. warp per row (lanes across heads / alignment tokens, coalesced): the three raw terms, and their
//      min / max over the candidates;
//   B. thread per row: TIS from the normalised terms, and the decision score;
//   C. per tile of kAlignTile alignment tokens, lane = k, warps split the rows: online softmax of
//      A_ik / temperature weighting TIS, the warps' states merged in order; theta = min over all k;
//   D. (merge) the dropped candidates counted; exactly one (keeps_all): its decision score becomes +inf.
// official: pass A reads headmax and each row's own head norms (a warp per row, lanes across head_dim, heads in
// order) and sums r and a over the candidates instead of their ranges; pass B divides by those sums.
__global__ void __launch_bounds__(kThreads, kScoreMinBlocksPerSm) score_kernel(const ScoreParams p) {
  extern __shared__ float head_w[];  // [H]
  __shared__ float norm_total;
  __shared__ TermRange ranges[kPruneWarps][3];
  __shared__ float sums[kPruneWarps][2];  // official: the warps' sums of r and a over their candidates
  __shared__ float theta_all;
  __shared__ SoftmaxState states[kPruneWarps][kAlignTile];

  const int64_t b = blockIdx.x;
  const int64_t start = p.cu_seqlens[b];
  const int64_t len = static_cast<int64_t>(p.cu_seqlens[b + 1]) - start;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (len <= 0) {  // uniform over the block
    if (threadIdx.x == 0) {
      p.theta[b] = 0.0f;
      p.decision_threshold[b] = decision_threshold(0.0f);
    }
    return;
  }
  const int64_t H = p.heads, K = p.num_align;

  // Head weights from the first row's attention output (minmax only).
  for (int64_t h = warp; h < H && !p.official; h += kPruneWarps) {
    float sq = 0.0f;
    for (int64_t d = lane; d < p.head_dim; d += 32) {
      const float v = load_score(p.attn_out, p.attn_type, (start * H + h) * p.head_dim + d);
      sq += v * v;
    }
    sq = warp_sum(sq);
    if (lane == 0) head_w[h] = sqrtf(sq);
  }
  __syncthreads();
  if (warp == 0 && !p.official) {
    float s = 0.0f;
    for (int64_t h = lane; h < H; h += 32) s += head_w[h];
    s = warp_sum(s);
    if (lane == 0) norm_total = s;
  }
  __syncthreads();
  const float total = norm_total;
  for (int64_t h = threadIdx.x; h < H && !p.official; h += kThreads) head_w[h] = head_weight(head_w[h], total);
  __syncthreads();

  // Pass A.
  TermRange rr = empty_range(), rc = empty_range(), ra = empty_range();
  float sum_r = 0.0f, sum_a = 0.0f;
  for (int64_t i = warp; i < len; i += kPruneWarps) {
    const int64_t row = start + i;
    if (!is_candidate(i, p.protected_rows != nullptr && p.protected_rows[row])) continue;  // uniform per warp
    float r = -INFINITY, c = 0.0f, a = -INFINITY;
    if (p.official) {
      r = p.headmax[row];
      float weighted = 0.0f, norm_sum = 0.0f;  // lane-uniform after each warp_sum
      for (int64_t h = 0; h < H; ++h) {
        float sq = 0.0f;
        for (int64_t d = lane; d < p.head_dim; d += 32) {
          const float v = load_score(p.attn_out, p.attn_type, (row * H + h) * p.head_dim + d);
          sq += v * v;
        }
        const float n = sqrtf(warp_sum(sq));
        weighted += p.cls[row * H + h] * n;
        norm_sum += n;
      }
      c = official_cls_term(weighted, norm_sum);
    } else {
      for (int64_t h = lane; h < H; h += 32) {
        r = nan_max(r, p.received[row * H + h]);
        c += head_w[h] * p.cls[row * H + h];
      }
      r = warp_max(r);
      c = warp_sum(c);
    }
    for (int64_t k = lane; k < K; k += 32) a = nan_max(a, p.align[row * K + k]);
    a = warp_max(a);
    sum_r += r;
    sum_a += a;
    rr = range_add(rr, r);
    rc = range_add(rc, c);
    ra = range_add(ra, a);
    if (lane == 0) {
      p.terms[row] = r;
      p.terms[p.rows + row] = c;
      p.terms[2 * p.rows + row] = a;
    }
  }
  if (lane == 0) {
    ranges[warp][0] = rr;
    ranges[warp][1] = rc;
    ranges[warp][2] = ra;
    sums[warp][0] = sum_r;
    sums[warp][1] = sum_a;
  }
  __syncthreads();  // also publishes the terms (global memory, same block)
  rr = ranges[0][0], rc = ranges[0][1], ra = ranges[0][2];
  sum_r = sums[0][0], sum_a = sums[0][1];
#pragma unroll
  for (int w = 1; w < kPruneWarps; ++w) {
    rr = range_merge(rr, ranges[w][0]);
    rc = range_merge(rc, ranges[w][1]);
    ra = range_merge(ra, ranges[w][2]);
    sum_r += sums[w][0];
    sum_a += sums[w][1];
  }

  // Pass B.
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    const int64_t row = start + i;
    const bool cand = is_candidate(i, p.protected_rows != nullptr && p.protected_rows[row]);
    const float r = p.terms[row], c = p.terms[p.rows + row], a = p.terms[2 * p.rows + row];
    const float tis = !cand        ? 0.0f
                      : p.official ? official_importance(r, c, a, sum_r, sum_a)
                                   : token_importance(r, c, a, rr, rc, ra);
    p.importance[row] = tis;
    p.decision[row] = decision_score(cand, tis);
  }
  __syncthreads();  // publishes the TIS

  // Pass C. A_ik / temperature is a division, not a product with a reciprocal: the reference's rounding.
  float theta = INFINITY;  // lane's running min over its alignment tokens (used in warp 0)
  for (int64_t k0 = 0; k0 < K; k0 += kAlignTile) {
    const int64_t k = k0 + lane;
    SoftmaxState st = empty_softmax();
    if (k < K) {
      for (int64_t i = warp; i < len; i += kPruneWarps) {
        const int64_t row = start + i;
        if (!is_candidate(i, p.protected_rows != nullptr && p.protected_rows[row])) continue;
        st = softmax_add(st, p.align[row * K + k] / p.temperature, p.importance[row]);
      }
    }
    states[warp][lane] = st;
    __syncthreads();
    if (warp == 0) {
      SoftmaxState merged = states[0][lane];
#pragma unroll
      for (int w = 1; w < kPruneWarps; ++w) merged = softmax_merge(merged, states[w][lane]);
      if (k < K) theta = threshold_add(theta, softmax_value(merged));
    }
    __syncthreads();  // states is rewritten by the next tile
  }
  if (warp == 0) {
    theta = warp_min(theta);
    if (lane == 0) {
      p.theta[b] = theta;
      p.decision_threshold[b] = decision_threshold(theta);
      theta_all = theta;
    }
  }
  if (!p.merge) return;  // uniform over the block

  // Pass D. Each thread re-reads only the rows it wrote in pass B (same i), so the decisions need no barrier.
  __syncthreads();  // publishes theta_all
  const float th = theta_all;
  int dropped = 0;
  for (int64_t base = 0; base < len; base += kThreads) {  // uniform trip count: __syncthreads_count in every one
    const int64_t i = base + threadIdx.x;
    bool drop = false;
    if (i < len) {
      const int64_t row = start + i;
      const bool cand = is_candidate(i, p.protected_rows != nullptr && p.protected_rows[row]);
      drop = !keep_row(cand, p.importance[row], th);
    }
    dropped += __syncthreads_count(drop);
  }
  if (!keeps_all(true, dropped)) return;
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    const int64_t row = start + i;
    const bool cand = is_candidate(i, p.protected_rows != nullptr && p.protected_rows[row]);
    if (!keep_row(cand, p.importance[row], th)) p.decision[row] = decision_score(false, 0.0f);
  }
}

struct FinishParams {
  const int32_t* cu_out;  // [B + 1]: the compaction's offsets; rows at and past cu_out[B] are capacity
  int64_t batch;
  int64_t rows;               // T
  int32_t* kept_index;        // [T]: capacity entries set to 0
  const bool* protected_in;   // [T] or nullptr
  bool* protected_out;        // [T] (nullptr when protected_in is)
  unsigned char* y;           // [T, C] as bytes: capacity rows zeroed
  int64_t row_bytes;
};

// Grid-stride over rows (flags) and over the contiguous capacity tail of y (16-byte stores in the aligned
// middle, single bytes at its two ends), so it works for any width and dtype without a template.
__global__ void __launch_bounds__(kThreads) finish_kernel(const FinishParams p) {
  const int64_t n = p.cu_out[p.batch];
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = tid; r < p.rows; r += stride) {
    if (r < n) {
      if (p.protected_out != nullptr) {
        const int32_t src = p.kept_index[r];
        p.protected_out[r] = src >= 0 && p.protected_in[src];
      }
    } else {
      p.kept_index[r] = 0;
      if (p.protected_out != nullptr) p.protected_out[r] = false;
    }
  }
  const int64_t begin = n * p.row_bytes, end = p.rows * p.row_bytes;
  if (begin >= end) return;
  const uintptr_t base = reinterpret_cast<uintptr_t>(p.y);
  int64_t mid_begin = begin + static_cast<int64_t>((16 - ((base + begin) & 15)) & 15);
  if (mid_begin > end) mid_begin = end;
  const int64_t mid_end = mid_begin + ((end - mid_begin) & ~int64_t{15});
  if (tid < mid_begin - begin) p.y[begin + tid] = 0;
  if (tid < end - mid_end) p.y[mid_end + tid] = 0;
  uint4* mid = reinterpret_cast<uint4*>(p.y + mid_begin);
  for (int64_t v = tid; v < (mid_end - mid_begin) / 16; v += stride) mid[v] = make_uint4(0, 0, 0, 0);
}

}  // namespace madtp
