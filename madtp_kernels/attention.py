"""varlen_attention: attention over ragged token sets, with fused index gathers and pruning statistics.

Layout: q [Tq, H, D], k/v [Tk, H, D] packed with int32 cu_seqlens (DESIGN.md). With q_index / kv_index the
packed layout is logical: logical token i is physical row index[i] of the buffer, gathered inside the kernels.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _dispatch, _library
from . import _validation as checks
from .layout import RaggedLayout, device_offsets, max_len_of, resolve
from .reference import attention as ref

SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
          "int max_seqlen_k, float scale, bool causal, Tensor? q_index, Tensor? kv_index, bool return_stats, "
          "bool headmax_stats) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
                   "Tensor cu_seqlens_k, "
                   "int max_seqlen_q, int max_seqlen_k, float scale, bool causal, Tensor? q_index, "
                   "Tensor? kv_index) -> (Tensor, Tensor, Tensor)")


class AttentionStats(NamedTuple):
    received: Tensor  # [Tk, H] fp32: sum over the sequence's queries of the probability given to key j
    cls: Tensor       # [Tk, H] fp32: the probability the sequence's first query gives to key j
    # [Tk] fp32 or None: sum over the sequence's queries other than its first of the largest probability any
    # head gives key j (the received term of the official MADTP importance); only where asked for
    headmax: Tensor | None = None


def _triton():
    from .triton import attention  # first use: Triton reads TRITON_INTERPRET when kernels are decorated

    return attention


def _triton_forward(*args):
    return _triton().varlen_attention(*args)


def _triton_backward(*args):
    return _triton().varlen_attention_backward(*args)


def _fake(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, q_index, kv_index, return_stats, headmax_stats):
    rows_q = q_index.shape[0] if q_index is not None else q.shape[0]
    keys = kv_index.shape[0] if kv_index is not None else k.shape[0]
    rows_k = keys if return_stats else 0
    stats = q.new_empty((rows_k, q.shape[1]), dtype=ref.stats_dtype(q.dtype))
    lse = q.new_empty((rows_q, q.shape[1]), dtype=ref.stats_dtype(q.dtype))
    headmax = q.new_empty((keys if headmax_stats else 0,), dtype=ref.stats_dtype(q.dtype))
    return q.new_empty((rows_q, *q.shape[1:])), stats, torch.empty_like(stats), lse, headmax


def _fake_backward(grad_out, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, q_index, kv_index, _, _ = inputs
    out, received, cls, lse, headmax = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, q_index, kv_index)
    ctx.args = (max_q, max_k, scale, causal)
    ctx.mark_non_differentiable(received, cls, lse, headmax)  # statistics steer pruning; they carry no gradient


def _backward(ctx, grad_out, _grad_received, _grad_cls, _grad_lse, _grad_headmax):
    # The backward is an op of its own, so torch.compile sees one opaque node, not a per-sequence loop.
    q, k, v, out, lse, cu_q, cu_k, q_index, kv_index = ctx.saved_tensors
    impl = _dispatch.select("varlen_attention_backward", q.device, q.dtype, head_dim=q.shape[2], strict=False)
    grads = impl(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.args, q_index, kv_index)
    return (*grads, None, None, None, None, None, None, None, None, None, None)


_library.define("varlen_attention_backward", BACKWARD_SCHEMA,
                {"torch": ref.varlen_attention_backward, "triton": _triton_backward}, fake=_fake_backward)
_library.define("varlen_attention", SCHEMA, {"torch": ref.varlen_attention, "triton": _triton_forward},
                fake=_fake, backward=_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public API

def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor | RaggedLayout,
                     cu_seqlens_k: Tensor | RaggedLayout | None = None,
                     *, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                     scale: float | None = None, causal: bool = False, q_index: Tensor | None = None,
                     kv_index: Tensor | None = None, return_stats: bool = False, headmax_stats: bool = False):
    """Attention of each sequence's queries over its own keys; no padding, no [Tq, Tk] matrix.

    q [Tq, H, D], k/v [Tk, H, D] -> out [Tq, H, D] (q's dtype). cu_seqlens_k defaults to cu_seqlens_q.
    Either may be a RaggedLayout (trusted, no host read; max_seqlen defaults to its max_len).
    causal=True aligns the mask bottom-right (flash-attn). A query with no key gets zeros.
    q_index / kv_index (int32): logical token i is physical row index[i] of q's / k's and v's buffer.
    return_stats=True -> (out, AttentionStats(received, cls)), fp32 [Tk, H], without gradient.
    headmax_stats=True (with return_stats) also fills AttentionStats.headmax, fp32 [Tk]: for key j, the sum over
    its sequence's queries except the first of the largest probability any head gives j (the official MADTP
    received term, which the per-head received cannot give); 0 for a key no such query sees.
    """
    tensors = {"q": q, "k": k, "v": v}
    for name, t in tensors.items():
        checks.check_tensor(t, name)
    checks.check_same_device(q, "q", k=k, v=v, cu_seqlens_q=device_offsets(cu_seqlens_q, "cu_seqlens_q"),
                             cu_seqlens_k=device_offsets(cu_seqlens_k, "cu_seqlens_k"), q_index=q_index,
                             kv_index=kv_index)
    for name in ("q", "k", "v"):
        checks.check_ndim(tensors[name], name, 3, "3-D [T, H, D]")
    checks.check_floating(q, "q")
    checks.check_sizes(q, "q", (1,), "heads")
    checks.check_sizes(q, "q", (2,), "head dim")
    for name in ("k", "v"):
        t = tensors[name]
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
        if t.shape[1:] != q.shape[1:]:
            raise ValueError(f"{name}: expected [*, {q.shape[1]}, {q.shape[2]}] (q's heads and head dim), got "
                             f"{tuple(t.shape)}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"v: expected {k.shape[0]} rows (as k), got {v.shape[0]}")
    checks.check_index(q_index, "q_index", q.shape[0], "q")
    checks.check_index(kv_index, "kv_index", k.shape[0], "k")
    rows_q = q.shape[0] if q_index is None else q_index.shape[0]
    rows_k = k.shape[0] if kv_index is None else kv_index.shape[0]
    # A RaggedLayout is trusted (checked when made): nothing is read back from the device for it.
    cu_q, layout_q, offsets_q = resolve(cu_seqlens_q, "cu_seqlens_q", rows_q)
    if cu_seqlens_k is None:
        cu_k, layout_k, offsets_k = cu_q, layout_q, offsets_q
        if rows_k != rows_q:
            raise ValueError(f"cu_seqlens_k: required when k has {rows_k} logical rows and q has {rows_q}")
    else:
        cu_k, layout_k, offsets_k = resolve(cu_seqlens_k, "cu_seqlens_k", rows_k)
        if cu_k.shape != cu_q.shape:
            raise ValueError(f"cu_seqlens_k: expected {cu_q.shape[0] - 1} sequences (as cu_seqlens_q), "
                             f"got {cu_k.shape[0] - 1}")
    max_seqlen_q = max_len_of(max_seqlen_q, "max_seqlen_q", layout_q, offsets_q)
    max_seqlen_k = max_len_of(max_seqlen_k, "max_seqlen_k", layout_k, offsets_k)
    # Any finite scale is one softmax on every backend (each scales the logits before its running max);
    # NaN or inf would turn whole rows into NaN or 0 * inf.
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else checks.check_float(scale, "scale", finite=True)
    checks.check_bool(causal, "causal")
    checks.check_bool(return_stats, "return_stats")
    checks.check_bool(headmax_stats, "headmax_stats")
    if headmax_stats and not return_stats:
        raise ValueError("headmax_stats: True needs return_stats=True (headmax is a field of the returned "
                         "AttentionStats), got return_stats=False")
    impl = _dispatch.select("varlen_attention", q.device, q.dtype, head_dim=q.shape[2])
    out, received, cls, _lse, headmax = impl(q.contiguous(), k.contiguous(), v.contiguous(), cu_q.contiguous(),
                                             cu_k.contiguous(), max_seqlen_q, max_seqlen_k, scale, causal,
                                             None if q_index is None else q_index.contiguous(),
                                             None if kv_index is None else kv_index.contiguous(), return_stats,
                                             headmax_stats)
    if not return_stats:
        return out
    return out, AttentionStats(received, cls, headmax if headmax_stats else None)
