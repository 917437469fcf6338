"""FLOP formulas for the ops, so `torch.utils.flop_counter.FlopCounterMode` counts them as they run.

A custom op is opaque to the counter (it sees the op, not the work inside), so each op says what it does:
- varlen_attention: 4*D*H per (query, key) pair that a sequence's mask allows (QK^T and PV, as the counter
  counts SDPA), plus 2*D*H per pair for the stats pass (QK^T again) when stats are asked for; backward 8*D*H
  per pair (as the counter counts SDPA's backward). Pairs are counted from cu_seqlens: ragged work, not padded.
- sparse_linear: 2:4 weights do half the multiply-adds of the dense GEMM: M*N*K (dense: 2*M*N*K).
- pack / unpack / prune_tokens move data: 0.

The dense baselines need formulas too: torch's counter has none for the SDPA aten ops that Hugging Face's "sdpa"
attention reaches on CPU (_scaled_dot_product_flash_attention_for_cpu) or on out-of-tree devices
(_scaled_dot_product_fused_attention_overrideable), forward or backward, so a dense model would be charged nothing
for its attention while the ragged path is. At import this module registers, for each of those ops that torch has
not covered, torch's own SDPA counts (sdpa_flop_count / sdpa_backward_flop_count: 4*B*H*Lq*Lk*D forward for
D_qk = D_v, 2*B*H*Lq*Lk*(3*D_qk + 2*D_v) backward), ignoring attn_mask and is_causal as torch's formulas do.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from . import _dispatch, _library


def _pairs(cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool) -> int:
    lq = (cu_q[1:] - cu_q[:-1]).long().cpu()
    lk = (cu_k[1:] - cu_k[:-1]).long().cpu()
    if not causal:
        return int((lq * lk).sum())
    # Bottom-right aligned: query i of Lq sees keys j <= i + Lk - Lq (and j >= 0).
    total = 0
    for q_len, k_len in zip(lq.tolist(), lk.tolist(), strict=True):
        i = torch.arange(q_len)
        total += int((i + k_len - q_len + 1).clamp(0, k_len).sum())
    return total


def _rows(t, index):
    return index.shape[0] if index is not None else t.shape[0]


def _attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, q_index, kv_index, return_stats, *args,
               out_val=None, **kwargs):
    heads, dim = q.shape[1], q.shape[2]
    per_pair = 4 + (2 if return_stats else 0)
    return per_pair * dim * heads * _pairs(cu_q, cu_k, causal)


def _attention_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, q_index, kv_index,
                        *args, out_val=None, **kwargs):
    return 8 * q.shape[2] * q.shape[1] * _pairs(cu_q, cu_k, causal)


def _sparse_linear(x, values, meta, bias, *args, out_val=None, **kwargs):
    rows = x.numel() // x.shape[-1]
    return rows * values.shape[0] * (2 * values.shape[1])   # M * N * K


_FORMULAS = {"varlen_attention": _attention, "varlen_attention_backward": _attention_backward,
             "sparse_linear": _sparse_linear}


def _sdpa(query, key, value, *args, out_val=None, **kwargs):
    # As torch counts _scaled_dot_product_{flash,efficient,cudnn}_attention: QK^T and PV over the full
    # (Lq, Lk) grid; attn_mask / is_causal are not discounted (torch: "We aren't accounting for causal attention").
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs):
    # As torch counts their backward ops: scores recomputed, then dP, dV, dQ, dK (five GEMMs over the grid).
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# SDPA aten ops torch 2.14's counter lacks (it covers flash / efficient / cudnn and their backward ops).
_SDPA_OPS = {"_scaled_dot_product_flash_attention_for_cpu": _sdpa,
             "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_backward,
             "_scaled_dot_product_fused_attention_overrideable": _sdpa,
             "_scaled_dot_product_fused_attention_overrideable_backward": _sdpa_backward}


def register_sdpa() -> None:
    """Register torch's SDPA counts for the SDPA aten ops the counter has no formula for (idempotent: an op that
    already has one, torch's or anyone's, keeps it). A FlopCounterMode copies the registry when it is built, so
    this runs at import, before any counter exists."""
    from torch.utils.flop_counter import flop_registry

    for name, formula in _SDPA_OPS.items():
        packet = getattr(torch.ops.aten, name, None)
        if packet is None or packet in flop_registry:
            continue
        register_flop_formula(packet, get_raw=True)(formula)


def register() -> None:
    """Register the formulas for every backend op that exists in this build, and the dense SDPA ops' (idempotent)."""
    from torch.utils.flop_counter import flop_registry

    register_sdpa()
    for op, formula in _FORMULAS.items():
        for backend in _dispatch.BACKENDS:
            name = _library.qualname(op, backend).split("::")[1]
            packet = getattr(torch.ops.madtp_kernels, name, None) if hasattr(torch.ops, "madtp_kernels") else None
            if packet is None or packet in flop_registry:
                continue
            register_flop_formula(packet, get_raw=True)(formula)


register_sdpa()   # dense baselines: their SDPA attention is counted like torch counts the CUDA kernels'
