"""Token ops in plain PyTorch: the `torch` backend (CPU path) and the reference the other backends match.

Inputs arrive validated and contiguous (see madtp_kernels.tokens). No Python loop over samples: per-row
sample ids (`segment_ids`) turn per-sample work into index_add / gather over the packed rows.
Accumulation is in float32 (float64 for float64 inputs), as in the kernels.

Non-finite values (README "Non-finite values", the same on every backend): IEEE propagation, no host sync.
pack / unpack copy values as they are (a masked-out row is never read; pad_value may be NaN or inf).
prune_tokens keeps t < keep_first or score > threshold: a comparison with NaN is false, so a NaN score is
dropped and a NaN threshold drops everything past keep_first. The merged row reads only the dropped rows and
their scores: a NaN or inf there propagates by IEEE rules (a NaN score, or an inf row with score 0, gives a NaN
merged row; weights summing to NaN are not 0, so no plain mean), and a kept row's values never reach it (they
are selected away, not multiplied by a zero weight).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lengths_of(cu_seqlens: Tensor) -> Tensor:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def offsets_of(counts: Tensor) -> Tensor:
    """cu_seqlens (int32 [B+1]) from per-sample counts."""
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    cu[1:] = torch.cumsum(counts, 0)
    return cu


def segment_ids(cu_seqlens: Tensor, rows: int) -> Tensor:
    """The sample index of each packed row, int64 [rows]."""
    batch = cu_seqlens.numel() - 1
    return torch.repeat_interleave(torch.arange(batch, device=cu_seqlens.device), lengths_of(cu_seqlens),
                                   output_size=rows)


def prefix_mask(lengths: Tensor, max_len: int) -> Tensor:
    """[B, max_len] bool: True where t < lengths[b]."""
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


# ---------------------------------------------------------------- pack / unpack

def pack(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """x [B, N, C], mask [B, N] bool -> (packed [T, C], cu_seqlens int32 [B+1])."""
    return x[mask], offsets_of(mask.sum(1, dtype=torch.int32))


def unpack(packed: Tensor, cu_seqlens: Tensor, max_len: int, pad_value: float) -> Tensor:
    """packed [T, C] -> [B, max_len, C], pad_value beyond each sample's length."""
    batch = cu_seqlens.numel() - 1
    out = packed.new_full((batch, max_len, packed.shape[1]), pad_value)
    out[prefix_mask(lengths_of(cu_seqlens), max_len)] = packed
    return out


def pack_backward(grad_packed: Tensor, mask: Tensor) -> Tensor:
    grad = grad_packed.new_zeros((*mask.shape, grad_packed.shape[1]))
    grad[mask] = grad_packed
    return grad


def unpack_backward(grad_out: Tensor, cu_seqlens: Tensor) -> Tensor:
    return grad_out[prefix_mask(lengths_of(cu_seqlens), grad_out.shape[1])]


# ---------------------------------------------------------------- prune_tokens

def keep_flags(cu_seqlens: Tensor, scores: Tensor, threshold: Tensor, keep_first: int) -> tuple[Tensor, Tensor]:
    """(keep [T] bool, segment ids [T]): keep the first keep_first tokens and every score > threshold[b]."""
    rows = scores.numel()
    seg = segment_ids(cu_seqlens, rows)
    local = torch.arange(rows, device=scores.device) - cu_seqlens.long()[seg]
    cmp = accumulate_dtype(scores.dtype)
    keep = (local < keep_first) | (scores.to(cmp) > threshold.to(cmp)[seg])
    return keep, seg


