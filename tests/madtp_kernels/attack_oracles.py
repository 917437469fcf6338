"""Float64 oracles for the attack suite, written from the formulas in DESIGN.md and the ops' docstrings.

They share no code with any backend. Non-finite values follow IEEE arithmetic wherever the formula reads the
value, and nowhere else: a masked key, a kept row outside a merge are never read (a pruned 2:4 position is a 0 that is).
"""
from __future__ import annotations

import torch

F64 = torch.float64


def pack(x, mask):
    rows = [x[b, t].to(F64) for b in range(x.shape[0]) for t in range(x.shape[1]) if bool(mask[b, t])]
    packed = torch.stack(rows) if rows else torch.zeros((0, *x.shape[2:]), dtype=F64)
    counts = [int(mask[b].sum()) for b in range(x.shape[0])]
    return packed, [0, *torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist()]


def unpack(packed, offsets, max_len, pad_value):
    batch = len(offsets) - 1
    out = torch.full((batch, max_len, *packed.shape[1:]), float(pad_value), dtype=F64)
    for b in range(batch):
        for t in range(offsets[b + 1] - offsets[b]):
            out[b, t] = packed[offsets[b] + t].to(F64)
    return out


def prune_tokens(x, offsets, scores, threshold, keep_first, merge):
    """(y [T', C] f64, new offsets, kept_index, bound [T', C]: a forward error bound for each row in the
    backend's accumulation; 0 on kept rows, which are copies)."""
    acc_eps = torch.finfo(F64 if x.dtype == F64 else torch.float32).eps
    out_eps = torch.finfo(x.dtype).eps
    x64, s64, t64 = x.to(F64), scores.to(F64), threshold.to(F64)
    ys, index, bounds, counts = [], [], [], []
    for b in range(len(offsets) - 1):
        rows = range(offsets[b], offsets[b + 1])
        kept = [r for r in rows if r - offsets[b] < keep_first or bool(s64[r] > t64[b])]
        dropped = [r for r in rows if r not in kept]
        ys += [x64[r] for r in kept]
        index += kept
        bounds += [torch.zeros(x.shape[1], dtype=F64)] * len(kept)
        if merge and dropped:
            w = s64[dropped]
            xs = x64[dropped]
            total = w.sum()
            if total == 0:   # the plain mean (NaN != 0, so a NaN score is read as a weight)
                m = xs.mean(0)
                scale = xs.abs().sum(0) / len(dropped)
                bound = 2 * (len(dropped) + 2) * acc_eps * scale
            else:
                m = (w[:, None] * xs).sum(0) / total
                bound = 2 * (len(dropped) + 2) * acc_eps * (
                    (w.abs()[:, None] * xs.abs()).sum(0) + m.abs() * w.abs().sum()) / total.abs()
            ys.append(m)
            bounds.append(bound + out_eps * m.abs())
            index.append(-1)
        counts.append(len(kept) + int(merge and bool(dropped)))
    y = torch.stack(ys) if ys else torch.zeros((0, x.shape[1]), dtype=F64)
    bound = torch.stack(bounds) if bounds else torch.zeros((0, x.shape[1]), dtype=F64)
    return y, [0, *torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist()], index, bound


def attention(q, k, v, offsets_q, offsets_k, *, scale, causal, q_index=None, kv_index=None, dtype=F64):
    """(out [Tq, H, D], received [Tk, H], cls [Tk, H]) in `dtype`: per sequence and head, softmax over the
    keys the query may see (bottom-right causal), summed with where (a masked key's value is never read).
    A query with no key, or whose every score is -inf, gets zeros and gives nothing to the statistics."""
    if q_index is not None:
        q = q[q_index.long()]
    if kv_index is not None:
        k, v = k[kv_index.long()], v[kv_index.long()]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    heads = q.shape[1]
    out = torch.zeros_like(q)
    received = torch.zeros(k.shape[0], heads, dtype=dtype)
    cls = torch.zeros(k.shape[0], heads, dtype=dtype)
    for b in range(len(offsets_q) - 1):
        q0, q1, k0, k1 = offsets_q[b], offsets_q[b + 1], offsets_k[b], offsets_k[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        allowed = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        has_key = allowed.any(1)
        for h in range(heads):
            s = (q[q0:q1, h] @ k[k0:k1, h].T) * scale
            s = torch.where(allowed, s, float("-inf"))
            # A query whose every logit is -inf gets zero weights (flash-attention, SDPA), not softmax's 0/0.
            live = has_key & ~(s == float("-inf")).all(1)
            p = torch.zeros_like(s)
            p[live] = torch.softmax(s[live], dim=-1)
            p = torch.where(allowed, p, 0)
            pv = torch.where(allowed[:, :, None], p[:, :, None] * v[k0:k1, h][None], 0)
            out[q0:q1, h] = pv.sum(1)
            received[k0:k1, h] = torch.where(allowed, p, 0).sum(0)
            if bool(live[0]):
                cls[k0:k1, h] = torch.where(allowed[0], p[0], 0)
    return out, received, cls


VALID_NIBBLES = frozenset(p0 | (p1 << 2) for p0 in range(4) for p1 in range(4) if p0 < p1)


def kept_positions(meta):
    """meta uint8 [N, K/8] -> positions [N, K/4, 2] of each group's two kept entries; None if any nibble is not
    a valid code (two distinct positions, the lower first)."""
    n, nbytes = meta.shape
    pos = torch.zeros(n, nbytes * 2, 2, dtype=torch.long)
    for r in range(n):
        for j in range(nbytes):
            byte = int(meta[r, j])
            for half in range(2):
                nib = (byte >> (4 * half)) & 0xF
                if nib not in VALID_NIBBLES:
                    return None
                pos[r, 2 * j + half] = torch.tensor([nib & 3, nib >> 2])
    return pos


def decompress(values, meta):
    pos = kept_positions(meta)
    n, half = values.shape
    dense = torch.zeros(n, half * 2, dtype=F64)
    for r in range(n):
        for g in range(half // 2):
            for i in range(2):
                dense[r, 4 * g + int(pos[r, g, i])] = float(values[r, 2 * g + i])
    return dense


def sparse_linear(x, values, meta, bias):
    """(y [rows, N] f64, bound [rows, N]): y = x @ W^T + bias with W the dense 2:4 weight (DESIGN.md's formula:
    a pruned position is a 0 that is read, so a NaN/inf of x there gives NaN, as F.linear on W would).
    bound: a forward error bound for any summation order in the backend's accumulation."""
    w = decompress(values, meta)
    x64 = x.to(F64)
    y = (x64[:, None, :] * w[None]).sum(-1)   # elementwise, not BLAS: every 0 * NaN is formed
    mag = (x64.abs()[:, None, :] * w.abs()[None]).sum(-1)
    if bias is not None:
        y = y + bias.to(F64)
        mag = mag + bias.to(F64).abs()
    acc_eps = torch.finfo(F64 if x.dtype == F64 else torch.float32).eps
    return y, 2 * (values.shape[1] + 2) * acc_eps * mag + torch.finfo(x.dtype).eps * y.abs()


def prune_2to4(weight):
    """In each group of 4, the 2 largest |w|, the lower index first on ties."""
    n, k = weight.shape
    mask = torch.zeros(n, k, dtype=torch.bool)
    for r in range(n):
        for g in range(k // 4):
            group = [(-abs(float(weight[r, 4 * g + i])), i) for i in range(4)]
            for _, i in sorted(group)[:2]:
                mask[r, 4 * g + i] = True
    return mask
