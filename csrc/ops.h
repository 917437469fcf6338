// Torch-facing entry points of madtp_kernels._C, registered in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace madtp {

std::tuple<at::Tensor, at::Tensor> pack_cuda(const at::Tensor& x, const at::Tensor& mask);

at::Tensor unpack_cuda(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t max_len, double pad_value);

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_tokens_cuda(const at::Tensor& x, const at::Tensor& cu_seqlens,
                                                                 const at::Tensor& scores, const at::Tensor& threshold,
                                                                 int64_t keep_first, bool merge);

// Version of the cuSPARSELt library actually loaded, encoded like CUSPARSELT_VERSION (major*1000 + minor*100 + patch).
int64_t cusparselt_version();

}  // namespace madtp