def segment_matmul(weights: Tensor, x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """out[b] = sum over rows r of sample b of weights[r] * x[r]: a [B, T] CSR matrix (its row offsets are
    cu_seqlens) times x, one pass over x without a [T, C] temporary. Every row of a sample is multiplied, zero
    weights included (0 * inf = NaN): rows that must not contribute are to be zeroed in x first."""
    rows = x.shape[0]
    with warnings.catch_warnings():  # CSR is "beta" in torch; this use (CSR @ dense) is long stable
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(cu_seqlens.long(), torch.arange(rows, device=x.device), weights,
                                      size=(cu_seqlens.numel() - 1, rows), check_invariants=False)
        return csr @ x


def _merge_weights(scores: Tensor, dropped: Tensor, seg: Tensor, batch: int, acc: torch.dtype):
    """Each row's weight in its sample's merged token, and each sample's score total W.

    merged_b = sum_d w_d x_d / W_b over dropped rows d, w = score; the plain mean where W_b = 0.
    Returns (row weights [T]: w_d / W_b (or 1 / n_dropped) on dropped rows, 0 elsewhere; W [B]).
    """
    w = torch.where(dropped, scores.to(acc), 0)
    total = torch.zeros(batch, dtype=acc, device=scores.device).index_add_(0, seg, w)
    n_dropped = torch.zeros(batch, dtype=acc, device=scores.device).index_add_(0, seg, dropped.to(acc))
    uniform = total == 0
    denom = torch.where(uniform, n_dropped.clamp_min(1), total)
    return torch.where(uniform[seg] & dropped, 1.0, w) / denom[seg], total


def prune_tokens(x: Tensor, cu_seqlens: Tensor, scores: Tensor, threshold: Tensor, keep_first: int,
                 merge: bool) -> tuple[Tensor, Tensor, Tensor]:
    """x [T, C] -> (y [T', C], cu_seqlens int32 [B+1], kept_index int32 [T'], -1 on merged rows)."""
    batch = cu_seqlens.numel() - 1
    keep, seg = keep_flags(cu_seqlens, scores, threshold, keep_first)
    n_keep = torch.zeros(batch, dtype=torch.int32, device=x.device).index_add_(
        0, seg, keep.to(torch.int32))
    has_merged = (n_keep < lengths_of(cu_seqlens)) if merge else torch.zeros_like(n_keep, dtype=torch.bool)
    cu_new = offsets_of(n_keep + has_merged.to(torch.int32))
    rows_out = int(cu_new[-1])

    # Output row of each kept row: its sample's first output row + its rank among the sample's kept rows.
    kept_rows = keep.nonzero().squeeze(1)
    rank = torch.arange(kept_rows.numel(), device=x.device)
    kept_before = offsets_of(n_keep).long()  # kept rows of earlier samples
    dest = cu_new.long()[seg[kept_rows]] + rank - kept_before[seg[kept_rows]]

    kept_index = torch.full((rows_out,), -1, dtype=torch.int32, device=x.device)
    kept_index[dest] = kept_rows.to(torch.int32)
    y = x.index_select(0, kept_index.clamp_min(0))  # merged rows are overwritten below
    if merge:
        acc = accumulate_dtype(x.dtype)
        w, _ = _merge_weights(scores, ~keep, seg, batch, acc)
        # Kept rows are selected away (a zero weight times a kept inf would be NaN).
        merged = segment_matmul(w, torch.where(keep[:, None], 0, x.to(acc)), cu_seqlens)
        merged_rows = cu_new.long()[1:][has_merged] - 1
        y[merged_rows] = merged[has_merged].to(x.dtype)
    return y, cu_new, kept_index


def prune_tokens_backward(grad_y: Tensor, x: Tensor, cu_seqlens: Tensor, scores: Tensor, cu_new: Tensor,
                          kept_index: Tensor, merge: bool) -> tuple[Tensor, Tensor]:
    """Gradients for x and scores, from any backend's forward outputs (the threshold test has none)."""
    batch = cu_seqlens.numel() - 1
    kept = kept_index >= 0
    src = kept_index[kept].long()
    grad_x = torch.zeros_like(x)
    grad_x[src] = grad_y[kept]
    grad_scores = torch.zeros_like(scores)
    if not merge:
        return grad_x, grad_scores
    acc = accumulate_dtype(x.dtype)
    dropped = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    dropped[src] = False
    seg = segment_ids(cu_seqlens, x.shape[0])
    w, total = _merge_weights(scores, dropped, seg, batch, acc)
    # A sample with a dropped row has its merged row last; rows of other samples read a zero gradient.
    grad_merged = torch.zeros((batch, x.shape[1]), dtype=acc, device=x.device)
    has_merged = torch.zeros(batch, dtype=torch.bool, device=x.device)
    has_merged[seg[dropped]] = True
    grad_merged[has_merged] = grad_y[cu_new.long()[1:][has_merged] - 1].to(acc)
    g = grad_merged[seg]                                        # [T, C]
    grad_x += (w[:, None] * g).to(x.dtype)
    # d merged_b / d w_d = (x_d - merged_b) / W_b where the weights are used (W_b != 0); with p_d = x_d . g_b,
    # merged_b . g_b = sum_d' (w_d' / W_b) p_d', so no merged row needs rebuilding.
    p = (x.to(acc) * g).sum(1)
    merged_dot_g = torch.zeros(batch, dtype=acc, device=x.device).index_add_(0, seg, w * p)
    weighted = dropped & (total != 0)[seg]
    ds = (p - merged_dot_g[seg]) / torch.where(weighted, total[seg], 1)
    grad_scores += torch.where(weighted, ds, 0).to(scores.dtype)
    return grad_x, grad_scores
