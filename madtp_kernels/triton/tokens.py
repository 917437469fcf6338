"""Triton kernels for ragged token sets: pack, unpack and prune_tokens (keep + merge).

The launchers receive inputs that `madtp_kernels.tokens` has already validated: contiguous, on one device
(CUDA, or CPU under TRITON_INTERPRET=1), dtypes and shapes consistent. Row offsets are computed in int64
because T * C may exceed 2**31; token positions inside a sample stay int32 (cu_seqlens is int32).

Compaction (pack and prune_tokens) runs one program per (sample, column block). Each program scans its
sample's keep flags in token blocks: an exclusive `tl.cumsum` plus a running count gives every kept token its
output row, so kept rows keep their order without any global sort. A sample is scanned by a single program,
so its cost grows with the sample's length: a batch with one very long sample runs at the speed of that one
scan (every column block of it in parallel).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.tokens import offsets_of
from . import AotSpec

# Compaction tile: 128 tokens x 64 columns = 64 values per thread at 4 warps, no spills even with the fp32
# merge accumulation. A 64-column row is one 128-byte line in fp16, so loads stay whole-line; narrow columns
# give C = 384..1024 six to sixteen programs per sample, which matters because the token scan is serial.
_COMPACT_BLOCK_T = 128
_COMPACT_BLOCK_C = 64
# Unpack is a plain parallel copy over (sample, token block, column block): wider rows, fewer tokens.
_UNPACK_BLOCK_T = 32
_UNPACK_BLOCK_C = 128
# The count pass reads only scores: one wide block per step.
_COUNT_BLOCK = 1024
_NUM_WARPS = 4
_INT32_MAX = 2**31 - 1


@triton.jit
def _count_rows_kernel(scores_ptr, cu_ptr, thr_ptr, rows_ptr, keep_first, MERGE: tl.constexpr,
                       BLOCK: tl.constexpr):
    """rows[b] = output rows of sample b: its kept tokens, plus the merged token if MERGE and any dropped."""
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b)
    length = tl.load(cu_ptr + b + 1) - start
    thr = tl.load(thr_ptr + b).to(tl.float32)
    n_kept = 0
    for t0 in range(0, length, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        valid = t < length
        s = tl.load(scores_ptr + start.to(tl.int64) + t, mask=valid, other=0.0).to(tl.float32)
        keep = valid & ((t < keep_first) | (s > thr))
        n_kept += tl.sum(keep.to(tl.int32), axis=0)
    rows = n_kept
    if MERGE:
        rows += (n_kept < length).to(tl.int32)
    tl.store(rows_ptr + b, rows)


@triton.jit
def _compact_kernel(x_ptr, y_ptr, index_ptr, src_cu_ptr, dst_cu_ptr, keep_ptr, thr_ptr, keep_first, N, C,
                    FROM_MASK: tl.constexpr, MERGE: tl.constexpr, WRITE_INDEX: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Copy the kept rows of sample b, columns of block `pid(1)`, to rows dst_cu[b]... of y, in order.

    FROM_MASK (pack): x is [B, N, C], keep_ptr a uint8 mask [B, N]; src_cu_ptr/thr_ptr are unused.
    Otherwise (prune): x is [T, C] with samples at src_cu, keep_ptr holds scores and a token is kept iff
    t < keep_first or score > thr[b]; with MERGE the score-weighted mean of the dropped rows follows the kept
    ones. WRITE_INDEX stores each output row's source row (-1 for the merged row) from column block 0 only.
    """
    b = tl.program_id(0)
    cb = tl.program_id(1)
    if FROM_MASK:
        src_start = b.to(tl.int64) * N
        length = N
    else:
        src_start = tl.load(src_cu_ptr + b).to(tl.int64)
        length = (tl.load(src_cu_ptr + b + 1) - src_start).to(tl.int32)
        thr = tl.load(thr_ptr + b).to(tl.float32)
    dst_start = tl.load(dst_cu_ptr + b).to(tl.int64)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C

    n_kept = 0
    if MERGE:
        weighted = tl.zeros([BLOCK_C], dtype=tl.float32)
        plain = tl.zeros([BLOCK_C], dtype=tl.float32)  # for the plain mean when the weights sum to 0
        w_sum = 0.0
    for t0 in range(0, length, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        valid = t < length
        if FROM_MASK:
            keep = tl.load(keep_ptr + src_start + t, mask=valid, other=0) != 0
        else:
            s = tl.load(keep_ptr + src_start + t, mask=valid, other=0.0).to(tl.float32)
            keep = valid & ((t < keep_first) | (s > thr))
        keep_i = keep.to(tl.int32)
        pos = n_kept + tl.cumsum(keep_i, axis=0) - keep_i  # exclusive scan: output slot of each kept token
        n_kept += tl.sum(keep_i, axis=0)

        src_rows = src_start + t
        dst_rows = dst_start + pos
        # Dropped rows are read only when they feed the merged row.
        read = (valid if MERGE else keep)[:, None] & col_ok[None, :]
        tile = tl.load(x_ptr + src_rows[:, None] * C + cols[None, :], mask=read, other=0.0)
        tl.store(y_ptr + dst_rows[:, None] * C + cols[None, :], tile, mask=keep[:, None] & col_ok[None, :])
        if WRITE_INDEX:
            tl.store(index_ptr + dst_rows, src_rows.to(tl.int32), mask=keep & (cb == 0))
        if MERGE:
            drop = valid & ~keep
            w = tl.where(drop, s, 0.0)
            # where() rather than multiplying by 0: a kept row's inf must not leak into the merged row.
            xd = tl.where(drop[:, None], tile.to(tl.float32), 0.0)
            weighted += tl.sum(xd * w[:, None], axis=0)
            plain += tl.sum(xd, axis=0)
            w_sum += tl.sum(w, axis=0)

    if MERGE:
        n_drop = length - n_kept
        if n_drop > 0:
            # Select before dividing so that neither branch divides by zero.
            weighted_mean = w_sum != 0.0
            merged = (tl.where(weighted_mean, weighted, plain)
                      / tl.where(weighted_mean, w_sum, n_drop.to(tl.float32)))
            row = dst_start + n_kept
            tl.store(y_ptr + row * C + cols, merged.to(y_ptr.dtype.element_ty), mask=col_ok)
            if WRITE_INDEX:
                tl.store(index_ptr + row, -1, mask=cb == 0)


@triton.jit
def _unpack_kernel(packed_ptr, cu_ptr, out_ptr, pad_value, max_len, C,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    start = tl.load(cu_ptr + b).to(tl.int64)
    length = (tl.load(cu_ptr + b + 1) - start).to(tl.int32)
    col_ok = cols < C
    in_seq = t < length  # may exceed max_len: the sample is then truncated
    vals = tl.load(packed_ptr + (start + t)[:, None] * C + cols[None, :], mask=in_seq[:, None] & col_ok[None, :])
    vals = tl.where(in_seq[:, None], vals, pad_value).to(out_ptr.dtype.element_ty)
    out_rows = b.to(tl.int64) * max_len + t
    tl.store(out_ptr + out_rows[:, None] * C + cols[None, :], vals,
             mask=(t < max_len)[:, None] & col_ok[None, :])


def _block_c(C: int, cap: int) -> int:
    # At least 16 columns so that tiny C does not add a specialisation per power of two.
    return min(cap, max(16, triton.next_power_of_2(C)))


def pack(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, N, C], mask [B, N] bool -> (packed [T, C], cu_seqlens int32 [B+1]): kept rows, b-major, in order."""
    B, N, C = x.shape
    cu = offsets_of(mask.sum(dim=1, dtype=torch.int32))
    total = int(cu[-1])  # host sync: the output size depends on the mask
    packed = x.new_empty((total, C))
    if packed.numel() == 0:
        return packed, cu
    block_c = _block_c(C, _COMPACT_BLOCK_C)
    # Unused pointer arguments (index, src_cu, thr) get a valid tensor; FROM_MASK compiles them out.
    _compact_kernel[(B, triton.cdiv(C, block_c))](
        x, packed, cu, cu, cu, mask.view(torch.uint8), x, 0, N, C,
        FROM_MASK=True, MERGE=False, WRITE_INDEX=False,
        BLOCK_T=_COMPACT_BLOCK_T, BLOCK_C=block_c, num_warps=_NUM_WARPS)
    return packed, cu


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, pad_value: float) -> torch.Tensor:
    """packed [T, C] -> out [B, max_len, C]: out[b, t] = packed[cu[b] + t] for t < len_b, else pad_value."""
    B = cu_seqlens.numel() - 1
    C = packed.shape[1]
    out = packed.new_empty((B, max_len, C))
    if out.numel() == 0:
        return out
    block_c = _block_c(C, _UNPACK_BLOCK_C)
    grid = (B, triton.cdiv(max_len, _UNPACK_BLOCK_T), triton.cdiv(C, block_c))
    _unpack_kernel[grid](packed, cu_seqlens, out, float(pad_value), max_len, C,
                         BLOCK_T=_UNPACK_BLOCK_T, BLOCK_C=block_c, num_warps=_NUM_WARPS)
    return out


def prune_tokens(x: torch.Tensor, cu_seqlens: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor,
                 keep_first: int, merge: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, C], cu_seqlens int32 [B+1], scores [T], threshold [B] -> (y [T', C], cu_new [B+1], kept_index [T']).

    Per sample, keeps token t iff t < keep_first or score > threshold[b] (compared in fp32), in order; with
    merge, appends the score-weighted mean of the dropped rows (plain mean if the weights sum to 0) when any
    row was dropped. kept_index holds each output row's source row in x, -1 for a merged row.
    """
    B = cu_seqlens.numel() - 1
    C = x.shape[1]
    keep_first = min(keep_first, _INT32_MAX)  # lengths are int32: any larger value keeps everything alike
    rows = torch.zeros(B, dtype=torch.int32, device=x.device)
    if B > 0:
        _count_rows_kernel[(B,)](scores, cu_seqlens, threshold, rows, keep_first, MERGE=merge,
                                 BLOCK=_COUNT_BLOCK, num_warps=_NUM_WARPS)
    cu_new = offsets_of(rows)
    total = int(cu_new[-1])  # host sync: the output size depends on the scores
    y = x.new_empty((total, C))
    kept_index = torch.empty(total, dtype=torch.int32, device=x.device)
    if total == 0:
        return y, cu_new, kept_index
    block_c = _block_c(C, _COMPACT_BLOCK_C)
    # At least one column block even when C == 0: column block 0 writes kept_index.
    _compact_kernel[(B, max(1, triton.cdiv(C, block_c)))](
        x, y, kept_index, cu_seqlens, cu_new, scores, threshold, keep_first, 0, C,
        FROM_MASK=False, MERGE=merge, WRITE_INDEX=True,
        BLOCK_T=_COMPACT_BLOCK_T, BLOCK_C=block_c, num_warps=_NUM_WARPS)
    return y, cu_new, kept_index


def _aot_specs() -> list[AotSpec]:
    specs = []
    # Torch allocations are 16-byte aligned and C = 384..1024 is a multiple of 16; N (197 for ViT-B/16) is not.
    compact_aligned = ("x_ptr", "y_ptr", "C")
    for dt in ("fp16", "bf16", "fp32"):
        for merge in (False, True):
            specs.append(AotSpec(
                _count_rows_kernel,
                {"scores_ptr": f"*{dt}", "cu_ptr": "*i32", "thr_ptr": f"*{dt}", "rows_ptr": "*i32",
                 "keep_first": "i32"},
                {"MERGE": merge, "BLOCK": _COUNT_BLOCK}, num_warps=_NUM_WARPS,
                label=f"{dt} merge={int(merge)}"))
        compact_sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "index_ptr": "*i32", "src_cu_ptr": "*i32",
                       "dst_cu_ptr": "*i32", "thr_ptr": f"*{dt}", "keep_first": "i32", "N": "i32", "C": "i32"}
        tiles = {"BLOCK_T": _COMPACT_BLOCK_T, "BLOCK_C": _COMPACT_BLOCK_C}
        specs.append(AotSpec(
            _compact_kernel, {**compact_sig, "keep_ptr": "*u8"},
            {"FROM_MASK": True, "MERGE": False, "WRITE_INDEX": False, **tiles}, num_warps=_NUM_WARPS,
            divisible_by_16=compact_aligned, label=f"{dt} pack"))
        for merge in (False, True):
            specs.append(AotSpec(
                _compact_kernel, {**compact_sig, "keep_ptr": f"*{dt}"},
                {"FROM_MASK": False, "MERGE": merge, "WRITE_INDEX": True, **tiles}, num_warps=_NUM_WARPS,
                divisible_by_16=compact_aligned, label=f"{dt} prune merge={int(merge)}"))
        specs.append(AotSpec(
            _unpack_kernel,
            {"packed_ptr": f"*{dt}", "cu_ptr": "*i32", "out_ptr": f"*{dt}", "pad_value": "fp32",
             "max_len": "i32", "C": "i32"},
            {"BLOCK_T": _UNPACK_BLOCK_T, "BLOCK_C": _UNPACK_BLOCK_C}, num_warps=_NUM_WARPS,
            divisible_by_16=("packed_ptr", "out_ptr", "C"), label=dt))
    return specs


AOT_SPECS = _aot_specs()
