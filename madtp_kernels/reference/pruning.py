"""score_and_prune in plain PyTorch: the `torch` backend (CPU path) and the recompute that gives every backend
its gradient.

Inputs arrive validated and contiguous (madtp_kernels.pruning). The per-sample reductions (min/max over a
sample's candidates, the softmax over its tokens) run on a padded [B, L] grid gathered from the packed rows:
each is then one dense op, whatever B, and no step reads anything back to the host. The grid holds per-token
scalars (and the [B, L, K] alignment scores), never the rows themselves.

Non-finite values (README "Non-finite values", the same on every backend): IEEE propagation, no host sync.
Maxima and minima propagate NaN (torch.amax / amin); a term is 0 where its span over the candidates is exactly 0,
and only there, so a NaN or infinite term of one candidate reaches every candidate's TIS through the min-max
normalisation; a softmax whose logits are all -inf (a sample without candidates, or an alignment token scoring
-inf on every candidate) has zero weights, and otherwise a NaN or +inf logit makes theta NaN. TIS > NaN is
false: a NaN theta drops every candidate (but a lone one with merge: the no-saving rule), and their NaN weights
make the merged row NaN. The first row's
attention output is read (head weights), no other's (importance="official": each candidate's own, and a
non-finite received or alignment term reaches every candidate through its sum over the candidates, as through
the min-max span); rows that are not candidates (first, protected, padding)
never reach the importance or theta, and a kept row's values never reach the merged row (selected away, not
multiplied by a zero weight).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .tokens import accumulate_dtype, offsets_of, segment_matmul


def _grid(cu_seqlens: Tensor, rows: int, max_len: int):
    """(valid [B, L], row index [B, L] clamped into [0, rows), position [L])."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    pos = torch.arange(max_len, device=cu_seqlens.device)
    valid = pos < lengths[:, None]
    index = (starts[:, None] + pos).clamp_max(max(rows - 1, 0))
    return valid, index, pos, starts


# The official MADTP code's guard against an empty sum (models/vit.py: "/ (x.sum(...) + 1e-8)").
OFFICIAL_EPS = 1e-8


def _official_grid(received_max: Tensor, cls: Tensor, attn_out: Tensor, al: Tensor, cand: Tensor, index: Tensor,
                   acc: torch.dtype) -> Tensor:
    """TIS [B, L] of the official formula (double125/MADTP models/vit.py, Block.Reduce_token): received max
    over heads (stats.headmax) and alignment max over K, each over its sum over the candidates (+ 1e-8), and
    the cls attention weighted by the token's own head-output norms (not normalised over tokens)."""
    norms = torch.linalg.vector_norm(attn_out.to(acc), dim=-1)                               # [T, H]
    c = (cls.to(acc) * norms).sum(-1) / (norms.sum(-1) + OFFICIAL_EPS)                       # [T]
    # Off the candidates a term is replaced, not multiplied by 0: a NaN there must not reach anything.
    r = torch.where(cand, received_max.to(acc)[index], 0)
    a = torch.where(cand, al.amax(-1), 0)
    r_n = r / (r.sum(1, keepdim=True) + OFFICIAL_EPS)
    a_n = a / (a.sum(1, keepdim=True) + OFFICIAL_EPS)
    return torch.where(cand, (r_n + a_n + c[index]) / 3, 0)


