// Shape rules and plan-cache key of the cuSPARSELt 2:4 linear (csrc/sparse_gemm.cpp). Torch-free and
// CUDA-free so that plain g++ compiles it and csrc/tests/test_sparse_math.cpp checks it on the host.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace madtp {

// cuSPARSELt's descriptor constraints (cusparseLtStructuredDescriptorInit / cusparseLtDenseDescriptorInit,
// "rows, cols, and ld must be a multiple of ..."): a structured matrix needs multiples of 16 for 16-bit
// values (32 for 8-bit, 8 for 32-bit), a dense one multiples of 8 for 16-bit (16 for 8-bit, 4 for
// 32-bit): 32 and 16 bytes. PyTorch pads by the same table (SparseSemiStructuredTensorCUSPARSELT,
// fp16/bf16: sparse 16 x 16, dense 8 x 8).
constexpr int64_t structured_multiple(int64_t element_bytes) { return 32 / element_bytes; }
constexpr int64_t dense_multiple(int64_t element_bytes) { return 16 / element_bytes; }

// Smallest multiple of `multiple` (> 0) that is >= n (>= 0).
constexpr int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// y [M, N] = x [M, K] W^T runs as D (N x M_pad) = A (N x K, 2:4) B (K x M_pad): the token count M is the
// only dense-only dimension, padded to the dense multiple. N and K are dimensions of the structured A.
constexpr int64_t padded_tokens(int64_t m, int64_t element_bytes) { return round_up(m, dense_multiple(element_bytes)); }

constexpr bool valid_weight_shape(int64_t out_features, int64_t in_features, int64_t element_bytes) {
  return out_features > 0 && in_features > 0 && out_features % structured_multiple(element_bytes) == 0 &&
         in_features % structured_multiple(element_bytes) == 0;
}

// One cached cuSPARSELt problem: everything the descriptors, the algorithm and the plan depend on.
// dtype is the caller's scalar-type code (torch's c10::ScalarType), kept as an int so this stays torch-free.
struct PlanKey {
  int device;
  int dtype;
  int64_t m_padded;
  int64_t n;
  int64_t k;
  bool has_bias;

  friend bool operator==(const PlanKey& a, const PlanKey& b) {
    return a.device == b.device && a.dtype == b.dtype && a.m_padded == b.m_padded && a.n == b.n && a.k == b.k &&
           a.has_bias == b.has_bias;
  }
};

struct PlanKeyHash {
  std::size_t operator()(const PlanKey& key) const {
    std::size_t h = 0;
    // boost::hash_combine: order-sensitive, so (n, k) and (k, n) land apart.
    const auto mix = [&h](std::size_t v) { h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
    mix(std::hash<int>{}(key.device));
    mix(std::hash<int>{}(key.dtype));
    mix(std::hash<int64_t>{}(key.m_padded));
    mix(std::hash<int64_t>{}(key.n));
    mix(std::hash<int64_t>{}(key.k));
    mix(std::hash<bool>{}(key.has_bias));
    return h;
  }
};

}  // namespace madtp
