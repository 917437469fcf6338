// CUDA kernels of varlen attention on raw pointers (torch-free, like token_kernels.cuh).
//
// Forward: FlashAttention-2. A CTA of 4 warps owns one (sequence, 64-query block) tile of one head; each warp
// owns 16 query rows and keeps its Q fragments, S tile and O accumulator in registers, feeding the tensor
// cores with mma.sync.m16n8k16 (fp32 accumulation) from ldmatrix'ed shared memory. K and V blocks of 64 keys
// stream through shared memory with cp.async; the load of the next block overlaps the current one's math.
// The forward also writes each query's log-sum-exp (returned: backward passes recompute P from it).
// Statistics: a second kernel over (sequence, 64-key block) tiles recomputes S^T = K Q^T against every
// query block of the sequence and turns it into probabilities with the forward's per-row LSE, summing them
// in registers: received and cls without any [Lq, Lk] matrix and without atomics (one CTA owns a key block).
// headmax: a third kernel over the same key tiles, one CTA per tile for all heads: for each query block it
// loops over the heads (K and Q of the next head stream in while the current one's S^T is formed), keeps the
// running max over heads of each (key, query) probability in registers and adds it to the key's sum once the
// last head is done.
// Work lists: all grids run over flattened tile lists built on the device (build_tiles_kernel), so a
// sequence 1000x longer than the others gets 1000x the CTAs instead of leaving a padded grid idle.
//
// Fragment layouts are those of the PTX ISA for mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16x16, row): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16x8, col):  b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C (16x8, f32):  c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
// so the C fragments of S over 16 keys are, packed to 16 bit, the A fragment of P for P V (no shuffle).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "madtp/attention_math.h"

