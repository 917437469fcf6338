// CUDA kernels of the token ops on raw pointers. Torch headers MUST NOT be included here: the kernels know
// nothing of tensors, so C++ users (CMake target madtp_kernels_cuda) and the torch launchers share them.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "madtp/token_ops.h"

namespace madtp {

constexpr int kThreads = 256;  // one token per thread per scan tile; 8 warps copy 8 rows at a time
constexpr int kWarps = kThreads / 32;
// Residency the compaction kernel is compiled for: 3 x 8 warps per SM to hide the row loads' latency, i.e.
// at most 80 registers, which it fits without spills. Without the hint, CUDA 13's ptxas squeezes the kernel
// for sm_90a into 40-64 registers and spills.
constexpr int kCompactMinBlocksPerSm = 3;

// Scores may come in any float dtype, independently of x. Reading them through a runtime switch (uniform
// across the grid, so no divergence) instead of a template parameter keeps 3 instead of 9 instantiations
// of each kernel; scores are C times less traffic than the rows, so the switch costs nothing measurable.
enum class ScoreType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float load_score(const void* p, ScoreType type, int64_t i) {
  switch (type) {
    case ScoreType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case ScoreType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// kVec consecutive elements moved as one 16-byte (or narrower) access; kVec == 1 is the fallback for rows
// whose width or base address does not allow vector access.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) VecT {
  T v[kVec];
};

// Inputs of the compaction kernel. pack reads a dense [B, N, C] x with a bool mask; prune reads packed rows
// [T, C] described by cu_seqlens and decides with scores / threshold. Both write kept rows contiguously,
// sample after sample, and the new cu_seqlens; prune also writes kept_index and the merged rows.
struct CompactParams {
  const void* x;
  void* y;
  int64_t batch;
  int64_t cols;
  int64_t num_chunks;  // column chunks per sample, >= 1 (see column_chunks)
  // pack
  const bool* mask;
  int64_t seq_len;  // N
  // prune
  const int32_t* cu_seqlens;
  const void* scores;
  const void* threshold;
  ScoreType score_type;
  int64_t keep_first;
  bool merge;
  int32_t* kept_index;
  // outputs and workspace
  int32_t* cu_out;     // [B + 1]
  int32_t* kept;       // [B] workspace: kept tokens per sample
  float* weight_sum;   // [B] workspace: sum of dropped scores per sample (prune only)
};

template <bool kPack>
__device__ __forceinline__ int64_t sample_start(const CompactParams& p, int64_t b) {
  return kPack ? b * p.seq_len : static_cast<int64_t>(p.cu_seqlens[b]);
}

template <bool kPack>
__device__ __forceinline__ int64_t sample_length(const CompactParams& p, int64_t b) {
  return kPack ? p.seq_len : static_cast<int64_t>(p.cu_seqlens[b + 1]) - p.cu_seqlens[b];
}

// Single-launch compaction as a persistent cooperative kernel (launch with cudaLaunchCooperativeKernel and
// a grid no larger than what is co-resident). Why this instead of a decoupled look-back scan: output
// positions are a prefix over samples, but the merged row needs a full per-sample reduction whose weight
// rule (plain mean iff the dropped weights sum to exactly 0) must be known before rows are accumulated.
// Three phases separated by grid-wide barriers give both without atomics, deterministically:
//   1. per sample: kept count and dropped-score sum (block reductions over the scores only);
//   2. block 0: exclusive scan of output rows per sample -> cu_out;
//   3. per (sample, column chunk): block scan over keep flags, tile by tile, copies kept rows in order,
//      accumulates the dropped rows in fp32 registers and writes the merged row.
// Known limit: a sample is walked by one block per column chunk, so one sample 1000x longer than the rest
// serialises on few blocks (correct, but slower than a token-split would be).
template <typename T, int kVec, bool kPack>
__global__ void __launch_bounds__(kThreads, kCompactMinBlocksPerSm) compact_rows_kernel(const CompactParams p) {
  using BlockScan = cub::BlockScan<int, kThreads>;
  using ReduceInt = cub::BlockReduce<int, kThreads>;
  using ReduceFloat = cub::BlockReduce<float, kThreads>;
  constexpr int kChunkCols = 32 * kVec;  // a warp moves one row of a column chunk per step

  __shared__ union {
    typename BlockScan::TempStorage scan;
    typename ReduceInt::TempStorage reduce_int;
    typename ReduceFloat::TempStorage reduce_float;
  } tmp;
  __shared__ int64_t kept_rows[kThreads];
  __shared__ int64_t dropped_rows[kPack ? 1 : kThreads];
  __shared__ float dropped_w[kPack ? 1 : kThreads];
  __shared__ float partial[kPack ? 1 : kWarps][kPack ? 1 : kChunkCols];

  const auto grid = cooperative_groups::this_grid();
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ y = static_cast<T*>(p.y);

  // Phase 1.
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const int64_t start = sample_start<kPack>(p, b);
    const int64_t len = sample_length<kPack>(p, b);
    const float thr = kPack ? 0.0f : load_score(p.threshold, p.score_type, b);
    int kept = 0;
    float wsum = 0.0f;
    for (int64_t t = threadIdx.x; t < len; t += kThreads) {
      if constexpr (kPack) {
        kept += p.mask[start + t] ? 1 : 0;
      } else {
        const float s = load_score(p.scores, p.score_type, start + t);
        if (keep_token(t, p.keep_first, s, thr)) ++kept; else wsum += s;
      }
    }
    kept = ReduceInt(tmp.reduce_int).Sum(kept);
    __syncthreads();
    if constexpr (!kPack) wsum = ReduceFloat(tmp.reduce_float).Sum(wsum);
    if (threadIdx.x == 0) {
      p.kept[b] = kept;
      if constexpr (!kPack) p.weight_sum[b] = wsum;
    }
    __syncthreads();
  }
  grid.sync();

