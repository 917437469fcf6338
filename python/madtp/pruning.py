"""DTP on packed rows: where a branch's rows stand, and one pruning step (madtp_kernels.score_and_prune).

The decision itself (token importance, the per-sample threshold, keep, compaction, merge) is one fused op of
madtp_kernels, the same op for both executions (ragged and padded), so they make the same decisions. The published
code's batch policy (`published_step`) keeps other tokens, chosen on the importance and thresholds of that op.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from madtp_kernels import AttentionStats, RaggedLayout, ScoredTokens, score_and_prune

from . import ragged


@dataclass
class Layout:
    """Where the packed rows of a branch stand: the ragged layout, the rows that must survive, and (composed
    only when asked) each row's position in the encoder's input."""
    ragged: RaggedLayout
    protected: Tensor | None      # bool [T]: rows never dropped besides each sample's first (None: none)
    input_positions: Tensor       # int64 [T0]: positions of the encoder's input rows
    steps: list[Tensor] = field(default_factory=list)   # kept_index of each pruning step since the input

    @property
    def cu_seqlens(self) -> Tensor:
        return self.ragged.cu_seqlens

    @property
    def max_len(self) -> int:
        return self.ragged.max_len

    @property
    def rows(self) -> int:
        return self.ragged.rows

    def positions(self) -> Tensor:
        """int64 [T]: each row's position in the encoder's input; -1 for a merged row. A gather per pruning
        step, paid only by the towers whose output puts rows back at their positions (CLIP text)."""
        pos = self.input_positions
        for kept in self.steps:
            pos = torch.cat((pos, pos.new_full((1,), -1)))[kept.long()]   # kept -1 -> the appended -1
        return pos

    def valid_mask(self) -> Tensor:
        """bool [B, max_len]: which positions of the padded batch are rows (from the host lengths)."""
        lengths = torch.tensor(self.ragged.lengths(), dtype=torch.long, device=self.ragged.device)
        return torch.arange(self.max_len, device=lengths.device) < lengths[:, None]

    def sample_ids(self) -> Tensor:
        """int64 [T]: the sample of each row."""
        return ragged.segment_ids(self.cu_seqlens, self.rows)

    def first_rows(self) -> Tensor:
        """int64 [B']: the first row of each non-empty sample (from the host offsets: no device work)."""
        off = self.ragged.offsets
        return torch.tensor([a for a, b in zip(off[:-1], off[1:], strict=True) if b > a], dtype=torch.long,
                            device=self.ragged.device)

    def candidates(self) -> Tensor:
        """bool [T]: rows that may be dropped and that the alignment pools (all but first and protected)."""
        mask = torch.ones(self.rows, dtype=torch.bool, device=self.ragged.device)
        mask[self.first_rows()] = False
        return mask if self.protected is None else mask & ~self.protected


def _score(x: Tensor, layout: Layout, stats: AttentionStats, attn_out: Tensor, align_scores: Tensor,
           temperature: float, merge: bool, importance: str) -> ScoredTokens:
    # The one call of the decision op: both policies score tokens with the same formula.
    return score_and_prune(x, layout.ragged, stats, attn_out, align_scores, temperature=temperature,
                           protected=layout.protected, merge=merge, importance=importance)


def prune_step(x: Tensor, layout: Layout, stats: AttentionStats, attn_out: Tensor, align_scores: Tensor,
               temperature: float, merge: bool, importance: str = "minmax") -> tuple[Tensor, Layout]:
    """Drop each sample's candidate rows whose importance does not exceed its threshold; merge them into one."""
    out = _score(x, layout, stats, attn_out, align_scores, temperature, merge, importance)
    return out.x, Layout(out.layout, out.protected, layout.input_positions, [*layout.steps, out.kept_index])


# The published code's merged row: the dropped tokens weighted by TIS / (sum TIS + 1e-8) (models/vit.py
# Block.Reduce_token), a zero row where their TIS sum to 0.
PUBLISHED_MERGE_EPS = 1e-8


def published_step(x: Tensor, layout: Layout, stats: AttentionStats, attn_out: Tensor, align_scores: Tensor,
                   temperature: float, merge: bool, importance: str = "minmax") -> tuple[Tensor, Layout] | None:
    """The published code's batch policy (double125/MADTP models/vit.py Block.Reduce_token, med.py for text) on
    the TIS and thresholds of our decision op: k = the largest count, over the batch, of candidates with
    TIS > theta; every sample keeps its min(k, candidates) highest-TIS candidates (ties: the earlier row) besides
    its first and protected rows, in their order, and (merge) one row after them, the TIS-weighted sum of the
    rest. None where the layer does not prune: k < 1, or no sample would drop more than one token (the official
    skip rule, reduce_num <= 1, read per sample for ragged text). A sample that would drop exactly one token
    keeps it: its merged row would cost the row it saves. One host read besides the op's: the skip flag and the
    new offsets together. The merged row's weights carry no gradient (the op's importance is detached)."""
    scored = _score(x, layout, stats, attn_out, align_scores, temperature, False, importance)
    ragged = layout.ragged
    batch, rows, device = ragged.batch, ragged.rows, x.device
    cand = layout.candidates()
    seg = layout.sample_ids()
    tis = scored.importance

    def counts(mask: Tensor) -> Tensor:   # [B]: rows of each sample where mask holds
        return torch.zeros(batch, dtype=torch.long, device=device).index_add_(0, seg, mask.long())

    n_cand = counts(cand)
    top = counts(cand & (tis > scored.threshold[seg])).amax() if batch else n_cand.new_zeros(())
    drop = n_cand - torch.minimum(n_cand, top)
    drop = torch.where(drop == 1, 0, drop)
    skip = (top < 1) | ~(drop > 1).any()
    has_merged = (drop > 0) & merge
    cu_new = torch.cat((ragged.cu_seqlens.new_zeros(1),
                        (ragged.cu_seqlens.diff() - drop + has_merged).cumsum(0).to(torch.int32)))
    host = torch.cat((skip.reshape(1).to(torch.int32), cu_new)).tolist()   # the one host read
    if host[0]:
        return None
    # Each candidate's rank by TIS within its sample (0: the highest), through a [B, L] grid sorted stably.
    local = torch.arange(rows, device=device) - ragged.cu_seqlens.long()[seg]
    grid = torch.full((batch, ragged.max_len), float("-inf"), dtype=tis.dtype, device=device)
    grid[seg, local] = torch.where(cand, tis, float("-inf"))
    order = torch.sort(grid, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(ragged.max_len, device=device).expand_as(order))
    keep = ~cand | (rank[seg, local] < (n_cand - drop)[seg])
    # Output rows: each sample's kept rows in order, then its merged row (a slot past the end where none).
    rows_new = host[-1]
    cu = cu_new.long()
    n_keep = counts(keep)
    before = keep.long().cumsum(0) - keep.long() - (n_keep.cumsum(0) - n_keep)[seg]   # kept rows before, in sample
    dest = torch.where(keep, cu[:-1][seg] + before, rows_new)
    kept_index = torch.full((rows_new + 1,), -1, dtype=torch.int32, device=device)
    kept_index.index_put_((dest,), torch.arange(rows, dtype=torch.int32, device=device))
    kept_index = kept_index[:rows_new]
    y = x.index_select(0, kept_index.clamp_min(0).long())
    if merge:
        dropped = cand & ~keep
        w = torch.where(dropped, tis, 0)
        total = torch.zeros(batch, dtype=w.dtype, device=device).index_add_(0, seg, w)
        w = w / (total[seg] + PUBLISHED_MERGE_EPS)
        # dropped rows only: a kept row's inf times a zero weight would be NaN
        part = torch.where(dropped[:, None], x.to(w.dtype) * w[:, None], 0)
        merged = torch.zeros(batch, x.shape[1], dtype=w.dtype, device=device).index_add(0, seg, part)
        slot = torch.where(has_merged, cu[1:] - 1, rows_new)
        y = torch.cat((y, y.new_zeros(1, x.shape[1]))).index_copy(0, slot, merged.to(x.dtype))[:rows_new]
    protected = None
    if layout.protected is not None:
        protected = layout.protected[kept_index.clamp_min(0).long()] & (kept_index >= 0)
    new = RaggedLayout._from_host(cu_new, host[1:])
    return y, Layout(new, protected, layout.input_positions, [*layout.steps, kept_index])
