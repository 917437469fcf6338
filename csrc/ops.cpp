// Op registration of madtp_kernels._C. The schemas are declared here once; the Python side registers the
// fake (meta) impls and autograd, and its torch/Triton twins use the same schema strings.
#include <torch/library.h>

#include <string>

#include "ops.h"

// The -gencode targets the build embedded, comma-separated (setup.py / CMake define it: bare tokens, stringized
// here, since a quoted string does not survive ninja and the shell), so the dispatcher picks this backend only on
// GPUs it holds code for. "sm_XY": SASS, "compute_XY": PTX the driver compiles for newer GPUs.
#ifndef MADTP_CUDA_ARCHS
#error "define MADTP_CUDA_ARCHS as the -gencode targets of this build, e.g. -DMADTP_CUDA_ARCHS=sm_80,compute_90"
#endif
#define MADTP_STRINGIZE_ARGS(...) #__VA_ARGS__
#define MADTP_STRINGIZE(...) MADTP_STRINGIZE_ARGS(__VA_ARGS__)

namespace {
std::string cuda_archs() { return MADTP_STRINGIZE(MADTP_CUDA_ARCHS); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(madtp_kernels, m) {
  m.def("pack_cuda(Tensor x, Tensor mask) -> (Tensor, Tensor)");
  m.def("unpack_cuda(Tensor packed, Tensor cu_seqlens, int max_len, float pad_value) -> Tensor");
  m.def("prune_tokens_cuda(Tensor x, Tensor cu_seqlens, Tensor scores, Tensor threshold, int keep_first, "
        "bool merge) -> (Tensor, Tensor, Tensor)");
  m.def("score_and_prune_cuda(Tensor x, Tensor cu_seqlens, Tensor received, Tensor cls, Tensor attn_out, "
        "Tensor align, float temperature, Tensor? protected, bool merge, int max_len, Tensor? headmax=None, "
        "str importance=\"minmax\") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("varlen_attention_cuda(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, float scale, bool causal, Tensor? q_index, Tensor? kv_index, "
        "bool return_stats, bool headmax_stats) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_archs() -> str");
  m.impl("cuda_archs", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(cuda_archs));
  m.def("cusparselt_version() -> int");
  // No tensor arguments, so the dispatcher has no key to pick: CompositeExplicitAutograd serves every call.
  m.impl("cusparselt_version", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(madtp::cusparselt_version));
  m.def("cusparselt_compress(Tensor weight) -> Tensor");
  m.def("cusparselt_linear(Tensor x, Tensor compressed, int out_features, int in_features, Tensor? bias) -> Tensor");
  m.def("cusparselt_plan_cache_size() -> int");
  // Host-only bookkeeping, no tensor to dispatch on: answers without a GPU.
  m.impl("cusparselt_plan_cache_size", c10::DispatchKey::CompositeExplicitAutograd,
         TORCH_FN(madtp::cusparselt_plan_cache_size));
}

TORCH_LIBRARY_IMPL(madtp_kernels, CUDA, m) {
  m.impl("pack_cuda", TORCH_FN(madtp::pack_cuda));
  m.impl("unpack_cuda", TORCH_FN(madtp::unpack_cuda));
  m.impl("prune_tokens_cuda", TORCH_FN(madtp::prune_tokens_cuda));
  m.impl("score_and_prune_cuda", TORCH_FN(madtp::score_and_prune_cuda));
  m.impl("varlen_attention_cuda", TORCH_FN(madtp::varlen_attention_cuda));
  m.impl("cusparselt_compress", TORCH_FN(madtp::cusparselt_compress_cuda));
  m.impl("cusparselt_linear", TORCH_FN(madtp::cusparselt_linear_cuda));
}
