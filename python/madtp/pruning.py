"""DTP: token importance, the per-sample threshold, and one pruning step on packed rows.

Both executions (ragged and padded) call `prune_step` on packed rows, so they make the same decisions; they
differ only in how the layers around it run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from madtp_kernels import AttentionStats, prune_tokens

from . import ragged

# Score given to rows that must survive (CLIP text's EOT): above any threshold, which is a weighted mean of
# importances in [0, 1].
PROTECTED_SCORE = 2.0


@dataclass
class Layout:
    """Where the packed rows of a branch stand: samples, original positions, rows that must survive."""
    cu_seqlens: Tensor   # int32 [B+1]
    max_len: int         # longest sample (host int: sizes the padded execution and the kernels' grids)
    positions: Tensor    # int64 [T]: each row's position in the encoder's input; -1 for a merged row
    protected: Tensor    # bool [T]: rows never dropped (the first row of a sample is kept by keep_first)

    @property
    def rows(self) -> int:
        return self.positions.shape[0]

    def candidates(self) -> Tensor:
        """bool [T]: rows that may be dropped and that the scores rank (all but the first and protected)."""
        return ~(ragged.first_rows(self.cu_seqlens, self.rows) | self.protected)


def token_importance(stats: AttentionStats, attn_out: Tensor, align_scores: Tensor, layout: Layout) -> Tensor:
    """TIS [T] fp32: the mean of three terms, each min-max normalised within its sample over the candidates:
    attention received (max over heads, summed over queries); attention from the first token (CLS), heads
    weighted by the norm of their output at that token; the best alignment score."""
    cu, where = layout.cu_seqlens, layout.candidates()
    received = stats.received.amax(dim=1)
    first = ragged.first_rows(cu, layout.rows)
    head_norm = attn_out[first].float().norm(dim=-1)                     # [B', H] for non-empty samples
    head_weight = head_norm / head_norm.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    seg = ragged.segment_ids(cu, layout.rows)
    weights = head_weight.new_zeros((cu.shape[0] - 1, head_weight.shape[1]))
    weights[(cu[1:] > cu[:-1])] = head_weight
    cls = (stats.cls * weights[seg]).sum(dim=1)
    alignment = align_scores.amax(dim=1)
    terms = [ragged.normalise(t, cu, where) for t in (received, cls, alignment)]
    return sum(terms) / 3


def threshold(align_scores: Tensor, importance: Tensor, layout: Layout, temperature: float) -> Tensor:
    """theta [B] = min over alignment tokens k of sum_i softmax_i(A_ik / temperature) TIS_i (candidates i)."""
    weights = ragged.segment_softmax(align_scores.detach() / temperature, layout.cu_seqlens, layout.candidates())
    per_token = ragged.segment_sum(weights * importance.detach().unsqueeze(1), layout.cu_seqlens)   # [B, K]
    return per_token.amin(dim=1)


@dataclass
class PruneResult:
    x: Tensor
    layout: Layout
    kept: Tensor        # int [B]: rows of each sample after the step (kept + merged)


def prune_step(x: Tensor, layout: Layout, importance: Tensor, theta: Tensor, merge: bool) -> PruneResult:
    """Drop each sample's candidate rows with importance <= theta[b]; merge them into one row (TIS-weighted)."""
    scores = torch.where(layout.protected, torch.full_like(importance, PROTECTED_SCORE), importance)
    out = prune_tokens(x, layout.cu_seqlens, scores, theta.to(scores.dtype), keep_first=1, merge=merge)
    index = out.kept_index.long()
    merged = index < 0
    safe = index.clamp_min(0)
    positions = torch.where(merged, torch.full_like(safe, -1), layout.positions[safe])
    protected = layout.protected[safe] & ~merged
    lengths = out.cu_seqlens[1:] - out.cu_seqlens[:-1]
    max_len = int(lengths.max()) if lengths.numel() else 0
    return PruneResult(out.x, Layout(out.cu_seqlens, max_len, positions, protected), lengths)
