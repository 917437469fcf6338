// Torch launcher of varlen attention (kernels in include/madtp/attention_kernels.cuh). The Python front end
// (madtp_kernels/attention.py) has validated cu_seqlens, indices and max_seqlen already; the checks here
// cover what a direct caller of torch.ops.madtp_kernels.varlen_attention_cuda could get wrong cheaply
// (device, dtype, shapes, contiguity), never anything that needs a device sync. The contents of cu_seqlens
// and the indices are trusted; a max_seqlen below a real length leaves the rows of the missing tiles unwritten.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "madtp/attention_kernels.cuh"
#include "madtp/attention_math.h"
#include "launch_checks.h"
#include "ops.h"

namespace madtp {
namespace {

void check_int32_vector(const at::Tensor& t, const char* name, const at::Device& device) {
  check_cuda_operand(t, name, device);
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
}

// cp.async moves 16-byte chunks, so every row must start 16-byte aligned: true for any D the kernel supports
// unless a storage offset misaligns the base. That rare view is copied once rather than compiled for.
at::Tensor aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

template <typename F>
void dispatch_half(at::ScalarType st, F&& f) {
  if (st == at::kHalf) f(__half{}); else f(__nv_bfloat16{});
}

template <typename F>
void dispatch_head_dim(int64_t d, F&& f) {
  switch (d) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 128>{}); break;
  }
}

