// Torch-facing entry points of madtp_kernels._C, registered in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace madtp {

std::tuple<at::Tensor, at::Tensor> pack_cuda(const at::Tensor& x, const at::Tensor& mask);

at::Tensor unpack_cuda(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t max_len, double pad_value);

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_tokens_cuda(const at::Tensor& x, const at::Tensor& cu_seqlens,
                                                                 const at::Tensor& scores, const at::Tensor& threshold,
                                                                 int64_t keep_first, bool merge);

// prune_tokens_cuda's compaction into caller-owned buffers, queued on the current stream with no host sync:
// y [T, C], kept_index [T] (rows at and past cu_out[B] left unwritten), cu_out [B + 1]. Inputs as checked by
// prune_tokens_cuda. Not an op: the shared step of prune_tokens_cuda and score_and_prune_cuda.
void prune_compact_cuda(const at::Tensor& x, const at::Tensor& cu_seqlens, const at::Tensor& scores,
                        const at::Tensor& threshold, int64_t keep_first, bool merge, const at::Tensor& y,
                        const at::Tensor& kept_index, const at::Tensor& cu_out);

// Returns (y [T, C], cu_new [B + 1], kept_index [T], protected_new [T] or [0], importance [T], theta [B]): T-row
// capacity outputs of which the first cu_new[B] rows are results, the rest zeros. No host sync.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_and_prune_cuda(
    const at::Tensor& x, const at::Tensor& cu_seqlens, const at::Tensor& received, const at::Tensor& cls,
    const at::Tensor& attn_out, const at::Tensor& align, double temperature,
    const std::optional<at::Tensor>& protected_rows, bool merge, int64_t max_len,
    const std::optional<at::Tensor>& headmax, c10::string_view importance);

// Returns (out [Tq, H, D], received [Tk, H], cls [Tk, H], lse [Tq, H], headmax [Tk]); the statistics are
// [0, H] unless return_stats, headmax [0] unless headmax_stats; lse (natural log, +inf for a query without keys)
// is always returned, for the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal,
    const std::optional<at::Tensor>& q_index, const std::optional<at::Tensor>& kv_index, bool return_stats,
    bool headmax_stats);

// Version of the cuSPARSELt library actually loaded, encoded like CUSPARSELT_VERSION (major*1000 + minor*100 + patch).
int64_t cusparselt_version();

// W [N, K] (fp16/bf16, 2:4 along K) compressed by cuSPARSELt into a uint8 buffer valid for any token count.
at::Tensor cusparselt_compress_cuda(const at::Tensor& weight);

// y [M, N] = x [M, K] W^T + bias (x's dtype), W given as cusparselt_compress_cuda's buffer.
at::Tensor cusparselt_linear_cuda(const at::Tensor& x, const at::Tensor& compressed, int64_t out_features,
                                  int64_t in_features, const std::optional<at::Tensor>& bias);

// Number of cached cuSPARSELt plans (all devices, shapes and bias pointers).
int64_t cusparselt_plan_cache_size();

}  // namespace madtp