namespace madtp {
namespace attn {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// Every shared tile has 64 rows: 16 per warp (one mma row block), as query rows in the forward and as key
// rows in the statistics kernel; the key blocks streamed by the forward are as long.
constexpr int kTileRows = 16 * kWarps;
constexpr int kBlockM = kTileRows;  // query rows per forward tile and per statistics step
constexpr int kBlockN = kTileRows;  // keys per forward step and per statistics tile

// Shared-memory row stride in elements: 16 bytes of padding shift consecutive rows by 4 banks, so the 8 row
// addresses of every ldmatrix phase hit 8 disjoint bank quadruples (no swizzle needed). __host__ __device__:
// device code calls it outside constant expressions, which a host-only constexpr allows only under
// --expt-relaxed-constexpr (not used by this build).
template <int D>
__host__ __device__ constexpr int smem_stride() { return D + 8; }

struct Params {
  const void* q;  // [Pq, H, D] physical rows
  const void* k;  // [Pk, H, D]
  const void* v;  // [Pk, H, D]
  void* out;      // [Tq, H, D] logical rows
  float* lse;     // [Tq, H] natural log-sum-exp per query and head
  float* received;  // [Tk, H]
  float* cls;       // [Tk, H]
  float* headmax;   // [Tk]: sum over queries but the first of the max over heads of P (headmax kernel)
  const int32_t* cu_q;
  const int32_t* cu_k;
  const int32_t* q_index;   // logical query -> physical row of q (nullptr: identity)
  const int32_t* kv_index;  // logical key -> physical row of k and v (nullptr: identity)
  const int2* tiles;        // (sequence, block) per CTA; sequence -1 past the end of the list
  int heads;
  float scale_log2;  // softmax scale * log2(e)
  bool causal;
};

// ---- PTX wrappers ---------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; with valid == false nothing is read and the 16 bytes are zero-filled, so
// padding rows hold zeros (a garbage V row could be Inf/NaN, and 0 * NaN would poison the output).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two fp32 values as one register of two 16-bit values, lower address (first column) in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Max / sum over the 4 lanes (t = 0..3) that share a row of a C fragment.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- tile loads -----------------------------------------------------------------------------------------

// Rows [row0, row0 + rows) of a sequence starting at logical row `start`, head h, into a [kTileRows][stride] shared
// tile; rows past `rows` are zero-filled. With an index, each thread first reads the physical row of the
// logical row it copies (the same few index words for the whole CTA: L1 hits after the first warp), then
// the row: the gather costs one extra dependent load per tile, and no gathered copy ever exists.
template <typename T, int D>
__device__ __forceinline__ void load_rows(T* smem, const T* base, const int32_t* index, int64_t start, int64_t row0,
                                          int64_t rows, int heads, int h) {
  constexpr int kChunks = D * static_cast<int>(sizeof(T)) / 16;  // 16-byte chunks per row
  constexpr int kElems = 16 / sizeof(T);
  for (int c = threadIdx.x; c < kTileRows * kChunks; c += kThreads) {
    const int r = c / kChunks;
    const int col = (c % kChunks) * kElems;
    const bool valid = r < rows;
    int64_t row = start + row0 + r;
    if (valid && index != nullptr) row = index[row];
    const T* src = valid ? base + (row * heads + h) * D + col : base;
    cp_async_16(smem + r * smem_stride<D>() + col, src, valid);
  }
}

// ---- work list --------------------------------------------------------------------------------------------

// One CTA per list (blockIdx.x 0: query blocks of kBlockM rows, 1: key blocks of kBlockN rows) writes
// tiles[t] = (sequence, block) for t < total and (-1, 0) up to `bound` entries, the size of the consumer's
// grid. Sequences are scanned 256 at a time; each chunk's tiles are then written by all threads (a binary
// search over the chunk's offsets in shared memory), so a skewed sequence does not serialise on one thread.
constexpr int kTileThreads = 256;

struct TileLists {
  const int32_t* cu[2];
  int2* tiles[2];
  int64_t bound[2];
  int block[2];
  int batch;
};

__global__ void __launch_bounds__(kTileThreads) build_tiles_kernel(const TileLists lists) {
  using BlockScan = cub::BlockScan<int, kTileThreads>;
  __shared__ typename BlockScan::TempStorage scan;
  __shared__ int offsets[kTileThreads + 1];
  // Selects instead of lists.cu[blockIdx.x]: a runtime index into a kernel parameter array costs a local copy.
  const bool first = blockIdx.x == 0;
  const int32_t* cu = first ? lists.cu[0] : lists.cu[1];
  int2* tiles = first ? lists.tiles[0] : lists.tiles[1];
  const int64_t bound = first ? lists.bound[0] : lists.bound[1];
  const int block = first ? lists.block[0] : lists.block[1];
  if (tiles == nullptr) return;
  int written = 0;
  for (int b0 = 0; b0 < lists.batch; b0 += kTileThreads) {
    const int b = b0 + threadIdx.x;
    const int n = b < lists.batch ? static_cast<int>(num_blocks(cu[b + 1] - cu[b], block)) : 0;
    int offset, total;
    BlockScan(scan).ExclusiveSum(n, offset, total);
    offsets[threadIdx.x] = offset;
    if (threadIdx.x == 0) offsets[kTileThreads] = total;
    __syncthreads();
    for (int t = threadIdx.x; t < total; t += kTileThreads) {
      const int s = static_cast<int>(tile_sequence(offsets, kTileThreads, t));
      // The bound guard only matters for a max_seqlen below the real longest length (the Python front end
      // refuses that): tiles past the grid are dropped instead of written out of bounds.
      if (written + t < bound) tiles[written + t] = make_int2(b0 + s, t - offsets[s]);
    }
    written += total;
    __syncthreads();  // offsets and the scan storage are rewritten by the next chunk
  }
  for (int64_t t = written + threadIdx.x; t < bound; t += kTileThreads) tiles[t] = make_int2(-1, 0);
}

// ---- forward ----------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Adds to this lane's O fragments (rows qi[0], qi[1]; columns dt * 8 + 2 t + 0..1) the terms p * v of the
// visible keys of the tile whose v is not finite. Row g's probabilities are spread over its quad (lane t
// holds keys nt * 8 + 2 t + 0..1): each one is fetched with a shuffle. Rare path: only tiles with such a v.
template <typename T, int D>
__device__ __forceinline__ void nonfinite_pv(float (&o)[D / 8][4], const float (&s)[kBlockN / 8][4], const T* sV,
                                          const int64_t (&qi)[2], int64_t n0, int64_t n_rows, int64_t lq,
                                          int64_t lk, int lane) {
  const int t4 = lane % 4;
#pragma unroll
  for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
    for (int src = 0; src < 4; ++src) {
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        const int c = nt * 8 + src * 2 + e2;  // key within the tile
        const float pr[2] = {__shfl_sync(0xffffffffu, s[nt][e2], (lane & ~3) | src),
                             __shfl_sync(0xffffffffu, s[nt][2 + e2], (lane & ~3) | src)};
        if (c >= n_rows) continue;
        const bool vis[2] = {key_visible(qi[0], n0 + c, lq, lk, true), key_visible(qi[1], n0 + c, lq, lk, true)};
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x = to_float(sV[c * smem_stride<D>() + dt * 8 + t4 * 2 + e]);
            o[dt][e] += pv_nonfinite_term(pr[0], x, vis[0]);
            o[dt][2 + e] += pv_nonfinite_term(pr[1], x, vis[1]);
          }
        }
      }
    }
  }
}