template <typename Kernel>
void launch(Kernel kernel, int64_t tiles, int64_t heads, int smem, const attn::Params& p, cudaStream_t stream) {
  // Above 48 KiB (D = 128) dynamic shared memory must be opted into, per kernel.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(heads)), attn::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal,
    const std::optional<at::Tensor>& q_index, const std::optional<at::Tensor>& kv_index, bool return_stats,
    bool headmax_stats) {
  const at::Device device = q.device();
  check_cuda_operand(q, "q", device);
  const c10::cuda::CUDAGuard guard(q.device());
  check_cuda_operand(k, "k", device);
  check_cuda_operand(v, "v", device);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q must be float16 or bfloat16 (the CUDA kernel's tensor-core types), got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have q's dtype (", q.scalar_type(), "), got ",
              k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), "v must have q's dtype (", q.scalar_type(), "), got ",
              v.scalar_type());
  TORCH_CHECK(q.dim() == 3, "q must be [Pq, H, D], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3 && k.size(1) == q.size(1) && k.size(2) == q.size(2), "k must be [Pk, ", q.size(1), ", ",
              q.size(2), "] (q's heads and head dim), got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  const int64_t H = q.size(1), D = q.size(2);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, "q's head dim must be 32, 64 or 128 for the CUDA kernel, got ", D);
  TORCH_CHECK(H <= 65535, "q has ", H, " heads: more than the grid's y dimension (65535)");
  check_int32_vector(cu_seqlens_q, "cu_seqlens_q", device);
  check_int32_vector(cu_seqlens_k, "cu_seqlens_k", device);
  TORCH_CHECK(cu_seqlens_q.size(0) >= 1, "cu_seqlens_q must have B + 1 >= 1 entries, got shape ",
              cu_seqlens_q.sizes());
  TORCH_CHECK(cu_seqlens_k.size(0) == cu_seqlens_q.size(0), "cu_seqlens_k must have ", cu_seqlens_q.size(0),
              " entries (as cu_seqlens_q), got ", cu_seqlens_k.size(0));
  TORCH_CHECK(max_seqlen_q >= 0, "max_seqlen_q must be >= 0, got ", max_seqlen_q);
  TORCH_CHECK(max_seqlen_k >= 0, "max_seqlen_k must be >= 0, got ", max_seqlen_k);
  if (q_index) check_int32_vector(*q_index, "q_index", device);
  if (kv_index) check_int32_vector(*kv_index, "kv_index", device);

  const int64_t B = cu_seqlens_q.size(0) - 1;
  const int64_t Tq = q_index ? q_index->size(0) : q.size(0);
  const int64_t Tk = kv_index ? kv_index->size(0) : k.size(0);
  TORCH_CHECK(Tq + B * attn::kBlockM <= std::numeric_limits<int32_t>::max() &&
                  Tk + B * attn::kBlockN <= std::numeric_limits<int32_t>::max(),
              "too many tokens for the int32 work list: Tq = ", Tq, ", Tk = ", Tk, ", B = ", B);

  const auto stats_options = q.options().dtype(at::kFloat);
  auto out = at::empty({Tq, H, D}, q.options());
  auto received = at::empty({return_stats ? Tk : 0, H}, stats_options);
  auto cls = at::empty_like(received);
  auto lse = at::empty({Tq, H}, stats_options);
  // Every key is written by its tile (0 for a key no query counts for); only a call without work zeroes it here.
  auto headmax = at::empty({headmax_stats ? Tk : 0}, stats_options);
  const int64_t tiles_q = tile_bound(Tq, B, max_seqlen_q, attn::kBlockM);
  // The statistics and headmax kernels share the key-tile list.
  const int64_t tiles_k = return_stats || headmax_stats ? tile_bound(Tk, B, max_seqlen_k, attn::kBlockN) : 0;
  if (H == 0 || (tiles_q == 0 && tiles_k == 0)) return {out, received, cls, lse, headmax.zero_()};

  const at::Tensor qa = aligned(q), ka = aligned(k), va = aligned(v);
  auto tiles = at::empty({2 * (tiles_q + tiles_k)}, cu_seqlens_q.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  attn::TileLists lists{};
  lists.cu[0] = cu_seqlens_q.data_ptr<int32_t>();
  lists.cu[1] = cu_seqlens_k.data_ptr<int32_t>();
  lists.tiles[0] = tiles_q > 0 ? reinterpret_cast<int2*>(tiles.data_ptr<int32_t>()) : nullptr;
  lists.tiles[1] = tiles_k > 0 ? reinterpret_cast<int2*>(tiles.data_ptr<int32_t>()) + tiles_q : nullptr;
  lists.bound[0] = tiles_q;
  lists.bound[1] = tiles_k;
  lists.block[0] = attn::kBlockM;
  lists.block[1] = attn::kBlockN;
  lists.batch = static_cast<int>(B);
  attn::build_tiles_kernel<<<2, attn::kTileThreads, 0, stream>>>(lists);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  attn::Params p{};
  p.q = qa.data_ptr();
  p.k = ka.data_ptr();
  p.v = va.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.received = received.data_ptr<float>();
  p.cls = cls.data_ptr<float>();
  p.headmax = headmax.data_ptr<float>();
  p.cu_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_k = cu_seqlens_k.data_ptr<int32_t>();
  p.q_index = q_index ? q_index->data_ptr<int32_t>() : nullptr;
  p.kv_index = kv_index ? kv_index->data_ptr<int32_t>() : nullptr;
  p.heads = static_cast<int>(H);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.causal = causal;

  dispatch_half(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(D, [&](auto dim) {
      constexpr int kD = decltype(dim)::value;
      // The forward also covers sequences without keys (it writes their zeros and +inf LSEs), so it runs
      // whenever there are queries; the statistics kernel follows on the same stream and reads its LSE.
      if (tiles_q > 0) {
        p.tiles = reinterpret_cast<const int2*>(lists.tiles[0]);
        launch(attn::varlen_attention_fwd_kernel<T, kD>, tiles_q, H, attn::fwd_smem_bytes<T, kD>(), p, stream);
      }
      p.tiles = reinterpret_cast<const int2*>(lists.tiles[1]);
      if (tiles_k > 0 && return_stats) {
        launch(attn::varlen_attention_stats_kernel<T, kD>, tiles_k, H, attn::stats_smem_bytes<T, kD>(), p, stream);
      }
      if (tiles_k > 0 && headmax_stats) {  // one CTA per key tile for all heads
        launch(attn::varlen_attention_headmax_kernel<T, kD>, tiles_k, 1, attn::headmax_smem_bytes<T, kD>(), p,
               stream);
      }
    });
  });
  return {out, received, cls, lse, headmax};
}

}  // namespace madtp