def importance_grid(cu_seqlens: Tensor, received: Tensor, cls: Tensor, attn_out: Tensor, align: Tensor,
                    protected: Tensor | None, max_len: int, acc: torch.dtype, headmax: Tensor | None = None,
                    importance: str = "minmax"):
    """(TIS [B, L], candidates [B, L], valid [B, L], row index [B, L], alignment scores [B, L, K]).

    "minmax": TIS = the mean of three terms, each min-max normalised over the sample's candidates (every row
    but the first and the protected ones; 0 elsewhere and where the term is constant): attention received (max
    over heads), attention from the first row with heads weighted by the norm of their output there, alignment
    (max over alignment tokens). "official": _official_grid (headmax is then stats.headmax [T]).
    Differentiable in attn_out and align (received, cls and headmax are statistics)."""
    rows = received.shape[0]
    valid, index, pos, starts = _grid(cu_seqlens, rows, max_len)
    cand = valid & (pos > 0)
    if protected is not None:
        cand = cand & ~protected[index]
    if importance == "official":
        al = align[index].to(acc)                                                            # [B, L, K]
        return _official_grid(headmax, cls, attn_out, al, cand, index, acc), cand, valid, index, al
    norms = torch.linalg.vector_norm(attn_out.index_select(0, starts.clamp_max(rows - 1)).to(acc), dim=-1)
    head_weight = norms / norms.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)      # [B, H]
    al = align[index].to(acc)                                                                # [B, L, K]
    terms = torch.stack((received.to(acc).amax(1)[index],
                         torch.bmm(cls.to(acc)[index], head_weight[:, :, None]).squeeze(-1),
                         al.amax(-1)), dim=-1)                                               # [B, L, 3]
    # Min-max over the candidates (0 where a term is constant, and off the candidates). The divisor is made
    # safe before dividing: the backward recomputes this, and 0/0 would give NaN gradients. A NaN or infinite
    # span is divided by (IEEE propagation, module docstring); only an exact 0 means "constant".
    lo = terms.masked_fill(~cand[..., None], float("inf")).amin(1, keepdim=True)
    span = terms.masked_fill(~cand[..., None], float("-inf")).amax(1, keepdim=True) - lo
    ok = cand[..., None] & (span != 0)
    normed = torch.where(ok, (terms - lo) / torch.where(ok, span, 1), 0)
    return normed.sum(-1) / 3, cand, valid, index, al


def threshold_grid(tis: Tensor, cand: Tensor, al: Tensor, temperature: float) -> Tensor:
    """theta [B] = min over alignment tokens k of sum_i softmax_i(A_ik / temperature) TIS_i over candidates i
    (0 for a sample without candidates). No gradient: the threshold is a decision."""
    logits = (al.detach() / temperature).masked_fill(~cand[..., None], float("-inf"))       # [B, L, K]
    # All -inf (a sample without candidates, or a token at -inf on every candidate): zero weights, where
    # softmax gives NaN. Any other NaN stays (no nan_to_num: a NaN logit or TIS must reach theta).
    empty = logits.amax(1, keepdim=True) == float("-inf")
    weights = torch.softmax(logits, dim=1).masked_fill_(empty, 0.0)
    return torch.bmm(tis.detach()[:, None, :], weights).squeeze(1).amin(-1)


def merge_weights(tis: Tensor, drop: Tensor) -> Tensor:
    """[B, L]: each dropped token's weight in its sample's merged row, TIS / sum TIS (the plain mean where the
    TIS of the dropped tokens sum to 0); 0 on tokens that stay."""
    w = torch.where(drop, tis, 0)
    total = w.sum(1, keepdim=True)
    uniform = total == 0
    count = drop.sum(1, keepdim=True).clamp_min(1).to(w.dtype)
    return torch.where(uniform, drop.to(w.dtype), w) / torch.where(uniform, count, total)


def keep_grid(tis: Tensor, theta: Tensor, cand: Tensor, valid: Tensor, merge: bool) -> Tensor:
    """keep [B, L]: the rows that are not candidates, and the candidates with TIS > theta; with merge, a sample
    that would drop exactly one candidate drops none (n - 1 kept rows + 1 merged row would save nothing)."""
    keep = valid & (~cand | (tis > theta[:, None]))
    if merge:
        keep = keep | (valid & ((valid & ~keep).sum(1, keepdim=True) == 1))
    return keep