template <typename T, int D>
__host__ __device__ constexpr int fwd_smem_bytes() { return (kBlockM + 2 * kBlockN) * smem_stride<D>() * static_cast<int>(sizeof(T)); }

// No minimum-blocks hint: a thread holds D/2 O, D/4 Q and 32 S fp32/packed registers (~215 in all for
// D = 128), which still fits 2 CTAs per SM (3 for D = 64); a tighter cap would trade that for spills.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) varlen_attention_fwd_kernel(const Params p) {
  static_assert(D % 16 == 0, "head dim must be a multiple of the mma k (16)");
  constexpr int kStride = smem_stride<D>();
  constexpr int kKSteps = D / 16;        // mma k-steps over the head dim (Q K^T)
  constexpr int kDTiles = D / 8;         // n8 tiles of the output (P V)
  constexpr int kNTiles = kBlockN / 8;   // n8 tiles of S

  const int2 tile = p.tiles[blockIdx.x];
  if (tile.x < 0) return;  // past the real work list: the grid is an upper bound
  const int h = blockIdx.y;
  const int64_t q_start = p.cu_q[tile.x], lq = p.cu_q[tile.x + 1] - q_start;
  const int64_t k_start = p.cu_k[tile.x], lk = p.cu_k[tile.x + 1] - k_start;
  const int64_t m0 = static_cast<int64_t>(tile.y) * kBlockM;
  const int64_t rows = lq - m0 < kBlockM ? lq - m0 : kBlockM;
  const int64_t n_end = key_end(m0 + rows, lq, lk, p.causal);
  const int n_blocks = static_cast<int>(num_blocks(n_end, kBlockN));

  extern __shared__ uint4 smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kStride;
  T* sV = sK + kBlockN * kStride;

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;

  if (n_blocks == 0) {  // no visible key for any row (lk == 0, or causal with lq > lk): zeros, lse +inf
    constexpr int kChunks = D * static_cast<int>(sizeof(T)) / 16;
    for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
      const int64_t r = q_start + m0 + c / kChunks;
      *reinterpret_cast<uint4*>(out + (r * p.heads + h) * D + (c % kChunks) * (16 / sizeof(T))) = make_uint4(0, 0, 0, 0);
    }
    for (int r = threadIdx.x; r < rows; r += kThreads) p.lse[(q_start + m0 + r) * p.heads + h] = INFINITY;
    return;
  }

  load_rows<T, D>(sQ, q, p.q_index, q_start, m0, rows, p.heads, h);
  load_rows<T, D>(sK, k, p.kv_index, k_start, 0, lk < kBlockN ? lk : kBlockN, p.heads, h);
  cp_async_commit();

  uint32_t qf[kKSteps][4];
  float o[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of this warp
  float row_sum[2] = {0.0f, 0.0f};            // this lane's partial sums; the quad adds them at the end
  const int64_t qi[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};

  for (int j = 0; j < n_blocks; ++j) {
    const int64_t n0 = static_cast<int64_t>(j) * kBlockN;
    const int64_t n_rows = lk - n0 < kBlockN ? lk - n0 : kBlockN;
    cp_async_wait_all();
    __syncthreads();  // K_j (and Q) landed; every warp is done with V_{j-1}, which is overwritten next
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        ldmatrix_x4(qf[kk], sQ + (warp * 16 + lane % 16) * kStride + kk * 16 + (lane / 16) * 8);
      }
    }
    load_rows<T, D>(sV, v, p.kv_index, k_start, n0, n_rows, p.heads, h);
    cp_async_commit();

    float s[kNTiles][4];
