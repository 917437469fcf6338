"""Running an encoder's layers on pruned token sets: ragged (packed rows, varlen kernels) or padded (baseline),
with our per-sample pruning decisions, or the published code's batch policy (padded).

A model family describes its layer once as a function `layer_fn(layer, x, ctx)` over the layer's own
submodules; `ctx.attend` and `ctx.prune` are what the two executions implement differently:
- `RaggedContext`: x is packed rows [T, C]; attention is `madtp_kernels.varlen_attention` (with the stats
  pruning needs, and no [T, T] matrix); pruning compacts the rows with `prune_tokens`.
- `PaddedContext`: x is [B, L, C] padded to the batch's longest sample; attention is masked SDPA, or an explicit
  softmax where the stats are needed (what the published code does); after pruning the batch is padded again.
Both make their pruning decisions through `pruning.prune_step` on packed rows, so they compute the same thing.
- `PublishedContext`: the padded execution with the published code's policy (`pruning.published_step`: every
  sample keeps the batch's largest keep count), on the TIS and thresholds of the same op: only the policy differs.
A layer that cross-attends (BLIP's text layers to the image) reads `ctx.memory` (packed rows, or [B, M, C]) and
calls `ctx.cross_attend`: each sample's queries see only its own memory rows, without padding in the ragged
execution, through a key mask in the padded one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from madtp_kernels import AttentionStats, RaggedLayout, pack, unpack, varlen_attention
from madtp_kernels.reference.tokens import offsets_of

from . import pruning
from .pruning import Layout


@dataclass
class BranchRecord:
    """What one forward of a branch leaves behind for the loss and the reports.

    `kept` costs nothing (host ints the layouts carry anyway). `pooled` and `summaries` are training work:
    they are computed only when the forward records (`training=True`: a forward with autograd on, or inside
    `madtp.recording(model)`); at inference they stay empty."""
    pooled: Tensor | None = None                          # [B, K, d] alignment features summed over layers
    kept: dict[str, list[int]] = field(default_factory=dict)  # layer name -> rows per sample after that layer
    # [B, C] per layer: the state of each sample's summary token after the layer (its protected token where it
    # has one, CLIP text's EOT; else its first, CLS): what layer-wise distillation compares with the teacher
    summaries: list[Tensor] = field(default_factory=list)


@dataclass
class BranchPlan:
    """How a branch prunes in this forward."""
    name: str                    # "vision" or "text": the alignment map and the temperature to use
    temperature: float | None    # None: no pruning
    prune_layers: frozenset[int] | None
    merge: bool
    alignment: object            # AlignmentTokens
    layer_names: list[str]
    causal: bool = False
    training: bool = True        # record the pooled alignment features and the per-layer summaries
    importance: str = "minmax"   # the token importance formula (MADTPConfig.importance)


@dataclass
class Memory:
    """What a branch's layers cross-attend to: x [B, M, C] whose rows `valid` [B, M] exist."""
    x: Tensor
    valid: Tensor


class _Context:
    def __init__(self, plan: BranchPlan, layout: Layout, record: BranchRecord):
        self.plan, self.layout, self.record = plan, layout, record
        self.layer = 0
        self.memory: Tensor | None = None   # in this execution's layout, see the subclasses

    def _prunes(self) -> bool:
        p = self.plan
        return p.temperature is not None and (p.prune_layers is None or self.layer in p.prune_layers)

    @property
    def wants_stats(self) -> bool:
        return self._prunes()

    @property
    def wants_headmax(self) -> bool:
        """The official importance's received term (AttentionStats.headmax) is needed in this layer."""
        return self.plan.importance == "official" and self._prunes()

    def _align_and_prune(self, rows: Tensor, attn_out: Tensor | None, stats: AttentionStats | None):
        """Alignment scores where something uses them (a pruning layer; every layer while training), the
        pooled alignment features (training) and, in a pruning layer, the pruning step. rows: packed [T, C]."""
        plan, layout = self.plan, self.layout
        prunes = self._prunes()
        if not (prunes or plan.training):
            return None
        scores, h = plan.alignment.scores(rows, plan.name)
        if plan.training:
            rec = self.record
            pooled = plan.alignment.pooled(scores, h, layout.ragged, layout.candidates())
            rec.pooled = pooled if rec.pooled is None else rec.pooled + pooled
        if not prunes:
            return None
        step = self._step(rows, layout, stats, attn_out, scores)
        out = None
        if step is not None:
            out, self.layout = step
        self.record.kept[plan.layer_names[self.layer]] = self.layout.ragged.lengths()
        return out

    def _step(self, rows: Tensor, layout: Layout, stats: AttentionStats, attn_out: Tensor, scores: Tensor):
        """The pruning policy, here our per-sample decisions. -> (rows, layout) after the layer; None: the layer
        leaves the rows as they are."""
        plan = self.plan
        return pruning.prune_step(rows, layout, stats, attn_out, scores, plan.temperature, plan.merge,
                                  plan.importance)


class RaggedContext(_Context):
    def __init__(self, plan: BranchPlan, layout: Layout, record: BranchRecord, memory: Memory | None = None):
        super().__init__(plan, layout, record)
        if memory is not None:
            self.memory, self._memory_layout = pack(memory.x, memory.valid)

    def cross_attend(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
        """q [T, H, D] over k, v [Tm, H, D] (rows of self.memory) -> out [T, H, D]."""
        return varlen_attention(q, k, v, self.layout.ragged, self._memory_layout, scale=scale)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = False):
        """q, k, v [T, H, D] -> (out [T, H, D], stats or None)."""
        res = varlen_attention(q, k, v, self.layout.ragged, scale=scale, causal=causal,
                               return_stats=self.wants_stats, headmax_stats=self.wants_headmax)
        return res if self.wants_stats else (res, None)

    def prune(self, x: Tensor, attn_out: Tensor, stats: AttentionStats | None) -> Tensor:
        out = self._align_and_prune(x, attn_out, stats)
        return x if out is None else out

    def rows(self, x: Tensor) -> Tensor:
        return x


