// Checks every launcher runs before a kernel touches a tensor's memory; messages name the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace madtp {

// A kernel operand: a CUDA tensor on `device` (the op's first tensor argument's), contiguous.
inline void check_cuda_operand(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " (like the first argument), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace madtp
