// Torch launchers of the token ops. The Python front end has validated everything already; the checks here
// are the last line of defence for callers that reach torch.ops.madtp_kernels.* directly.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>

#include "madtp/token_kernels.cuh"
#include "madtp/token_ops.h"
#include "launch_checks.h"
#include "ops.h"

namespace madtp {
namespace {

void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", st);
}

void check_cu_seqlens(const at::Tensor& cu, const at::Device& device) {
  check_cuda_operand(cu, "cu_seqlens", device);
  TORCH_CHECK(cu.scalar_type() == at::kInt, "cu_seqlens must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, "cu_seqlens must be 1-D with B + 1 >= 1 entries, got shape ",
              cu.sizes());
}

ScoreType score_type_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return ScoreType::kFloat16;
    case at::kBFloat16: return ScoreType::kBFloat16;
    default: return ScoreType::kFloat32;
  }
}

// Calls f with the CUDA element type of a float tensor (the kernels are torch-free, so no c10::Half).
template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: f(float{}); break;
  }
}

// 16-byte accesses need every row start aligned: a width that is a multiple of the vector and 16-byte
// aligned base pointers (a storage offset can break that even for contiguous tensors).
bool can_vectorize(int64_t cols, int64_t vec, std::initializer_list<const void*> ptrs) {
  if (cols % vec != 0) return false;
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

template <typename T, bool kPack>
void launch_compact(CompactParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = can_vectorize(p.cols, kVec, {p.x, p.y});
  const int64_t chunk_cols = 32 * (vec ? kVec : 1);
  p.num_chunks = column_chunks(p.cols, chunk_cols);
  const void* kernel = vec ? reinterpret_cast<const void*>(&compact_rows_kernel<T, kVec, kPack>)
                           : reinterpret_cast<const void*>(&compact_rows_kernel<T, 1, kPack>);

  // A cooperative grid must be co-resident: at most occupancy x SMs blocks. Fewer when there is less
  // work, since every block pays the grid barriers.
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, 0));
  TORCH_CHECK(blocks_per_sm > 0, "compact_rows_kernel cannot be resident on this GPU");
  const int64_t resident = static_cast<int64_t>(blocks_per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t work = std::max<int64_t>(1, p.batch * p.num_chunks);
  const dim3 grid(static_cast<unsigned>(std::min(resident, work)));
  void* args[] = {&p};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, grid, dim3(kThreads), args, 0, stream));
}