class PaddedContext(_Context):
    """x is [B, L, C] with L = the longest sample; rows past a sample's length are padding."""

    def __init__(self, plan: BranchPlan, layout: Layout, record: BranchRecord, memory: Memory | None = None):
        super().__init__(plan, layout, record)
        if memory is not None:
            self.memory, self._memory_valid = memory.x, memory.valid

    def cross_attend(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
        """q [B, L, H, D] over k, v [B, M, H, D] (self.memory's rows), masked to the valid ones."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._memory_valid[:, None, None, :], scale=scale)
        return out.transpose(1, 2)

    def _valid(self) -> Tensor:
        return self.layout.valid_mask()   # [B, L]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = False):
        """q, k, v [B, L, H, D] -> (out [B, L, H, D], stats on packed rows or None)."""
        valid = self._valid()
        allowed = valid[:, None, None, :]                                 # [B, 1, 1(q), L(k)]
        if causal:
            length = q.shape[1]
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                   # [B, H, L, D]
        if not self.wants_stats:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
            return out.transpose(1, 2), None
        probs = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf")), dim=-1)
        out = probs @ v
        probs = probs.detach().float() * valid[:, None, :, None]          # padding queries give nothing
        received = probs.sum(dim=2).transpose(1, 2)                       # [B, L(k), H]
        cls = probs[:, :, 0, :].transpose(1, 2)                           # [B, L(k), H]
        headmax = None
        if self.wants_headmax:   # sum over queries but each sample's first of the max over heads
            headmax = pack(probs[:, :, 1:, :].amax(dim=1).sum(dim=1), valid)[0]
        stats = AttentionStats(pack(received, valid)[0], pack(cls, valid)[0], headmax)
        return out.transpose(1, 2), stats

    def rows(self, x: Tensor) -> Tensor:
        return pack(x, self._valid())[0]

    def prune(self, x: Tensor, attn_out: Tensor, stats: AttentionStats | None) -> Tensor:
        valid = self._valid()
        rows = pack(x, valid)[0]
        out = self._align_and_prune(rows, pack(attn_out, valid)[0] if stats is not None else None, stats)
        if out is None:
            return x
        return unpack(out, self.layout.ragged)


class PublishedContext(PaddedContext):
    """The published code's batch policy in its padded execution: every sample keeps the batch's largest keep
    count of its top-TIS candidates (`pruning.published_step`), scored by the same op as ours."""

    def _step(self, rows: Tensor, layout: Layout, stats: AttentionStats, attn_out: Tensor, scores: Tensor):
        plan = self.plan   # None where the official skip rule leaves the layer as it is
        return pruning.published_step(rows, layout, stats, attn_out, scores, plan.temperature, plan.merge,
                                      plan.importance)


def run_layers(layers, layer_fn, x: Tensor, valid: Tensor, protected: Tensor | None, plan: BranchPlan,
               execution: str, memory: Memory | None = None) -> tuple[Tensor, Layout, BranchRecord]:
    """Run `layers` on x [B, N, C] whose valid tokens are `valid` [B, N] (None: all); returns packed rows [T, C], their
    layout and the record. protected [B, N]: tokens never dropped besides each sample's first. memory: what
    the layers cross-attend to (same batch), if anything."""
    batch, n = x.shape[:2]
    if valid is None:   # every token exists (an image): the packed rows are x itself, no copy, no host read
        rows, ragged = x.reshape(batch * n, x.shape[-1]), RaggedLayout.uniform(batch, n, x.device)
        positions = torch.arange(n, device=x.device).repeat(batch)
        prot = protected.reshape(-1) if protected is not None else None
    else:
        # One selection of the valid tokens for the rows, their positions and their protected flags (under
        # torch.compile one data-dependent size, not three that it cannot prove equal).
        flat = valid.reshape(-1).nonzero().squeeze(1)
        rows = x.reshape(batch * n, x.shape[-1]).index_select(0, flat)
        ragged = RaggedLayout._read(offsets_of(valid.sum(1, dtype=torch.int32)), bound=n)
        torch._check(ragged.rows == rows.shape[0])
        positions = flat % n
        prot = protected.to(valid.device).reshape(-1).index_select(0, flat) if protected is not None else None
    layout = Layout(ragged, prot, positions)
    record = BranchRecord()
    if execution == "ragged":
        ctx, h = RaggedContext(plan, layout, record, memory), rows
    else:
        ctx = (PublishedContext if execution == "published" else PaddedContext)(plan, layout, record, memory)
        h = unpack(rows, ragged)
    for i, layer in enumerate(layers):
        ctx.layer = i
        h = layer_fn(layer, h, ctx)
        if plan.training:
            record.summaries.append(summary_rows(ctx.rows(h), ctx.layout))
    return ctx.rows(h), ctx.layout, record


def summary_rows(rows: Tensor, layout: Layout) -> Tensor:
    """[B, C]: each sample's protected row if it has one, else its first row (zeros for an empty sample)."""
    off = layout.ragged.offsets
    nonempty = torch.tensor([b for b in range(layout.ragged.batch) if off[b + 1] > off[b]], dtype=torch.long,
                            device=rows.device)
    out = rows.new_zeros((layout.ragged.batch, rows.shape[-1])).index_copy(0, nonempty, rows[layout.first_rows()])
    if layout.protected is not None and bool(layout.protected.any()):
        index = layout.protected.nonzero().squeeze(1)
        out = out.index_copy(0, layout.sample_ids()[index], rows[index])
    return out