#pragma unroll
    for (int i = 0; i < kNTiles; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int nt = 0; nt < kNTiles; nt += 2) {
        // matrices: keys 0-7 / d 0-7, keys 0-7 / d 8-15, keys 8-15 / d 0-7, keys 8-15 / d 8-15
        uint32_t kf[4];
        ldmatrix_x4(kf, sK + (nt * 8 + lane % 8 + (lane / 16) * 8) * kStride + kk * 16 + ((lane / 8) % 2) * 8);
        mma_16816<T>(s[nt], qf[kk], kf[0], kf[1]);
        mma_16816<T>(s[nt + 1], qf[kk], kf[2], kf[3]);
      }
    }

    // Masks are needed on the causal diagonal and on the last, partial key block only; the test is uniform.
    const bool need_mask = p.causal || n0 + kBlockN > lk;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        float x = s[nt][e] * p.scale_log2;
        if (need_mask) x = mask_score(x, key_visible(qi[r], n0 + nt * 8 + t4 * 2 + e % 2, lq, lk, p.causal));
        s[nt][e] = x;
        tile_max[r] = fmaxf(tile_max[r], x);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float alpha = online_softmax_update(row_max[r], quad_max(tile_max[r]));
      row_sum[r] *= alpha;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = softmax_prob(s[nt][e], row_max[e / 2]);
        row_sum[e / 2] += s[nt][e];
      }
    }

    cp_async_wait_all();
    __syncthreads();  // V_j landed; every warp is done with K_j
    if (j + 1 < n_blocks) {
      const int64_t n1 = n0 + kBlockN;
      load_rows<T, D>(sK, k, p.kv_index, k_start, n1, lk - n1 < kBlockN ? lk - n1 : kBlockN, p.heads, h);
      cp_async_commit();
    }
    // A causal diagonal tile multiplies hidden keys' v by p = 0: with a non-finite v there (rare; uniform
    // test), add the visible non-finite terms here and feed the mma the finite part of V.
    if (tile_hides_keys(m0, n0, kBlockN, lq, lk, p.causal)) {
      bool bad = false;
      for (int c = threadIdx.x; c < n_rows * D; c += kThreads) bad |= !std::isfinite(to_float(sV[(c / D) * kStride + c % D]));
      if (__syncthreads_or(bad)) {
        nonfinite_pv<T, D>(o, s, sV, qi, n0, n_rows, lq, lk, lane);
        __syncthreads();  // every warp has read V's non-finite entries
        for (int c = threadIdx.x; c < n_rows * D; c += kThreads) {
          T& x = sV[(c / D) * kStride + c % D];
          if (!std::isfinite(to_float(x))) x = from_float<T>(0.0f);
        }
        __syncthreads();
      }
    }

