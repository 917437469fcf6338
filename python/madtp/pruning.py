"""DTP on packed rows: where a branch's rows stand, and one pruning step (madtp_kernels.score_and_prune).

The decision itself (token importance, the per-sample threshold, keep, compaction, merge) is one fused op of
madtp_kernels, the same op for both executions (ragged and padded), so they make the same decisions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from madtp_kernels import AttentionStats, RaggedLayout, score_and_prune

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


def prune_step(x: Tensor, layout: Layout, stats: AttentionStats, attn_out: Tensor, align_scores: Tensor,
               temperature: float, merge: bool) -> tuple[Tensor, Layout]:
    """Drop each sample's candidate rows whose importance does not exceed its threshold; merge them into one."""
    out = score_and_prune(x, layout.ragged, stats, attn_out, align_scores, temperature=temperature,
                          protected=layout.protected, merge=merge)
    return out.x, Layout(out.layout, out.protected, layout.input_positions, [*layout.steps, out.kept_index])
