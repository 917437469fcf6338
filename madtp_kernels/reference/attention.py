"""Ragged attention in plain PyTorch: the `torch` backend (CPU path) and the reference for the kernels.

Work per sequence, all heads at once ([H, L, D] views of the packed rows): the padded alternative spends
max_len^2 work on every sequence, this spends L_q * L_k. Without stats, CPU float32/float64 inputs go through the
CPU flash kernel (one call per sequence). Otherwise a block of queries' [H, rows, Lk] probabilities is formed
explicitly in fp32 (float64 for float64), and the statistics are read off it (never a [Tq, Tk] matrix).
Differentiable: autograd through these ops is also the recompute-based backward of the other backends.

Non-finite values (README "Non-finite values", the same on every backend): IEEE propagation. A NaN or inf in q,
k or v reaches exactly the outputs whose formula reads it: a q row its own output row and, through the softmax,
the statistics of its sequence's keys; a k row every query of its sequence (and their statistics); a v row the
outputs of its sequence, never the statistics. A query whose scores are all -inf has zero probabilities (out 0,
lse +inf, nothing added to the statistics), as in flash-attention and SDPA; a query with no key gets zeros
whatever its values. Rows an index never refers to are never read. The CPU flash kernel and the padded batch do
not follow this (the flash kernel returns zeros for a NaN query; padding rows meet other sequences' values in
the products), so they run only on finite inputs: one reduction over q, k and v per call, read back together
with the offsets this backend reads anyway (no extra host sync); other inputs take the explicit path.
With causal=True a v row reaches only the queries that see its key (non-finite inputs sum the visible products
explicitly rather than multiply the hidden ones by 0).
"""
from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _causal_mask(rows: int, lq: int, lk: int, first_row: int, device) -> Tensor:
    """Bottom-right aligned (flash-attn): query i sees key j iff j <= i + lk - lq; rows start at first_row."""
    i = torch.arange(first_row, first_row + rows, device=device)[:, None]
    return torch.arange(lk, device=device)[None, :] <= i + (lk - lq)


def _sequences(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, causal: bool, bounds=None):
    """(b, q0, q1, k0, k1, first) for each sequence b with work: queries q0 + first .. q1 see keys k0 .. k1.

    Causal queries before lq - lk see no key: their output stays 0 and they add nothing to the stats or
    gradients, so they are left out (first > 0); sequences without keys or queries are skipped.
    bounds: the two offset lists, where the caller has read them already."""
    bounds_q, bounds_k = bounds if bounds is not None else (cu_seqlens_q.tolist(), cu_seqlens_k.tolist())
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        first = max(0, (q1 - q0) - (k1 - k0)) if causal else 0
        if k1 > k0 and q0 + first < q1:
            yield b, q0, q1, k0, k1, first