#pragma unroll
    for (int kt = 0; kt < kBlockN / 16; ++kt) {
      const uint32_t pf[4] = {pack2<T>(s[2 * kt][0], s[2 * kt][1]), pack2<T>(s[2 * kt][2], s[2 * kt][3]),
                              pack2<T>(s[2 * kt + 1][0], s[2 * kt + 1][1]),
                              pack2<T>(s[2 * kt + 1][2], s[2 * kt + 1][3])};
#pragma unroll
      for (int dt = 0; dt < kDTiles; dt += 2) {
        // transposed matrices: keys 0-7 / d 0-7, keys 8-15 / d 0-7, keys 0-7 / d 8-15, keys 8-15 / d 8-15
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, sV + (kt * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kStride + dt * 8 + (lane / 16) * 8);
        mma_16816<T>(o[dt], pf, vf[0], vf[1]);
        mma_16816<T>(o[dt + 1], pf, vf[2], vf[3]);
      }
    }
  }

  // Normalise and stage the warp's 16 rows in its own rows of sQ (read only by this warp, at j == 0), so
  // the global stores are whole 16-byte chunks of each row.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(row_sum[r]);
    const float inv = softmax_inv_sum(total);
    T* dst = sQ + (warp * 16 + g + 8 * r) * kStride + t4 * 2;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      *reinterpret_cast<uint32_t*>(dst + dt * 8) = pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
    if (t4 == 0 && qi[r] < lq) p.lse[(q_start + qi[r]) * p.heads + h] = softmax_lse(row_max[r], total);
  }
  __syncwarp();
  constexpr int kChunks = D * static_cast<int>(sizeof(T)) / 16;
  for (int c = lane; c < 16 * kChunks; c += 32) {
    const int r = warp * 16 + c / kChunks;
    const int col = (c % kChunks) * (16 / sizeof(T));
    if (m0 + r < lq) {
      *reinterpret_cast<uint4*>(out + ((q_start + m0 + r) * p.heads + h) * D + col) =
          *reinterpret_cast<const uint4*>(sQ + r * kStride + col);
    }
  }
}

// ---- statistics -------------------------------------------------------------------------------------------

template <typename T, int D>
__host__ __device__ constexpr int stats_smem_bytes() {
  return (kBlockN + 2 * kBlockM) * smem_stride<D>() * static_cast<int>(sizeof(T)) + 2 * kBlockM * 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) varlen_attention_stats_kernel(const Params p) {
  constexpr int kStride = smem_stride<D>();
  constexpr int kKSteps = D / 16;
  constexpr int kQTiles = kBlockM / 8;  // n8 tiles of S^T (queries)

  const int2 tile = p.tiles[blockIdx.x];
  if (tile.x < 0) return;
  const int h = blockIdx.y;
  const int64_t q_start = p.cu_q[tile.x], lq = p.cu_q[tile.x + 1] - q_start;
  const int64_t k_start = p.cu_k[tile.x], lk = p.cu_k[tile.x + 1] - k_start;
  const int64_t n0 = static_cast<int64_t>(tile.y) * kBlockN;
  const int64_t n_rows = lk - n0 < kBlockN ? lk - n0 : kBlockN;
  const int64_t m_first = query_begin(n0, lq, lk, p.causal) / kBlockM;
  const int64_t m_blocks = num_blocks(lq, kBlockM);

  extern __shared__ uint4 smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sQ = sK + kBlockN * kStride;                                      // two buffers of kBlockM rows
  float* sL = reinterpret_cast<float*>(sQ + 2 * kBlockM * kStride);  // two buffers of kBlockM LSEs

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int64_t kj[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};  // this lane's keys

  // Query block mb (rows and LSEs) into buffer `buf`; LSEs of padding rows are zero-filled and never used
  // (key_visible is false there).
  const auto load_queries = [&](int64_t mb, int buf) {
    const int64_t m0 = mb * kBlockM;
    const int64_t rows = lq - m0 < kBlockM ? lq - m0 : kBlockM;
    load_rows<T, D>(sQ + buf * kBlockM * kStride, q, p.q_index, q_start, m0, rows, p.heads, h);
    if (threadIdx.x < kBlockM) {
      const bool valid = threadIdx.x < rows;
      const float* src = valid ? p.lse + (q_start + m0 + threadIdx.x) * p.heads + h : p.lse;
      cp_async_4(sL + buf * kBlockM + threadIdx.x, src, valid);
    }
  };

  float received[2] = {0.0f, 0.0f};
  float cls[2] = {0.0f, 0.0f};
  if (m_first < m_blocks) {
    load_rows<T, D>(sK, k, p.kv_index, k_start, n0, n_rows, p.heads, h);
    load_queries(m_first, 0);
    cp_async_commit();
  }
  uint32_t kf[kKSteps][4];
  for (int64_t mb = m_first; mb < m_blocks; ++mb) {
    const int buf = static_cast<int>(mb - m_first) % 2;
    cp_async_wait_all();
    __syncthreads();  // block mb landed; every warp is done with block mb - 1, whose buffer is refilled next
    if (mb == m_first) {
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        ldmatrix_x4(kf[kk], sK + (warp * 16 + lane % 16) * kStride + kk * 16 + (lane / 16) * 8);
      }
    }
    if (mb + 1 < m_blocks) {
      load_queries(mb + 1, buf ^ 1);
      cp_async_commit();
    }

    const T* sQb = sQ + buf * kBlockM * kStride;
    float s[kQTiles][4];
#pragma unroll
    for (int i = 0; i < kQTiles; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int nt = 0; nt < kQTiles; nt += 2) {
        uint32_t qf[4];
        ldmatrix_x4(qf, sQb + (nt * 8 + lane % 8 + (lane / 16) * 8) * kStride + kk * 16 + ((lane / 8) % 2) * 8);
        mma_16816<T>(s[nt], kf[kk], qf[0], qf[1]);
        mma_16816<T>(s[nt + 1], kf[kk], qf[2], qf[3]);
      }
    }
    const float* lse = sL + buf * kBlockM;
