// Torch launcher of score_and_prune (kernels in include/madtp/prune_kernels.cuh, the compaction of
// token_ops.cu). The Python front end has validated everything already; the checks here are the last line of
// defence for callers that reach torch.ops.madtp_kernels.score_and_prune_cuda directly. cu_seqlens' values
// are not checked here: that would need a host read, and the op queues its three kernels without one.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "launch_checks.h"
#include "madtp/prune_kernels.cuh"
#include "ops.h"

namespace madtp {
namespace {

// Dynamic shared memory of score_kernel (the head weights) stays under the 48 KiB every GPU grants by default.
constexpr int64_t kMaxHeads = 8192;

void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", st);
}

void check_fp32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
}

ScoreType attn_type_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return ScoreType::kFloat16;
    case at::kBFloat16: return ScoreType::kBFloat16;
    default: return ScoreType::kFloat32;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_and_prune_cuda(
    const at::Tensor& x, const at::Tensor& cu_seqlens, const at::Tensor& received, const at::Tensor& cls,
    const at::Tensor& attn_out, const at::Tensor& align, double temperature,
    const std::optional<at::Tensor>& protected_rows, bool merge, int64_t max_len,
    const std::optional<at::Tensor>& headmax, c10::string_view importance) {
  check_cuda_operand(x, "x", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Device device = x.device();
  check_cuda_operand(cu_seqlens, "cu_seqlens", device);
  check_cuda_operand(received, "received", device);
  check_cuda_operand(cls, "cls", device);
  check_cuda_operand(attn_out, "attn_out", device);
  check_cuda_operand(align, "align", device);
  check_float(x, "x");
  check_float(attn_out, "attn_out");
  check_fp32(received, "received");
  check_fp32(cls, "cls");
  check_fp32(align, "align");
  TORCH_CHECK(x.dim() == 2, "x must be [T, C], got shape ", x.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must be int32, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1,
              "cu_seqlens must be 1-D with B + 1 >= 1 entries, got shape ", cu_seqlens.sizes());
  const int64_t T = x.size(0), C = x.size(1), B = cu_seqlens.size(0) - 1;
  TORCH_CHECK(T <= std::numeric_limits<int32_t>::max(), "x has ", T, " rows: more than int32 kept_index can index");
  TORCH_CHECK(received.dim() == 2 && received.size(0) == T && received.size(1) >= 1,
              "received must be [T, H] = [", T, ", H >= 1], got shape ", received.sizes());
  const int64_t H = received.size(1);
  TORCH_CHECK(H <= kMaxHeads, "received has ", H, " heads, more than the ", kMaxHeads, " score_and_prune_cuda supports");
  TORCH_CHECK(cls.dim() == 2 && cls.size(0) == T && cls.size(1) == H, "cls must be [T, H] = [", T, ", ", H,
              "], got shape ", cls.sizes());
  TORCH_CHECK(attn_out.dim() == 3 && attn_out.size(0) == T && attn_out.size(1) == H,
              "attn_out must be [T, H, D] = [", T, ", ", H, ", D], got shape ", attn_out.sizes());
  TORCH_CHECK(align.dim() == 2 && align.size(0) == T && align.size(1) >= 1,
              "align must be [T, K] = [", T, ", K >= 1], got shape ", align.sizes());
  const float tau = static_cast<float>(temperature);
  TORCH_CHECK(std::isfinite(tau) && tau > 0.0f, "temperature must be a finite float > 0 (in float32), got ",
              temperature);
  TORCH_CHECK(max_len >= 0, "max_len must be >= 0, got ", max_len);
  const bool official = importance == "official";
  TORCH_CHECK(official || importance == "minmax", "importance must be \"minmax\" or \"official\", got \"",
              std::string(importance), "\"");
  if (official) {
    TORCH_CHECK(headmax.has_value(), "headmax must be given for importance=\"official\"");
    check_cuda_operand(*headmax, "headmax", device);
    check_fp32(*headmax, "headmax");
    TORCH_CHECK(headmax->dim() == 1 && headmax->size(0) == T, "headmax must be [T] = [", T, "], got shape ",
                headmax->sizes());
  }
  const bool has_protected = protected_rows.has_value();
  if (has_protected) {
    const at::Tensor& pr = *protected_rows;
    check_cuda_operand(pr, "protected", device);
    TORCH_CHECK(pr.scalar_type() == at::kBool, "protected must be bool, got ", pr.scalar_type());
    TORCH_CHECK(pr.dim() == 1 && pr.size(0) == T, "protected must be [T] = [", T, "], got shape ", pr.sizes());
  }

  const auto f32 = x.options().dtype(at::kFloat);
  auto y = at::empty({T, C}, x.options());
  auto cu_new = at::empty({B + 1}, cu_seqlens.options());
  auto kept_index = at::empty({T}, cu_seqlens.options());
  auto protected_new = at::empty({has_protected ? T : 0}, x.options().dtype(at::kBool));
  auto tis = at::empty({T}, f32);
  auto theta = at::empty({B}, f32);
  if (T == 0) {  // every sample empty: no kernel reads a row
    cu_new.zero_();
    theta.zero_();
    return {y, cu_new, kept_index, protected_new, tis, theta};
  }
  // decision scores [T], decision thresholds [B], raw terms [3, T]
  auto workspace = at::empty({4 * T + B}, f32);
  float* ws = workspace.data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  ScoreParams sp{};
  sp.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  sp.received = received.data_ptr<float>();
  sp.cls = cls.data_ptr<float>();
  sp.attn_out = attn_out.data_ptr();
  sp.attn_type = attn_type_of(attn_out);
  sp.align = align.data_ptr<float>();
  sp.protected_rows = has_protected ? protected_rows->data_ptr<bool>() : nullptr;
  sp.headmax = official ? headmax->data_ptr<float>() : nullptr;
  sp.official = official;
  sp.merge = merge;
  sp.batch = B;
  sp.rows = T;
  sp.heads = H;
  sp.head_dim = attn_out.size(2);
  sp.num_align = align.size(1);
  sp.temperature = tau;
  sp.importance = tis.data_ptr<float>();
  sp.theta = theta.data_ptr<float>();
  sp.decision = ws;
  sp.decision_threshold = ws + T;
  sp.terms = ws + T + B;
  if (B > 0) {
    score_kernel<<<static_cast<unsigned>(B), kThreads, static_cast<size_t>(H) * sizeof(float), stream>>>(sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  prune_compact_cuda(x, cu_seqlens, workspace.narrow(0, 0, T), workspace.narrow(0, T, B), /*keep_first=*/1, merge,
                     y, kept_index, cu_new);

  FinishParams fp{};
  fp.cu_out = cu_new.data_ptr<int32_t>();
  fp.batch = B;
  fp.rows = T;
  fp.kept_index = kept_index.data_ptr<int32_t>();
  fp.protected_in = has_protected ? protected_rows->data_ptr<bool>() : nullptr;
  fp.protected_out = has_protected ? protected_new.data_ptr<bool>() : nullptr;
  fp.y = static_cast<unsigned char*>(y.data_ptr());
  fp.row_bytes = C * static_cast<int64_t>(y.element_size());
  // Enough threads for one row flag each or one 16-byte store of the capacity tail each, capped at a few
  // waves (grid-stride beyond).
  const int64_t items = std::max<int64_t>(T, T * fp.row_bytes / 16);
  const int64_t blocks = std::clamp<int64_t>(ceil_div(items, kThreads), 1,
                                             int64_t{8} * at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  finish_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(fp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  (void)max_len;  // lengths come from cu_seqlens on the device; the host bound is not needed
  return {y, cu_new, kept_index, protected_new, tis, theta};
}

}  // namespace madtp