def _split(cu_seqlens: Tensor | list[int], dim: int, *tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """Per-sequence views of each tensor along dim: one split call each (a narrow per sequence costs ~2 us, the
    same order as the work of a short sequence's own call). cu_seqlens may be its host copy already."""
    bounds = cu_seqlens if isinstance(cu_seqlens, list) else cu_seqlens.tolist()
    sizes = [hi - lo for lo, hi in pairwise(bounds)]
    return [t.split(sizes, dim) for t in tensors]


def _additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


# Scores are formed for at most this many bytes of [H, rows, Lk] at a time, so the passes over a block (softmax,
# max, column sums) stay in cache (8 MiB: a quarter of the dev box's L3). Larger blocks mean fewer ops per sequence,
# and each op is a parallel region that on a loaded 2-core machine may wait out a preempted thread: 8 MiB timed
# 3x faster than 2 MiB there for ViT-L/14-336 (and the same single-threaded); at least 64 rows keep the GEMMs thick.
_BLOCK_BYTES = 8 << 20
_MIN_BLOCK_ROWS = 64


def _flash_cpu(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: list[int], cu_seqlens_k: list[int], scale: float,
               causal: bool, sequences, out: Tensor, lse: Tensor) -> None:
    """out and lse from the CPU flash kernel, one call per sequence on [1, H, L, D] views of the packed rows (no
    copy in). Its output is laid out as packed rows already, so the one copy left is into the result."""
    qs, outs, lses = _split(cu_seqlens_q, 2, *(t.transpose(0, 1)[None] for t in (q, out, lse)))
    ks, vs = _split(cu_seqlens_k, 2, *(t.transpose(0, 1)[None] for t in (k, v)))
    for b, q0, q1, k0, k1, first in sequences:
        qb, ob, lb = qs[b], outs[b], lses[b]
        lq, lk = q1 - q0, k1 - k0
        if first:
            qb, ob, lb = (t.narrow(2, first, lq - first) for t in (qb, ob, lb))
        square = lq - first == lk  # bottom-right and top-left alignment coincide: the kernel's own causal mask
        mask = None if not causal or square else _additive_mask(_causal_mask(lq - first, lq, lk, first, q.device),
                                                                 q.dtype)
        o, lse_b = torch._scaled_dot_product_flash_attention_for_cpu(qb, ks[b], vs[b], 0.0, causal and square,
                                                                     attn_mask=mask, scale=scale)
        ob.copy_(o)
        lb.copy_(lse_b)


def _explicit(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: list[int], cu_seqlens_k: list[int], scale: float,
              causal: bool, sequences, out: Tensor, lse: Tensor, received: Tensor, cls: Tensor,
              return_stats: bool, finite: bool = True, headmax: Tensor | None = None) -> None:
    """Softmax probabilities formed explicitly in out's dtype (the accumulation dtype), a block of queries at a
    time; the statistics are column sums of the same block, so they cost one pass over it (headmax: one max over
    the heads, then a column sum without the sequence's first query). finite=False (some
    input is not finite): rows whose scores are all -inf get zero probabilities and lse +inf (softmax would
    give NaN there); finite inputs cannot produce such a row, so they skip the two ops."""
    acc = out.dtype
    heads = q.shape[1]
    # [H, L, D] per sequence; half inputs are upcast first, so their scores and sums are fp32 like the backward's
    qs, outs, lses = _split(cu_seqlens_q, 1, *(t.transpose(0, 1) for t in (q.to(acc), out, lse)))
    ks, vs = _split(cu_seqlens_k, 1, *(t.transpose(0, 1) for t in (k.to(acc), v.to(acc))))
    if return_stats:
        received_s, cls_s = _split(cu_seqlens_k, 1, received.transpose(0, 1), cls.transpose(0, 1))
    if headmax is not None:
        (headmax_s,) = _split(cu_seqlens_k, 0, headmax)
    for b, q0, q1, k0, k1, first in sequences:
        lq, lk = q1 - q0, k1 - k0
        kb_t, vb = ks[b].transpose(1, 2), vs[b]
        rows = max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // (heads * lk * out.element_size()))
        for r0 in range(first, lq, rows):
            n = min(rows, lq - r0)
            s = torch.bmm(qs[b].narrow(1, r0, n), kb_t)                # [H, n, lk]
            s.mul_(scale)  # after the product, as the backward does: the two agree to the last bit
            visible = _causal_mask(n, lq, lk, r0, q.device) if causal else None
            if causal:
                s.masked_fill_(~visible, float("-inf"))
            row_max = s.amax(-1)
            p = torch.softmax(s, -1, out=s)
            if not finite:
                empty = row_max == float("-inf")
                p.masked_fill_(empty[..., None], 0.0)
                if causal:  # a NaN query's softmax is NaN at the hidden keys too: they must get nothing
                    p.masked_fill_(~visible, 0.0)
            # softmax puts 1 / sum(exp(s - max)) at the row's maximum, so lse = max - log(max p) without another
            # pass over exp(s); every row here sees a key (_sequences), so max p >= 1 / lk cannot underflow.
            torch.sub(row_max, p.amax(-1).log_(), out=lses[b].narrow(1, r0, n))
            if not finite:
                lses[b].narrow(1, r0, n).masked_fill_(empty, float("inf"))
            if causal and not finite:
                _visible_products(p, vb, visible, outs[b].narrow(1, r0, n))
            else:
                torch.bmm(p, vb, out=outs[b].narrow(1, r0, n))
            if return_stats:
                if r0 == first:
                    torch.sum(p, 1, out=received_s[b])
                else:
                    received_s[b].add_(p.sum(1))
                if r0 == 0:  # the sequence's first query sees keys (first == 0): its row is cls
                    cls_s[b].copy_(p[:, 0])
            if headmax is not None:
                skip = 1 if r0 == 0 else 0  # the sequence's first query is left out (official: attn[1:, 1:])
                if n > skip:
                    # amax, not max: it propagates NaN, as the column sums do
                    headmax_s[b].add_(p.narrow(1, skip, n - skip).amax(0).sum(0))


def _visible_products(p: Tensor, v: Tensor, visible: Tensor, out: Tensor) -> None:
    """out = p @ v summed over the visible keys only. p @ v would add 0 * v for the hidden ones, which is NaN
    where v is not finite; the formula never reads those rows. Forms [H, rows, Lk, D] products in row blocks, so
    it is only for non-finite inputs."""
    heads, rows, keys = p.shape
    step = max(1, _BLOCK_BYTES // max(1, heads * keys * v.shape[-1] * p.element_size()))
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        prod = p[:, r0:r0 + n, :, None] * v[:, None]
        prod.masked_fill_(~visible[None, r0:r0 + n, :, None], 0.0)
        torch.sum(prod, 2, out=out[:, r0:r0 + n])


# The per-sequence paths pay ~10 small ops per sequence; for many short sequences of similar length one padded,
# batched pass is cheaper. It is taken when the padding's extra work, in (query, key) pairs x H x D, is below this
# many per sequence (about what the ~100 us of a sequence's own ops buy in GEMM work on a CPU core), and the padded
# scores fit _PADDED_MAX_BYTES. Tests set it to 0 (never) or to a huge value (whenever allowed) to check both paths.
_PADDED_WORK_PER_SEQUENCE = 1_000_000
_PADDED_MAX_BYTES = 64 << 20


def _padded_is_cheaper(sequences, heads: int, head_dim: int, causal: bool, element_size: int) -> bool:
    """Non-causal, and the padding costs less than the per-sequence ops. (Sequences without queries or keys are
    not in `sequences`: their rows keep the zeros and +inf lse the caller wrote.)"""
    if causal or not sequences:
        return False
    batch = len(sequences)
    lq_max = max(q1 - q0 for _, q0, q1, _, _, _ in sequences)
    lk_max = max(k1 - k0 for _, _, _, k0, k1, _ in sequences)
    pairs = sum((q1 - q0) * (k1 - k0) for _, q0, q1, k0, k1, _ in sequences)
    extra = batch * lq_max * lk_max - pairs
    return (extra * heads * head_dim <= batch * _PADDED_WORK_PER_SEQUENCE
            and batch * heads * lq_max * lk_max * element_size <= _PADDED_MAX_BYTES)


def _padded(q: Tensor, k: Tensor, v: Tensor, sequences, scale: float, out: Tensor, lse: Tensor, received: Tensor,
            cls: Tensor, return_stats: bool, headmax: Tensor | None = None) -> None:
    """The sequences with work, all at once, padded to the longest and masked: a fixed number of ops whatever the
    batch. Each has keys (no fully masked row); no causal mask (_padded_is_cheaper)."""
    acc, device = out.dtype, q.device
    lq_max = max(q1 - q0 for _, q0, q1, _, _, _ in sequences)
    lk_max = max(k1 - k0 for _, _, _, k0, k1, _ in sequences)

    def grid(starts: list[int], lengths: list[int], width: int, rows: int):
        """[B, width] row indices (clamped) and validity, and the flat grid position of each packed row."""
        start = torch.tensor(starts, device=device)[:, None]
        length = torch.tensor(lengths, device=device)[:, None]
        pos = torch.arange(width, device=device)
        valid = pos < length
        index = (start + pos).clamp_max(max(rows - 1, 0))
        flat = torch.tensor([b * width + t for b, n in enumerate(lengths) for t in range(n)], device=device)
        return index, valid, flat

    qi, qv, q_flat = grid([s[1] for s in sequences], [s[2] - s[1] for s in sequences], lq_max, q.shape[0])
    ki, kv, k_flat = grid([s[3] for s in sequences], [s[4] - s[3] for s in sequences], lk_max, k.shape[0])
    qp = q.to(acc)[qi].transpose(1, 2)                                     # [B, H, Lq, D]
    kp, vp = (t.to(acc)[ki].transpose(1, 2) for t in (k, v))               # [B, H, Lk, D]
    s = torch.matmul(qp, kp.transpose(-1, -2))
    s.mul_(scale)   # after the product, as the backward does
    s.masked_fill_(~kv[:, None, None, :], float("-inf"))
    row_max = s.amax(-1)
    p = torch.softmax(s, -1, out=s)
    heads, dim = q.shape[1], q.shape[2]
    q_rows = torch.tensor([r for _, q0, q1, _, _, _ in sequences for r in range(q0, q1)], device=device)
    o = torch.matmul(p, vp).transpose(1, 2).reshape(-1, heads, dim)        # [B * Lq, H, D]
    out.index_copy_(0, q_rows, o.index_select(0, q_flat))
    lse_p = (row_max - p.amax(-1).log()).transpose(1, 2).reshape(-1, heads)   # as in _explicit
    lse.index_copy_(0, q_rows, lse_p.index_select(0, q_flat))
    if return_stats or headmax is not None:
        k_rows = torch.tensor([r for _, _, _, k0, k1, _ in sequences for r in range(k0, k1)], device=device)
    if return_stats:
        got = (p * qv[:, None, :, None]).sum(2).transpose(1, 2).reshape(-1, heads)   # padding queries give 0
        received.index_copy_(0, k_rows, got.index_select(0, k_flat))
        first = p[:, :, 0, :].transpose(1, 2).reshape(-1, heads)
        cls.index_copy_(0, k_rows, first.index_select(0, k_flat))
    if headmax is not None:  # every query but each sequence's first (padding queries give 0)
        later = qv.clone()
        later[:, 0] = False
        got = (p.amax(1) * later[:, :, None]).sum(1).reshape(-1)                      # [B * Lk]
        headmax.index_copy_(0, k_rows, got.index_select(0, k_flat))


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool, q_index: Tensor | None,
                     kv_index: Tensor | None, return_stats: bool,
                     headmax_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """q [Pq, H, D], k/v [Pk, H, D] (physical rows) -> (out [Tq, H, D], received [Tk, H], cls [Tk, H],
    lse [Tq, H], headmax [Tk]).

    Stats are [0, H] when return_stats is False, headmax [0] when headmax_stats is False; stats and lse are
    float32 (float64 for float64 inputs).
    lse is the natural log-sum-exp of each query's scores, +inf for a query with no key (flash-attn's rule,
    so exp(s - lse) is 0 there).
    """
    if q_index is not None:
        q = q.index_select(0, q_index.long())
    if kv_index is not None:
        k, v = k.index_select(0, kv_index.long()), v.index_select(0, kv_index.long())
    heads = q.shape[1]
    sdt = stats_dtype(q.dtype)
    # One host read for both offset lists and whether q, k and v are all finite (a sum in the stats dtype is
    # finite iff every element is, barring an overflow, which only sends the call down the explicit path).
    nq = cu_seqlens_q.numel()
    total = q.sum(dtype=sdt) + k.sum(dtype=sdt) + v.sum(dtype=sdt)
    read = torch.cat((cu_seqlens_q, cu_seqlens_k, total.isfinite().reshape(1).to(cu_seqlens_q.dtype))).tolist()
    finite = bool(read[-1])
    sequences = list(_sequences(cu_seqlens_q, cu_seqlens_k, causal, (read[:nq], read[nq:-1])))
    # The CPU flash kernel is the fastest way to out and lse for fp32. For half inputs its lse is ~3e-5 off an
    # fp32 recomputation (5e-7 for fp32 inputs), which the backward's P = exp(s - lse) would inherit; its fp16 path
    # also measured 2.5x slower than upcasting here (bf16 1.2x faster). So half inputs, and all stats, take the
    # explicit fp32 path; so do non-finite inputs (module docstring), and causal calls with scale <= 0 (the
    # kernel then scales its -inf mask into NaN or +inf).
    flash = (q.device.type == "cpu" and not return_stats and not headmax_stats and sdt == q.dtype and finite
             and (scale > 0 or not causal))
    out = q.new_empty(q.shape, dtype=q.dtype if flash else sdt)
    lse = torch.empty((q.shape[0], heads), dtype=sdt, device=q.device)
    # Every row a sequence computes is written; only the rows none does (queries without keys) are filled here.
    done = 0
    for _, q0, q1, _, _, first in sequences + [(None, q.shape[0], q.shape[0], 0, 0, 0)]:
        if q0 + first > done:
            out[done:q0 + first].zero_()
            lse[done:q0 + first].fill_(float("inf"))
        done = q1
    received = q.new_zeros((k.shape[0] if return_stats else 0, heads), dtype=sdt)
    cls = torch.zeros_like(received)
    headmax = q.new_zeros((k.shape[0] if headmax_stats else 0,), dtype=sdt)
    wanted = headmax if headmax_stats else None
    if not flash and finite and _padded_is_cheaper(sequences, heads, q.shape[2], causal, out.element_size()):
        _padded(q, k, v, sequences, scale, out, lse, received, cls, return_stats, wanted)
    elif flash:
        _flash_cpu(q, k, v, read[:nq], read[nq:-1], scale, causal, sequences, out, lse)
    else:
        _explicit(q, k, v, read[:nq], read[nq:-1], scale, causal, sequences, out, lse, received, cls,
                  return_stats, finite, wanted)
    return out.to(q.dtype), received, cls, lse, headmax


def varlen_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                              scale: float, causal: bool, q_index: Tensor | None,
                              kv_index: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (shaped like the physical buffers) from the attention backward formulas, per sequence:
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q.
    P is recomputed from the forward's log-sum-exp. Rows an index never references get 0; a row referenced twice
    accumulates both gradients."""
    acc = stats_dtype(q.dtype)
    ql = q.index_select(0, q_index.long()) if q_index is not None else q
    kl = k.index_select(0, kv_index.long()) if kv_index is not None else k
    vl = v.index_select(0, kv_index.long()) if kv_index is not None else v
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (ql, kl, vl))
    for _, q0, q1, k0, k1, first in _sequences(cu_seqlens_q, cu_seqlens_k, causal):
        lq, lk = q1 - q0, k1 - k0
        qb = ql[q0 + first:q1].transpose(0, 1).to(acc)        # [H, rows, D]
        kb, vb = kl[k0:k1].transpose(0, 1).to(acc), vl[k0:k1].transpose(0, 1).to(acc)
        gb = grad_out[q0 + first:q1].transpose(0, 1).to(acc)
        s = torch.matmul(qb, kb.transpose(1, 2)) * scale
        if causal:
            s = s.masked_fill(~_causal_mask(lq - first, lq, lk, first, q.device), float("-inf"))
        p = torch.exp(s - lse[q0 + first:q1].transpose(0, 1)[..., None].to(acc))
        dv[k0:k1] = torch.matmul(p.transpose(1, 2), gb).transpose(0, 1)
        dp = torch.matmul(gb, vb.transpose(1, 2))
        delta = (gb * out[q0 + first:q1].transpose(0, 1).to(acc)).sum(-1, keepdim=True)  # rowsum(dO * O)
        ds = p * (dp - delta)
        dq[q0 + first:q1] = (torch.matmul(ds, kb) * scale).transpose(0, 1)
        dk[k0:k1] = (torch.matmul(ds.transpose(1, 2), qb) * scale).transpose(0, 1)

    def to_physical(grad: Tensor, index: Tensor | None, like: Tensor) -> Tensor:
        if index is None:
            return grad.to(like.dtype)
        return torch.zeros(like.shape, dtype=acc, device=like.device).index_add_(0, index.long(), grad).to(like.dtype)

    return to_physical(dq, q_index, q), to_physical(dk, kv_index, k), to_physical(dv, kv_index, v)
