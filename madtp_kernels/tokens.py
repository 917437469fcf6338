"""Ragged token ops: pack, unpack, prune_tokens (validation, custom ops, fake impls, dispatch).

Layout (DESIGN.md): a batch of B sequences is stored packed, `x[T, ...]` with int32 `cu_seqlens[B+1]`;
sequence b is `x[cu_seqlens[b]:cu_seqlens[b+1]]` and may be empty.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _dispatch, _library
from . import _validation as checks
from .layout import RaggedLayout, device_offsets, max_len_of, resolve
from .reference import tokens as ref

SCHEMAS = {
    "pack": "(Tensor x, Tensor mask) -> (Tensor, Tensor)",
    "unpack": "(Tensor packed, Tensor cu_seqlens, int max_len, float pad_value) -> Tensor",
    "prune_tokens": "(Tensor x, Tensor cu_seqlens, Tensor scores, Tensor threshold, int keep_first, bool merge)"
                    " -> (Tensor, Tensor, Tensor)",
}


class PrunedTokens(NamedTuple):
    x: Tensor              # [T', C]: each sample's kept rows in order, then its merged row (if any were dropped)
    layout: RaggedLayout   # of x
    kept_index: Tensor     # int32 [T']: the row of the input each output row came from; -1 for a merged row

    @property
    def cu_seqlens(self) -> Tensor:
        return self.layout.cu_seqlens


class Packed(NamedTuple):
    x: Tensor              # [T, ...]
    layout: RaggedLayout

    @property
    def cu_seqlens(self) -> Tensor:
        return self.layout.cu_seqlens


# ------------------------------------------------------------------ backends

def _triton():
    # Imported on first use: Triton reads TRITON_INTERPRET when its kernels are decorated.
    from .triton import tokens
    return tokens


def _pack_triton(x, mask):
    return _triton().pack(x, mask)


def _unpack_triton(packed, cu_seqlens, max_len, pad_value):
    return _triton().unpack(packed, cu_seqlens, max_len, pad_value)


def _prune_tokens_triton(x, cu_seqlens, scores, threshold, keep_first, merge):
    return _triton().prune_tokens(x, cu_seqlens, scores, threshold, keep_first, merge)


def _fake_pack(x, mask):
    rows = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((rows, x.shape[2])), mask.new_empty((x.shape[0] + 1,), dtype=torch.int32)


def _fake_unpack(packed, cu_seqlens, max_len, pad_value):
    return packed.new_empty((cu_seqlens.shape[0] - 1, max_len, packed.shape[1]))


def _fake_prune_tokens(x, cu_seqlens, scores, threshold, keep_first, merge):
    rows = torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty((rows, x.shape[1])), torch.empty_like(cu_seqlens),
            cu_seqlens.new_empty((rows,)))


def _pack_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _pack_backward(ctx, grad_packed, _grad_cu):
    (mask,) = ctx.saved_tensors
    return ref.pack_backward(grad_packed, mask), None


def _unpack_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _unpack_backward(ctx, grad_out):
    (cu_seqlens,) = ctx.saved_tensors
    return ref.unpack_backward(grad_out, cu_seqlens), None, None, None


def _prune_setup(ctx, inputs, output):
    x, cu_seqlens, scores, _threshold, _keep_first, merge = inputs
    _y, cu_new, kept_index = output
    ctx.merge = merge
    ctx.save_for_backward(x, cu_seqlens, scores, cu_new, kept_index)


def _prune_backward(ctx, grad_y, _grad_cu, _grad_index):
    x, cu_seqlens, scores, cu_new, kept_index = ctx.saved_tensors
    if grad_y is None:
        grad_y = x.new_zeros((kept_index.shape[0], x.shape[1]))
    grad_x, grad_scores = ref.prune_tokens_backward(grad_y, x, cu_seqlens, scores, cu_new, kept_index, ctx.merge)
    return grad_x, None, grad_scores, None, None, None


_library.define("pack", SCHEMAS["pack"], {"torch": ref.pack, "triton": _pack_triton},
                fake=_fake_pack, backward=_pack_backward, setup_context=_pack_setup)
_library.define("unpack", SCHEMAS["unpack"], {"torch": ref.unpack, "triton": _unpack_triton},
                fake=_fake_unpack, backward=_unpack_backward, setup_context=_unpack_setup)
_library.define("prune_tokens", SCHEMAS["prune_tokens"],
                {"torch": ref.prune_tokens, "triton": _prune_tokens_triton},
                fake=_fake_prune_tokens, backward=_prune_backward, setup_context=_prune_setup)


# ------------------------------------------------------------------ public API

_LENGTH_DTYPES = (torch.int32, torch.int64)


def pack(x: Tensor, lengths: Tensor | None = None, *, mask: Tensor | None = None) -> Packed:
    """Pack a padded batch `x [B, N, ...]` into `Packed(x [T, ...], layout)` (layout.cu_seqlens: int32 [B+1]).

    Give either `lengths [B]` (sample b keeps its first lengths[b] tokens) or `mask [B, N]` (bool: the tokens
    to keep, in order). A bool `[B, N]` tensor passed as `lengths` is taken as the mask.
    """
    checks.check_tensor(x, "x")
    checks.check_ndim(x, "x", tuple(range(2, 9)), "[B, N, ...]")
    checks.check_sizes(x, "x", tuple(range(2, x.dim())), "feature dims")
    if lengths is not None and isinstance(lengths, Tensor) and lengths.dtype == torch.bool and mask is None:
        lengths, mask = None, lengths
    if (lengths is None) == (mask is None):
        raise TypeError("pack: expected exactly one of lengths [B] or mask [B, N], got "
                        + ("both" if mask is not None else "neither"))
    batch, n = x.shape[:2]
    if mask is not None:
        checks.check_tensor(mask, "mask")
        checks.check_dtype(mask, "mask", (torch.bool,))
        if tuple(mask.shape) != (batch, n):
            raise ValueError(f"mask: expected shape {(batch, n)} (x's first two dims), got {tuple(mask.shape)}")
        checks.check_same_device(x, "x", mask=mask)
    else:
        checks.check_tensor(lengths, "lengths")
        checks.check_dtype(lengths, "lengths", _LENGTH_DTYPES)
        if tuple(lengths.shape) != (batch,):
            raise ValueError(f"lengths: expected shape ({batch},) (x's batch dim), got {tuple(lengths.shape)}")
        checks.check_same_device(x, "x", lengths=lengths)
        if not torch.compiler.is_compiling() and batch:
            checks.check_has_data(lengths, "lengths")
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 0 or hi > n:
                raise ValueError(f"lengths: expected values in [0, {n}] (x.shape[1]), got min {lo}, max {hi}")
        mask = ref.prefix_mask(lengths, n)
    impl = _dispatch.select("pack", x.device, x.dtype)
    feature_shape = x.shape[2:]
    packed, cu = impl(x.reshape(batch, n, math.prod(feature_shape)).contiguous(), mask.contiguous())
    return Packed(packed.reshape(packed.shape[0], *feature_shape), RaggedLayout._read(cu, bound=n))


def unpack(packed: Tensor, cu_seqlens: Tensor | RaggedLayout, *, max_len: int | None = None,
           pad_value: float = 0.0) -> Tensor:
    """Pad packed rows back to `[B, max_len, ...]` (max_len defaults to the longest sample)."""
    checks.check_tensor(packed, "packed")
    checks.check_ndim(packed, "packed", tuple(range(1, 8)), "[T, ...]")
    checks.check_sizes(packed, "packed", tuple(range(1, packed.dim())), "feature dims")
    checks.check_same_device(packed, "packed", cu_seqlens=device_offsets(cu_seqlens, "cu_seqlens"))
    cu_seqlens, given, offsets = resolve(cu_seqlens, "cu_seqlens", packed.shape[0])
    pad_value = checks.check_float(pad_value, "pad_value")   # any float: -inf / NaN padding are fill values
    max_len = max_len_of(max_len, "max_len", given, offsets, unit="sample", rows=" rows")
    impl = _dispatch.select("unpack", packed.device, packed.dtype)
    feature_shape = packed.shape[1:]
    rows = packed.reshape(packed.shape[0], math.prod(feature_shape)).contiguous()
    out = impl(rows, cu_seqlens.contiguous(), max_len, pad_value)
    return out.reshape(out.shape[0], max_len, *feature_shape)


def prune_tokens(x: Tensor, cu_seqlens: Tensor | RaggedLayout, scores: Tensor, threshold: Tensor, *,
                 keep_first: int = 1, merge: bool = True) -> PrunedTokens:
    """Drop each sample's tokens with score <= threshold[b] (sparing its first `keep_first`), in order.

    merge=True appends one token per sample that dropped any: the score-weighted mean of the dropped tokens
    (their plain mean where those scores sum to 0; scores are meant to be non-negative importances).
    Gradients flow to x and, through the merged token, to scores.
    """
    for name, t in (("x", x), ("scores", scores), ("threshold", threshold)):
        checks.check_tensor(t, name)
    checks.check_same_device(x, "x", cu_seqlens=device_offsets(cu_seqlens, "cu_seqlens"), scores=scores,
                             threshold=threshold)
    checks.check_ndim(x, "x", 2, "2-D [T, C]")
    checks.check_sizes(x, "x", (1,), "channels")
    cu_seqlens, given, offsets = resolve(cu_seqlens, "cu_seqlens", x.shape[0])
    bound = given.max_len if given is not None else (
        max_len_of(None, "cu_seqlens", None, offsets) if offsets is not None else None)
    batch = cu_seqlens.shape[0] - 1
    checks.check_floating(scores, "scores")
    if tuple(scores.shape) != (x.shape[0],):
        raise ValueError(f"scores: expected shape ({x.shape[0]},) (one per row of x), got {tuple(scores.shape)}")
    if threshold.dtype != scores.dtype:
        raise TypeError(f"threshold: expected dtype {scores.dtype} (the dtype of scores), got {threshold.dtype}")
    if tuple(threshold.shape) != (batch,):
        raise ValueError(f"threshold: expected shape ({batch},) (one per sample), got {tuple(threshold.shape)}")
    checks.check_int(keep_first, "keep_first", minimum=0, maximum=checks.INT32_MAX)
    checks.check_bool(merge, "merge")
    impl = _dispatch.select("prune_tokens", x.device, x.dtype, scores.dtype)
    y, cu_new, kept_index = impl(x.contiguous(), cu_seqlens.contiguous(), scores.contiguous(),
                                 threshold.contiguous(), keep_first, merge)
    return PrunedTokens(y, RaggedLayout._read(cu_new, bound=bound), kept_index)