def score_and_prune(x: Tensor, cu_seqlens: Tensor, received: Tensor, cls: Tensor, attn_out: Tensor, align: Tensor,
                    temperature: float, protected: Tensor | None, merge: bool, max_len: int,
                    headmax: Tensor | None = None, importance: str = "minmax"):
    """-> (y [T, C], cu_new int32 [B+1], kept_index int32 [T], protected_new bool [T] (or [0]),
    importance fp32 [T], theta fp32 [B]). Output rows at and past cu_new[-1] are capacity, not results."""
    rows, batch = x.shape[0], cu_seqlens.shape[0] - 1
    acc = accumulate_dtype(x.dtype)
    if rows == 0:
        return (x.new_empty(x.shape), torch.zeros_like(cu_seqlens), cu_seqlens.new_empty((0,)),
                torch.zeros(0 if protected is None else 0, dtype=torch.bool, device=x.device),
                x.new_empty((0,), dtype=acc), x.new_zeros((batch,), dtype=acc))
    tis, cand, valid, index, al = importance_grid(cu_seqlens, received, cls, attn_out, align, protected, max_len,
                                                  acc, headmax, importance)
    theta = threshold_grid(tis, cand, al, temperature)
    keep = keep_grid(tis, theta, cand, valid, merge)
    drop = valid & ~keep
    has_merged = drop.any(1) if merge else torch.zeros_like(drop[:, 0])
    cu_new = offsets_of((keep.sum(1) + has_merged).to(torch.int32))
    # Each kept token's output row; rows == a slot past the end for everything that lands nowhere.
    dest = torch.where(keep, cu_new[:-1].long()[:, None] + keep.cumsum(1) - 1, rows)
    source = torch.zeros(rows + 1, dtype=torch.long, device=x.device).scatter_(0, dest.view(-1), index.view(-1))
    y = x.new_empty((rows + 1, x.shape[1]))
    if merge:
        merged_row = torch.where(has_merged, cu_new[1:].long() - 1, rows)
        source.scatter_(0, merged_row, -1)
        torch.index_select(x, 0, source[:rows].clamp_min(0), out=y[:rows])
        # Each sample's dropped rows times their weights: a segment (CSR) product over the sample's own rows,
        # kept rows zeroed first. (A dense [B, T] GEMM would multiply every other row by a zero weight, and
        # 0 * inf = NaN: one inf anywhere would reach every merged row.)
        weights = x.new_zeros(rows + 1, dtype=acc).scatter_add_(
            0, torch.where(valid, index, rows).view(-1), merge_weights(tis, drop).view(-1))[:rows]
        dropped = torch.zeros(rows + 1, dtype=torch.bool, device=x.device).scatter_(
            0, torch.where(drop, index, rows).view(-1), True)[:rows]
        rows_acc = torch.where(dropped[:, None], x.to(acc), 0)
        y.index_copy_(0, merged_row, segment_matmul(weights, rows_acc, cu_seqlens).to(x.dtype))
    else:
        torch.index_select(x, 0, source[:rows], out=y[:rows])
    kept_index = source[:rows]
    protected_new = (protected[kept_index.clamp_min(0)] & (kept_index >= 0) if protected is not None
                     else kept_index.new_zeros((0,), dtype=torch.bool))
    importance = tis.new_zeros(rows + 1).scatter_(0, torch.where(valid, index, rows).view(-1), tis.view(-1))
    return y[:rows], cu_new, kept_index.to(torch.int32), protected_new, importance[:rows].detach(), theta


def score_and_prune_backward(grad_y: Tensor, x: Tensor, cu_seqlens: Tensor, received: Tensor, cls: Tensor,
                             attn_out: Tensor, align: Tensor, protected: Tensor | None, merge: bool, max_len: int,
                             cu_new: Tensor, kept_index: Tensor, headmax: Tensor | None = None,
                             importance: str = "minmax") -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for x, attn_out and align, for any backend's forward: the forward's decisions (kept_index)
    are replayed, the importance is recomputed with autograd, and the output rows rebuilt from it."""
    rows = x.shape[0]
    if rows == 0:
        return torch.zeros_like(x), torch.zeros_like(attn_out), torch.zeros_like(align)
    acc = accumulate_dtype(x.dtype)
    with torch.enable_grad():
        xg, ag, alg = (t.detach().requires_grad_() for t in (x, attn_out, align))
        tis, cand, valid, index, _ = importance_grid(cu_seqlens, received, cls, ag, alg, protected, max_len, acc,
                                                     headmax, importance)
        # Capacity rows past cu_new[-1] are not results: their gradient is ignored (no host read to find them).
        live = torch.arange(rows, device=x.device) < cu_new[-1]
        source = kept_index.long()
        kept = torch.zeros(rows + 1, dtype=torch.bool, device=x.device)
        kept[torch.where(live & (source >= 0), source, rows)] = True
        keep = kept[:rows][index] & valid
        y = torch.cat((xg.index_select(0, source.clamp_min(0)), xg.new_zeros((1, x.shape[1]))))
        if merge:
            drop = valid & ~keep
            has_merged = (cu_new[1:] - cu_new[:-1]).long() > keep.sum(1)
            weights = torch.zeros((cu_seqlens.shape[0] - 1, rows), dtype=acc, device=x.device).scatter_add(
                1, index, merge_weights(tis, drop))
            merged_row = torch.where(has_merged, cu_new[1:].long() - 1, rows)
            y = y.index_copy(0, merged_row, (weights @ xg.to(acc)).to(x.dtype))
        grads = torch.autograd.grad(y[:rows], (xg, ag, alg), grad_y * live[:, None], allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (x, attn_out, align), strict=True))
