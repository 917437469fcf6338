"""score_and_prune: one op from a layer's attention results to the next layer's rows (validation, custom ops,
fake impls, dispatch).

MADTP's dynamic token pruning decides, per sample, which tokens the next layer sees: a token importance score
(TIS) from the attention statistics, the attention output and the alignment scores; a per-sample threshold
from the alignment tokens' softmax over the sample's tokens; keep the tokens above it and merge the rest into
one. Done as separate tensor ops that is hundreds of kernel launches and tens of host syncs per layer; here it
is one op per backend (torch: vectorised; Triton: one program per sample, then the compaction; CUDA: one block
per sample) and one host read: the new layout's offsets.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _dispatch, _library
from . import _validation as checks
from .attention import AttentionStats
from .layout import RaggedLayout, device_offsets, resolve
from .reference import pruning as ref

SCHEMA = ("(Tensor x, Tensor cu_seqlens, Tensor received, Tensor cls, Tensor attn_out, Tensor align, "
          "float temperature, Tensor? protected, bool merge, int max_len, Tensor? headmax=None, "
          "str importance=\"minmax\") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
IMPORTANCE = ("minmax", "official")


class ScoredTokens(NamedTuple):
    x: Tensor              # [T', C]: each sample's kept rows in order, then its merged row (if any was dropped)
    layout: RaggedLayout   # of x
    kept_index: Tensor     # int32 [T']: the input row of each output row; -1 for a merged row
    protected: Tensor | None   # bool [T']: the protected flags carried to the output rows (None if none given)
    importance: Tensor     # [T] (fp32; fp64 for fp64 x): each input row's TIS, 0 for rows that are not candidates
    threshold: Tensor      # [B]: each sample's theta; a candidate is kept iff its TIS > theta

    @property
    def cu_seqlens(self) -> Tensor:
        return self.layout.cu_seqlens


def _triton():
    from .triton import pruning  # first use: Triton reads TRITON_INTERPRET when kernels are decorated
    return pruning


def _score_and_prune_triton(*args):
    return _triton().score_and_prune(*args)


def _fake(x, cu_seqlens, received, cls, attn_out, align, temperature, protected, merge, max_len, headmax=None,
          importance="minmax"):
    acc = ref.accumulate_dtype(x.dtype)
    rows = x.shape[0]
    return (torch.empty_like(x), torch.empty_like(cu_seqlens), cu_seqlens.new_empty((rows,)),
            x.new_empty((rows if protected is not None else 0,), dtype=torch.bool),
            x.new_empty((rows,), dtype=acc), x.new_empty((cu_seqlens.shape[0] - 1,), dtype=acc))


def _setup(ctx, inputs, output):
    x, cu, received, cls, attn_out, align, _temperature, protected, merge, max_len, *rest = inputs
    headmax, importance = (list(rest) + [None, "minmax"][len(rest):])[:2]   # the schema's defaults
    _y, cu_new, kept_index, *_ = output
    ctx.merge, ctx.max_len, ctx.importance = merge, max_len, importance
    ctx.save_for_backward(x, cu, received, cls, attn_out, align, protected, cu_new, kept_index, headmax)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_y, *_):
    x, cu, received, cls, attn_out, align, protected, cu_new, kept_index, headmax = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    gx, ga, gal = ref.score_and_prune_backward(grad_y, x, cu, received, cls, attn_out, align, protected,
                                               ctx.merge, ctx.max_len, cu_new, kept_index, headmax, ctx.importance)
    return gx, None, None, None, ga, gal, None, None, None, None, None, None


_library.define("score_and_prune", SCHEMA, {"torch": ref.score_and_prune, "triton": _score_and_prune_triton},
                fake=_fake, backward=_backward, setup_context=_setup)


# ------------------------------------------------------------------ public API

def score_and_prune(x: Tensor, layout: RaggedLayout | Tensor, stats: AttentionStats | tuple[Tensor, Tensor],
                    attn_out: Tensor, align_scores: Tensor, *, temperature: float, protected: Tensor | None = None,
                    merge: bool = True, importance: str = "minmax") -> ScoredTokens:
    """MADTP's pruning step on packed rows: importance, per-sample threshold, keep, compaction, merged row.

    x [T, C] rows in `layout` (a RaggedLayout, or int32 cu_seqlens [B+1], validated); stats: the layer's
    `varlen_attention(..., return_stats=True)` statistics (received, cls [T, H] fp32; headmax [T] fp32, needed
    by importance="official"); attn_out [T, H, D]: the attention output (its per-head norms weight the cls
    term); align_scores [T, K] fp32: the alignment scores of the rows; temperature > 0: of the threshold's
    softmax over tokens; protected: bool [T], rows never dropped (each sample's first row never is). merge:
    append one row per sample that dropped any, the TIS-weighted mean of the dropped rows (their plain mean if
    those TIS sum to 0).

    Over the candidates i of a sample (rows neither first nor protected), a_i = max_k A_ik and
    importance="minmax" (the default): TIS_i = (r~_i + c~_i + a~_i) / 3 where ~ is a min-max normalisation
    over the sample's candidates (0 where constant), r_i = max_h received[i, h], c_i = sum_h w_h cls[i, h]
    with w_h = |attn_out[first, h]| / sum_h' |attn_out[first, h']| (the sample's first row's head norms);
    importance="official" (double125/MADTP models/vit.py, Attention.forward and Block.Reduce_token):
    TIS_i = (r_i / (sum_j r_j + 1e-8) + a_i / (sum_j a_j + 1e-8) + c_i) / 3, sums over the candidates,
    r_i = stats.headmax[i] (sum over the non-first queries of the max over heads), c_i = sum_h cls[i, h]
    n_ih / (sum_h n_ih + 1e-8) with n_ih = |attn_out[i, h]| (the token's own head norms; c is not normalised
    over tokens, and A may be negative, as there).
    theta_b = min_k sum_i softmax_i(A_ik / temperature) TIS_i; a candidate stays iff TIS_i > theta_b, except
    that with merge a sample that would drop exactly one candidate keeps it (n - 1 kept rows + the merged row
    would save nothing; the official code skips the layer when at most one token would go). Without merge,
    dropping one row saves one and happens.
    Gradients flow to x, attn_out and align_scores (through the merged row); one host read (the new offsets).
    """
    for name, t in (("x", x), ("attn_out", attn_out), ("align_scores", align_scores)):
        checks.check_tensor(t, name)
    if isinstance(stats, AttentionStats):
        received, cls, headmax = stats.received, stats.cls, stats.headmax
    elif isinstance(stats, tuple) and len(stats) == 2:
        (received, cls), headmax = stats, None
    else:
        raise TypeError(f"stats: expected AttentionStats(received, cls), got {type(stats).__name__}")
    if not isinstance(importance, str) or importance not in IMPORTANCE:
        raise ValueError(f"importance: expected one of {IMPORTANCE}, got {importance!r}")
    if importance == "official":
        if headmax is None:
            raise ValueError("stats.headmax: importance=\"official\" needs the statistics' headmax [T] fp32 "
                             "(varlen_attention's max over heads of the probability, summed over queries), got None")
        checks.check_tensor(headmax, "stats.headmax")
    else:
        headmax = None   # unused by minmax: not validated, not passed
    checks.check_tensor(received, "stats.received")
    checks.check_tensor(cls, "stats.cls")
    checks.check_ndim(x, "x", 2, "2-D [T, C]")
    checks.check_floating(x, "x")
    checks.check_sizes(x, "x", (1,), "channels")
    checks.check_same_device(x, "x", layout=device_offsets(layout, "layout"),
                             **{"stats.received": received, "stats.cls": cls, "stats.headmax": headmax},
                             attn_out=attn_out,
                             align_scores=align_scores, protected=protected)
    rows = x.shape[0]
    cu, given, offsets = resolve(layout, "layout", rows)
    max_len = given.max_len if given is not None else checks.check_max_len(None, "max_len", offsets)
    acc = ref.accumulate_dtype(x.dtype)
    for name, t in (("stats.received", received), ("stats.cls", cls)):
        checks.check_ndim(t, name, 2, "2-D [T, H]")
        if t.dtype != acc:
            raise TypeError(f"{name}: expected dtype {acc} (varlen_attention's statistics for {x.dtype} rows), "
                            f"got {t.dtype}")
        if t.shape[0] != rows:
            raise ValueError(f"{name}: expected {rows} rows (as x), got shape {tuple(t.shape)}")
    if headmax is not None:
        if headmax.dtype != acc:
            raise TypeError(f"stats.headmax: expected dtype {acc} (varlen_attention's statistics for {x.dtype} "
                            f"rows), got {headmax.dtype}")
        if tuple(headmax.shape) != (rows,):
            raise ValueError(f"stats.headmax: expected shape ({rows},) (one per row of x), got "
                             f"{tuple(headmax.shape)}")
    heads = received.shape[1]
    if cls.shape[1] != heads or heads < 1:
        raise ValueError(f"stats.cls: expected [{rows}, {heads}] (as stats.received, at least one head), got "
                         f"{tuple(cls.shape)}")
    checks.check_ndim(attn_out, "attn_out", 3, "3-D [T, H, D]")
    checks.check_floating(attn_out, "attn_out")
    checks.check_sizes(attn_out, "attn_out", (2,), "head dim")
    if attn_out.shape[:2] != (rows, heads):
        raise ValueError(f"attn_out: expected [{rows}, {heads}, D] (x's rows, the statistics' heads), got "
                         f"{tuple(attn_out.shape)}")
    checks.check_ndim(align_scores, "align_scores", 2, "2-D [T, K]")
    if align_scores.dtype != acc:
        raise TypeError(f"align_scores: expected dtype {acc} (scores accumulate in it), got {align_scores.dtype}")
    if align_scores.shape[0] != rows or align_scores.shape[1] < 1:
        raise ValueError(f"align_scores: expected [{rows}, K] with K >= 1 alignment tokens, got "
                         f"{tuple(align_scores.shape)}")
    temperature = checks.check_float(temperature, "temperature", positive=True)
    if protected is not None:
        checks.check_tensor(protected, "protected")
        checks.check_dtype(protected, "protected", (torch.bool,))
        if tuple(protected.shape) != (rows,):
            raise ValueError(f"protected: expected shape ({rows},) (one per row of x), got {tuple(protected.shape)}")
    checks.check_bool(merge, "merge")
    impl = _dispatch.select("score_and_prune", x.device, x.dtype, attn_out.dtype)
    y, cu_new, kept_index, protected_new, importance, theta = impl(
        x.contiguous(), cu.contiguous(), received.contiguous(), cls.contiguous(), attn_out.contiguous(),
        align_scores.contiguous(), temperature, None if protected is None else protected.contiguous(),
        merge, max_len, None if headmax is None else headmax.contiguous(), importance)
    new = RaggedLayout._read(cu_new, bound=max_len)   # the one host read: row count and longest length
    n = new.rows
    torch._check(0 <= n)   # under torch.compile n is an unbacked symbol: the slices below then share it
    torch._check(n <= rows)
    return ScoredTokens(y[:n], new, kept_index[:n], None if protected is None else protected_new[:n],
                        importance, theta)