  // Phase 2: B is small next to T (one value per sample), so one block scanning it costs microseconds.
  if (blockIdx.x == 0) {
    int running = 0;
    for (int64_t b0 = 0; b0 < p.batch; b0 += kThreads) {
      const int64_t b = b0 + threadIdx.x;
      int rows = 0;
      if (b < p.batch) {
        rows = kPack ? p.kept[b]
                     : static_cast<int>(pruned_rows(p.kept[b], sample_length<kPack>(p, b), p.merge));
      }
      int offset, total;
      BlockScan(tmp.scan).ExclusiveSum(rows, offset, total);
      if (b < p.batch) p.cu_out[b] = running + offset;
      running += total;
      __syncthreads();
    }
    if (threadIdx.x == 0) p.cu_out[p.batch] = running;
  }
  grid.sync();

  // Phase 3.
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t items = p.batch * p.num_chunks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t b = item / p.num_chunks;
    const int64_t chunk = item % p.num_chunks;
    const int64_t col = chunk * kChunkCols + lane * kVec;  // this lane's first column
    // kVec > 1 only when cols % kVec == 0, so a lane's kVec columns are all in or all out.
    const bool lane_active = lane * kVec < chunk_width(p.cols, kChunkCols, chunk);
    const int64_t start = sample_start<kPack>(p, b);
    const int64_t len = sample_length<kPack>(p, b);
    const int64_t out_base = p.cu_out[b];
    const float thr = kPack ? 0.0f : load_score(p.threshold, p.score_type, b);
    const float wsum = kPack ? 0.0f : p.weight_sum[b];
    const bool write_index = !kPack && chunk == 0;  // one chunk per sample owns kept_index