#pragma unroll
    for (int nt = 0; nt < kQTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + t4 * 2 + e % 2;  // query within the block
        const int64_t i = mb * kBlockM + col;
        const float prob = stats_prob(s[nt][e] * p.scale_log2, lse[col], key_visible(i, kj[e / 2], lq, lk, p.causal));
        received[e / 2] += prob;
        if (i == 0) cls[e / 2] = prob;
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float rec = quad_sum(received[r]);
    const float first = quad_sum(cls[r]);  // one lane of the quad holds query 0, the others 0
    if (t4 == 0 && kj[r] < lk) {
      p.received[(k_start + kj[r]) * p.heads + h] = rec;
      p.cls[(k_start + kj[r]) * p.heads + h] = first;
    }
  }
}


// ---- headmax ------------------------------------------------------------------------------------------------

// Two buffers, each a K tile, a Q block and its LSEs of one head.
template <typename T, int D>
__host__ __device__ constexpr int headmax_smem_bytes() {
  return 2 * (kBlockN + kBlockM) * smem_stride<D>() * static_cast<int>(sizeof(T)) + 2 * kBlockM * 4;
}

// Grid (key tiles, 1). Step it of a CTA is (query block m_first + it / H, head it % H): the max over heads of a
// (key, query) pair needs every head's probability of that pair, so the heads are the inner loop and the K tile
// of each head is reloaded (from L2) once per query block.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) varlen_attention_headmax_kernel(const Params p) {
  constexpr int kStride = smem_stride<D>();
  constexpr int kKSteps = D / 16;
  constexpr int kQTiles = kBlockM / 8;
  constexpr int kBufElems = (kBlockN + kBlockM) * kStride;

  const int2 tile = p.tiles[blockIdx.x];
  if (tile.x < 0) return;
  const int heads = p.heads;
  const int64_t q_start = p.cu_q[tile.x], lq = p.cu_q[tile.x + 1] - q_start;
  const int64_t k_start = p.cu_k[tile.x], lk = p.cu_k[tile.x + 1] - k_start;
  const int64_t n0 = static_cast<int64_t>(tile.y) * kBlockN;
  const int64_t n_rows = lk - n0 < kBlockN ? lk - n0 : kBlockN;
  const int64_t m_first = query_begin(n0, lq, lk, p.causal) / kBlockM;
  const int64_t steps = (num_blocks(lq, kBlockM) - m_first) * heads;

  extern __shared__ uint4 smem_raw[];
  T* sbuf = reinterpret_cast<T*>(smem_raw);                            // buffer b: K tile, then Q block
  float* sL = reinterpret_cast<float*>(sbuf + 2 * kBufElems);          // two buffers of kBlockM LSEs

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int64_t kj[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};  // this lane's keys

  // Step `it` (K tile and Q block of its head, the block's LSEs) into buffer `buf`; LSEs of padding rows are
  // zero-filled and never used (headmax_counted is false there).
  const auto load_step = [&](int64_t it, int buf) {
    const int h = static_cast<int>(it % heads);
    const int64_t m0 = (m_first + it / heads) * kBlockM;
    const int64_t rows = lq - m0 < kBlockM ? lq - m0 : kBlockM;
    T* dst = sbuf + buf * kBufElems;
    load_rows<T, D>(dst, k, p.kv_index, k_start, n0, n_rows, heads, h);
    load_rows<T, D>(dst + kBlockN * kStride, q, p.q_index, q_start, m0, rows, heads, h);
    if (threadIdx.x < kBlockM) {
      const bool valid = threadIdx.x < rows;
      const float* src = valid ? p.lse + (q_start + m0 + threadIdx.x) * heads + h : p.lse;
      cp_async_4(sL + buf * kBlockM + threadIdx.x, src, valid);
    }
  };

  float sum[2] = {0.0f, 0.0f};
  float pmax[kQTiles][4];
