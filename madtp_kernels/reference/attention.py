"""Ragged attention in plain PyTorch: the `torch` backend (CPU path) and the reference for the kernels.

One scaled_dot_product_attention call per sequence, all heads at once ([H, L, D] views of the packed rows):
the padded alternative spends max_len^2 work on every sequence, this spends L_q * L_k. With stats, the
sequence's [H, Lq, Lk] probabilities are formed explicitly (never a [Tq, Tk] matrix across sequences).
Differentiable: autograd through these ops is also the recompute-based backward of the other backends.
"""
from __future__ import annotations

import torch
from torch import Tensor


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _causal_mask(rows: int, lq: int, lk: int, first_row: int, device) -> Tensor:
    """Bottom-right aligned (flash-attn): query i sees key j iff j <= i + lk - lq; rows start at first_row."""
    i = torch.arange(first_row, first_row + rows, device=device)[:, None]
    return torch.arange(lk, device=device)[None, :] <= i + (lk - lq)


def _sequences(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, causal: bool):
    """(q0, q1, k0, k1, first) for each sequence with work: queries q0 + first .. q1 see keys k0 .. k1.

    Causal queries before lq - lk see no key: their output stays 0 and they add nothing to the stats or
    gradients, so they are left out (first > 0); sequences without keys or queries are skipped."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        first = max(0, (q1 - q0) - (k1 - k0)) if causal else 0
        if k1 > k0 and q0 + first < q1:
            yield q0, q1, k0, k1, first


def _additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _probabilities(qb: Tensor, kb: Tensor, scale: float, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Softmax probabilities [H, rows, lk] and natural log-sum-exp [H, rows], in the accumulation dtype."""
    s = torch.matmul(qb, kb.transpose(1, 2)).to(stats_dtype(qb.dtype)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[..., None]), lse


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool, q_index: Tensor | None,
                     kv_index: Tensor | None, return_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q [Pq, H, D], k/v [Pk, H, D] (physical rows) -> (out [Tq, H, D], received [Tk, H], cls [Tk, H],
    lse [Tq, H]).

    Stats are [0, H] when return_stats is False; stats and lse are float32 (float64 for float64 inputs).
    lse is the natural log-sum-exp of each query's scores, +inf for a query with no key (flash-attn's rule,
    so exp(s - lse) is 0 there).
    """
    if q_index is not None:
        q = q.index_select(0, q_index.long())
    if kv_index is not None:
        k, v = k.index_select(0, kv_index.long()), v.index_select(0, kv_index.long())
    heads = q.shape[1]
    sdt = stats_dtype(q.dtype)
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[0], heads), float("inf"), dtype=sdt, device=q.device)
    received = q.new_zeros((k.shape[0] if return_stats else 0, heads), dtype=sdt)
    cls = torch.zeros_like(received)
    # The CPU flash kernel returns the log-sum-exp too; elsewhere the explicit path stands in.
    flash_cpu = q.device.type == "cpu" and not return_stats
    for q0, q1, k0, k1, first in _sequences(cu_seqlens_q, cu_seqlens_k, causal):
        lq, lk = q1 - q0, k1 - k0
        qb = q[q0 + first:q1].transpose(0, 1)            # [H, rows, D]
        kb, vb = k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)
        mask = _causal_mask(lq - first, lq, lk, first, q.device) if causal and lq - first != lk else None
        if flash_cpu:
            o, lse_b = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qb[None], kb[None], vb[None], 0.0, causal and mask is None,
                attn_mask=None if mask is None else _additive_mask(mask, q.dtype), scale=scale)
            out[q0 + first:q1] = o[0].transpose(0, 1)
            lse[q0 + first:q1] = lse_b[0].transpose(0, 1).to(sdt)
            continue
        if causal and mask is None:
            mask = _causal_mask(lk, lk, lk, 0, q.device)
        p, lse_b = _probabilities(qb, kb, scale, mask)   # [H, rows, lk], [H, rows]
        out[q0 + first:q1] = torch.matmul(p.to(q.dtype), vb).transpose(0, 1)
        lse[q0 + first:q1] = lse_b.transpose(0, 1)
        if return_stats:
            received[k0:k1] = p.sum(1).transpose(0, 1)
            if first == 0:
                cls[k0:k1] = p[:, 0].transpose(0, 1)
    return out, received, cls, lse


def varlen_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                              scale: float, causal: bool, q_index: Tensor | None,
                              kv_index: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (shaped like the physical buffers) from the attention backward formulas, per sequence:
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q.
    P is recomputed from the forward's log-sum-exp. Rows an index never references get 0; a row referenced twice
    accumulates both gradients."""
    acc = stats_dtype(q.dtype)
    ql = q.index_select(0, q_index.long()) if q_index is not None else q
    kl = k.index_select(0, kv_index.long()) if kv_index is not None else k
    vl = v.index_select(0, kv_index.long()) if kv_index is not None else v
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (ql, kl, vl))
    for q0, q1, k0, k1, first in _sequences(cu_seqlens_q, cu_seqlens_k, causal):
        lq, lk = q1 - q0, k1 - k0
        qb = ql[q0 + first:q1].transpose(0, 1).to(acc)        # [H, rows, D]
        kb, vb = kl[k0:k1].transpose(0, 1).to(acc), vl[k0:k1].transpose(0, 1).to(acc)
        gb = grad_out[q0 + first:q1].transpose(0, 1).to(acc)
        s = torch.matmul(qb, kb.transpose(1, 2)) * scale
        if causal:
            s = s.masked_fill(~_causal_mask(lq - first, lq, lk, first, q.device), float("-inf"))
        p = torch.exp(s - lse[q0 + first:q1].transpose(0, 1)[..., None].to(acc))
        dv[k0:k1] = torch.matmul(p.transpose(1, 2), gb).transpose(0, 1)
        dp = torch.matmul(gb, vb.transpose(1, 2))
        delta = (gb * out[q0 + first:q1].transpose(0, 1).to(acc)).sum(-1, keepdim=True)  # rowsum(dO * O)
        ds = p * (dp - delta)
        dq[q0 + first:q1] = (torch.matmul(ds, kb) * scale).transpose(0, 1)
        dk[k0:k1] = (torch.matmul(ds.transpose(1, 2), qb) * scale).transpose(0, 1)

    def to_physical(grad: Tensor, index: Tensor | None, like: Tensor) -> Tensor:
        if index is None:
            return grad.to(like.dtype)
        return torch.zeros(like.shape, dtype=acc, device=like.device).index_add_(0, index.long(), grad).to(like.dtype)

    return to_physical(dq, q_index, q), to_physical(dk, kv_index, k), to_physical(dv, kv_index, v)