    float acc[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[v] = 0.0f;
    int64_t kept_so_far = 0;
    int64_t dropped_so_far = 0;

    for (int64_t t0 = 0; t0 < len; t0 += kThreads) {
      const int64_t t = t0 + threadIdx.x;
      const bool in = t < len;
      bool keep = false;
      float w = 0.0f;
      if (in) {
        if constexpr (kPack) {
          keep = p.mask[start + t];
        } else {
          const float s = load_score(p.scores, p.score_type, start + t);
          keep = keep_token(t, p.keep_first, s, thr);
          w = merge_weight(s, wsum);
        }
      }
      int kpos, tile_kept;
      BlockScan(tmp.scan).ExclusiveSum(keep ? 1 : 0, kpos, tile_kept);
      if (in) {
        if (keep) {
          kept_rows[kpos] = start + t;
          if (write_index) p.kept_index[out_base + kept_so_far + kpos] = static_cast<int32_t>(start + t);
        } else if constexpr (!kPack) {
          // Every thread before an in-range thread is in range, so the dropped ones before it number
          // threadIdx.x - kpos: dropped rows stay in token order too (fixed summation order).
          dropped_rows[threadIdx.x - kpos] = start + t;
          dropped_w[threadIdx.x - kpos] = w;
        }
      }
      __syncthreads();
      const int tile_len = static_cast<int>(len - t0 < kThreads ? len - t0 : kThreads);
      const int tile_dropped = tile_len - tile_kept;
      if (lane_active) {
        for (int i = warp; i < tile_kept; i += kWarps) {
          const int64_t dst = out_base + kept_so_far + i;
          *reinterpret_cast<VecT<T, kVec>*>(y + dst * p.cols + col) =
              *reinterpret_cast<const VecT<T, kVec>*>(x + kept_rows[i] * p.cols + col);
        }
        if constexpr (!kPack) {
          if (p.merge) {
            for (int i = warp; i < tile_dropped; i += kWarps) {
              const VecT<T, kVec> r = *reinterpret_cast<const VecT<T, kVec>*>(x + dropped_rows[i] * p.cols + col);
#pragma unroll
              for (int v = 0; v < kVec; ++v) acc[v] += dropped_w[i] * to_float(r.v[v]);
            }
          }
        }
      }
      kept_so_far += tile_kept;
      dropped_so_far += tile_dropped;
      __syncthreads();  // the row lists are rewritten by the next tile
    }

    if constexpr (!kPack) {
      if (p.merge && dropped_so_far > 0) {
        // Warps summed disjoint row subsets; adding them in warp order keeps the result deterministic.
        if (lane_active) {
#pragma unroll
          for (int v = 0; v < kVec; ++v) partial[warp][lane * kVec + v] = acc[v];
        }
        __syncthreads();
        const int64_t out_row = out_base + kept_so_far;
        const float denom = merge_denominator(wsum, dropped_so_far);
        const int64_t width = chunk_width(p.cols, kChunkCols, chunk);
        for (int c = threadIdx.x; c < width; c += kThreads) {
          float s = 0.0f;
#pragma unroll
          for (int w2 = 0; w2 < kWarps; ++w2) s += partial[w2][c];
          y[out_row * p.cols + chunk * kChunkCols + c] = from_float<T>(s / denom);
        }
        if (write_index && threadIdx.x == 0) p.kept_index[out_row] = -1;
        __syncthreads();
      }
    }
  }
}

// unpack: one warp per output row (b, t), lanes across columns; padding rows never read the input.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) unpack_kernel(const T* __restrict__ packed, const int32_t* cu,
                                                          int64_t batch, int64_t max_len, int64_t cols,
                                                          float pad_value, T* __restrict__ out) {
  const int64_t rows = batch * max_len;
  const int lane = threadIdx.x % 32;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarps;
  VecT<T, kVec> pad;
#pragma unroll
  for (int v = 0; v < kVec; ++v) pad.v[v] = from_float<T>(pad_value);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; r < rows; r += warps_total) {
    const int64_t b = r / max_len;
    const int64_t src = unpack_source_row(cu[b], static_cast<int64_t>(cu[b + 1]) - cu[b], r % max_len);
    for (int64_t c = static_cast<int64_t>(lane) * kVec; c < cols; c += 32 * kVec) {
      *reinterpret_cast<VecT<T, kVec>*>(out + r * cols + c) =
          src >= 0 ? *reinterpret_cast<const VecT<T, kVec>*>(packed + src * cols + c) : pad;
    }
  }
}

}  // namespace madtp