#pragma unroll
  for (int i = 0; i < kQTiles; ++i) pmax[i][0] = pmax[i][1] = pmax[i][2] = pmax[i][3] = 0.0f;
  if (steps > 0) {
    load_step(0, 0);
    cp_async_commit();
  }
  for (int64_t it = 0; it < steps; ++it) {
    const int buf = static_cast<int>(it % 2);
    const int h = static_cast<int>(it % heads);
    const int64_t mb = m_first + it / heads;
    cp_async_wait_all();
    __syncthreads();  // step it landed; every warp is done with step it - 1, whose buffer is refilled next
    if (it + 1 < steps) {
      load_step(it + 1, buf ^ 1);
      cp_async_commit();
    }
    const T* sK = sbuf + buf * kBufElems;
    const T* sQb = sK + kBlockN * kStride;
    uint32_t kf[kKSteps][4];
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      ldmatrix_x4(kf[kk], sK + (warp * 16 + lane % 16) * kStride + kk * 16 + (lane / 16) * 8);
    }
    float s[kQTiles][4];
#pragma unroll
    for (int i = 0; i < kQTiles; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int nt = 0; nt < kQTiles; nt += 2) {
        uint32_t qf[4];
        ldmatrix_x4(qf, sQb + (nt * 8 + lane % 8 + (lane / 16) * 8) * kStride + kk * 16 + ((lane / 8) % 2) * 8);
        mma_16816<T>(s[nt], kf[kk], qf[0], qf[1]);
        mma_16816<T>(s[nt + 1], kf[kk], qf[2], qf[3]);
      }
    }
    const float* lse = sL + buf * kBlockM;
    const bool last_head = h == heads - 1;
#pragma unroll
    for (int nt = 0; nt < kQTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + t4 * 2 + e % 2;  // query within the block
        const int64_t i = mb * kBlockM + col;
        const float prob = stats_prob(s[nt][e] * p.scale_log2, lse[col], headmax_counted(i, kj[e / 2], lq, lk,
                                                                                         p.causal));
        pmax[nt][e] = nan_max(pmax[nt][e], prob);
        if (last_head) {  // every head of this query block seen: the pair's max is final
          sum[e / 2] += pmax[nt][e];
          pmax[nt][e] = 0.0f;
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(sum[r]);
    if (t4 == 0 && kj[r] < lk) p.headmax[k_start + kj[r]] = total;
  }
}

}  // namespace attn
}  // namespace madtp