// The output size depends on the data: read it back once (one stream sync), then hand out exact-size views
// of the upper-bound buffers.
int64_t total_rows(const at::Tensor& cu_out) { return cu_out[cu_out.size(0) - 1].item<int64_t>(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> pack_cuda(const at::Tensor& x, const at::Tensor& mask) {
  check_cuda_operand(x, "x", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda_operand(mask, "mask", x.device());
  check_float_dtype(x, "x");
  TORCH_CHECK(x.dim() == 3, "x must be [B, N, C], got shape ", x.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == x.size(0) && mask.size(1) == x.size(1),
              "mask must be [B, N] = [", x.size(0), ", ", x.size(1), "], got shape ", mask.sizes());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(B * N <= std::numeric_limits<int32_t>::max(),
              "x has B * N = ", B * N, " tokens: more than int32 cu_seqlens can index");

  auto cu = at::empty({B + 1}, x.options().dtype(at::kInt));
  auto y = at::empty({B * N, C}, x.options());
  if (B == 0) return {y, cu.zero_()};
  auto kept = at::empty({B}, cu.options());

  CompactParams p{};
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.batch = B;
  p.cols = C;
  p.mask = mask.data_ptr<bool>();
  p.seq_len = N;
  p.cu_out = cu.data_ptr<int32_t>();
  p.kept = kept.data_ptr<int32_t>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), [&](auto tag) { launch_compact<decltype(tag), true>(p, stream); });
  return {y.narrow(0, 0, total_rows(cu)), cu};
}

at::Tensor unpack_cuda(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t max_len, double pad_value) {
  check_cuda_operand(packed, "packed", packed.device());
  const c10::cuda::CUDAGuard guard(packed.device());
  check_float_dtype(packed, "packed");
  TORCH_CHECK(packed.dim() == 2, "packed must be [T, C], got shape ", packed.sizes());
  check_cu_seqlens(cu_seqlens, packed.device());
  TORCH_CHECK(max_len >= 0, "max_len must be >= 0, got ", max_len);
  const int64_t B = cu_seqlens.size(0) - 1, C = packed.size(1);

  auto out = at::empty({B, max_len, C}, packed.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(packed.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    // Grid-stride over rows: enough blocks to fill the GPU several times over, never a 2^31 grid.
    const int64_t blocks = std::min<int64_t>(ceil_div(B * max_len, kWarps),
                                             int64_t{32} * at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    const auto* src = static_cast<const T*>(packed.data_ptr());
    auto* dst = static_cast<T*>(out.data_ptr());
    const float pad = static_cast<float>(pad_value);
    if (can_vectorize(C, kVec, {src, dst})) {
      unpack_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(src, cu_seqlens.data_ptr<int32_t>(), B, max_len, C, pad, dst);
    } else {
      unpack_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(src, cu_seqlens.data_ptr<int32_t>(), B, max_len, C, pad, dst);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void prune_compact_cuda(const at::Tensor& x, const at::Tensor& cu_seqlens, const at::Tensor& scores,
                        const at::Tensor& threshold, int64_t keep_first, bool merge, const at::Tensor& y,
                        const at::Tensor& kept_index, const at::Tensor& cu_out) {
  const int64_t B = cu_seqlens.size(0) - 1;
  if (B == 0) {
    cu_out.zero_();
    return;
  }
  auto workspace = at::empty({2 * B}, cu_out.options());  // kept counts, then fp32 weight sums

  CompactParams p{};
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.batch = B;
  p.cols = x.size(1);
  p.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  p.scores = scores.data_ptr();
  p.threshold = threshold.data_ptr();
  p.score_type = score_type_of(scores);
  p.keep_first = keep_first;
  p.merge = merge;
  p.kept_index = kept_index.data_ptr<int32_t>();
  p.cu_out = cu_out.data_ptr<int32_t>();
  p.kept = workspace.data_ptr<int32_t>();
  p.weight_sum = reinterpret_cast<float*>(p.kept + B);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), [&](auto tag) { launch_compact<decltype(tag), false>(p, stream); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_tokens_cuda(const at::Tensor& x, const at::Tensor& cu_seqlens,
                                                                 const at::Tensor& scores, const at::Tensor& threshold,
                                                                 int64_t keep_first, bool merge) {
  check_cuda_operand(x, "x", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  check_float_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [T, C], got shape ", x.sizes());
  check_cu_seqlens(cu_seqlens, x.device());
  check_cuda_operand(scores, "scores", x.device());
  check_cuda_operand(threshold, "threshold", x.device());
  check_float_dtype(scores, "scores");
  TORCH_CHECK(threshold.scalar_type() == scores.scalar_type(), "threshold must have the dtype of scores (",
              scores.scalar_type(), "), got ", threshold.scalar_type());
  const int64_t T = x.size(0), C = x.size(1), B = cu_seqlens.size(0) - 1;
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == T, "scores must be [T] = [", T, "], got shape ", scores.sizes());
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == B, "threshold must be [B] = [", B, "], got shape ",
              threshold.sizes());

  // T' <= T: a merged row exists only where at least one row was dropped.
  auto y = at::empty({T, C}, x.options());
  auto kept_index = at::empty({T}, x.options().dtype(at::kInt));
  auto cu_out = at::empty({B + 1}, kept_index.options());
  if (B == 0) return {y, cu_out.zero_(), kept_index};
  prune_compact_cuda(x, cu_seqlens, scores, threshold, keep_first, merge, y, kept_index, cu_out);
  const int64_t rows = total_rows(cu_out);
  return {y.narrow(0, 0, rows), cu_out, kept_index.narrow(0, 0, rows)};
}

}  // namespace madtp
