"""Per-sample reductions over packed rows (the ragged layout of DESIGN.md), in plain PyTorch.

Rows x[T, ...] belong to samples by `cu_seqlens` [B+1]. These run once per pruning layer on [T] or [T, K]
tensors, far smaller than the layer's GEMMs; none syncs with the host.
"""
from __future__ import annotations

import torch
from torch import Tensor


def segment_ids(cu_seqlens: Tensor, rows: int) -> Tensor:
    """int64 [T]: the sample of each row."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths,
                                   output_size=rows)


def _segment_reduce(values: Tensor, cu_seqlens: Tensor, reduce: str, fill: float) -> Tensor:
    """[B, ...] amax/amin of values [T, ...] per sample; `fill` for an empty sample."""
    seg = segment_ids(cu_seqlens, values.shape[0])
    out = values.new_full((cu_seqlens.shape[0] - 1, *values.shape[1:]), fill)
    index = seg.reshape(-1, *([1] * (values.dim() - 1))).expand_as(values)
    return out.scatter_reduce(0, index, values, reduce, include_self=False)


def segment_max(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    return _segment_reduce(values, cu_seqlens, "amax", float("-inf"))


def segment_sum(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    seg = segment_ids(cu_seqlens, values.shape[0])
    return values.new_zeros((cu_seqlens.shape[0] - 1, *values.shape[1:])).index_add(0, seg, values)


def segment_softmax(values: Tensor, cu_seqlens: Tensor, where: Tensor) -> Tensor:
    """Softmax over the rows of each sample, per column, among the rows where `where` [T] holds (others get 0)."""
    mask = where.reshape(-1, *([1] * (values.dim() - 1)))
    masked = values.masked_fill(~mask, float("-inf"))
    seg = segment_ids(cu_seqlens, values.shape[0])
    peak = segment_max(masked, cu_seqlens).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    e = torch.exp(masked - peak[seg])
    total = segment_sum(e, cu_seqlens)
    return e / total.clamp_min(torch.finfo(e.dtype).tiny)[seg]
