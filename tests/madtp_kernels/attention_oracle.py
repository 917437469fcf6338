"""Float64 oracle for varlen_attention and the random ragged inputs the tests draw."""
from __future__ import annotations

import torch


def oracle_attention(q, k, v, cu_q, cu_k, *, scale, causal, q_index=None, kv_index=None, dtype=torch.float64):
    """Loop over sequences and heads; explicit softmax. Computes in `dtype` (float64: the oracle; the inputs'
    dtype: what plain PyTorch gets in that precision, the yardstick for kernel error)."""
    if q_index is not None:
        q = q[q_index.long()]
    if kv_index is not None:
        k, v = k[kv_index.long()], v[kv_index.long()]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    heads = q.shape[1]
    out = torch.zeros_like(q)
    received = torch.zeros(k.shape[0], heads, dtype=torch.float64)
    cls = torch.zeros(k.shape[0], heads, dtype=torch.float64)
    for b in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        for h in range(heads):
            s = (q[q0:q1, h] @ k[k0:k1, h].T) * scale
            allowed = torch.ones(lq, lk, dtype=torch.bool)
            if causal:
                allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            s = s.masked_fill(~allowed, float("-inf"))
            has_key = allowed.any(1)
            p = torch.zeros_like(s)
            p[has_key] = torch.softmax(s[has_key], dim=-1)
            out[q0:q1, h] = p @ v[k0:k1, h]
            received[k0:k1, h] = p.double().sum(0)
            cls[k0:k1, h] = p[0].double()
    return out, received, cls


def make_inputs(lengths_q, lengths_k, heads, head_dim, dtype, *, seed, index_q=False, index_kv=False,
                device="cpu"):
    """Packed q/k/v for the given lengths; with index_*, the logical rows live permuted in a larger buffer."""
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lengths_q), sum(lengths_k)
    extra = 3  # rows of the physical buffer that no logical token uses

    def buffer(rows, with_index):
        physical = rows + extra if with_index else rows
        data = torch.randn(physical, heads, head_dim, generator=g).to(dtype)
        index = torch.randperm(physical, generator=g)[:rows].to(torch.int32) if with_index else None
        return data, index

    q, q_index = buffer(tq, index_q)
    kv = torch.randn(2, (tk + extra) if index_kv else tk, heads, head_dim, generator=g).to(dtype)
    kv_index = torch.randperm(kv.shape[1], generator=g)[:tk].to(torch.int32) if index_kv else None
    cu_q = torch.tensor([0] + torch.tensor(lengths_q, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lengths_k, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    move = (lambda t: None if t is None else t.to(device))
    return dict(q=move(q), k=move(kv[0]), v=move(kv[1]), cu_seqlens_q=move(cu_q), cu_seqlens_k=move(cu_k),
                q_index=move(q_index), kv_index=move(kv_index))
