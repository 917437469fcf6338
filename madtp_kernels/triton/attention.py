"""Triton kernels for varlen (ragged) attention: forward, attention statistics and backward.

The launchers receive inputs that `madtp_kernels.attention` has already validated: contiguous, on one device
(CUDA, or CPU under TRITON_INTERPRET=1), one dtype, q [Pq, H, D] and k/v [Pk, H, D] (physical rows),
cu_seqlens int32 [B+1] over LOGICAL rows, optional int32 indices mapping logical rows to physical rows.

Work decomposition. Every pass runs over a flat list of (sequence, block) tiles, grid = (tiles, H): a batch
with one 1000x longer sequence launches one program per block of it, not B x cdiv(max_seqlen, BLOCK) programs
of which most would exit at once. The forward and the statistics (the inference path) build no table: each
program finds its own tile from cu_seqlens of the tiled side (`_tile_bounds`: a chunked cumsum of
cdiv(len_b, BLOCK) over the B sequences), so a pass is one launch and no torch op. The backward passes read a
work list built on the device with torch ops (`_tile_table`, `_listed_tile_bounds`): the scan made the dq
kernel spill on sm_80, and the backward is not where launches cost a pruned model its speed. The grid's length
is the host-side bound min(B * cdiv(max_seqlen, BLOCK), B + T // BLOCK) (no device sync); the few surplus
programs find a sequence id of B and exit.

Forward (FlashAttention-2): one program per (query block, head) streams the key blocks with an online softmax
in base 2 (scale * log2(e) folded into the scores), fp32 accumulation, and stores out and the per-row natural
log-sum-exp (+inf for a query with no allowed key, whose output is 0). Key blocks that are wholly allowed run
without any masking; only the ragged tail and the causal diagonal pay for it.

Statistics: one program per (key block, head) streams the query blocks that can see it, recomputes the scores,
turns them into exact probabilities with the saved log-sum-exp and sums them over queries (received) and keeps
the first query's row (cls). No [Tq, Tk] matrix exists anywhere. headmax (asked for separately): one program
per key block loops over the heads inside each query block, keeps the running max over heads of each (query,
key) probability and sums it over the queries other than the sequence's first.

Backward (FlashAttention-2): a query-block pass computes delta = rowsum(dO * O) and dq; a key-block pass
computes dk and dv from it. With an index, physical rows may repeat or be skipped, so the gradient of an indexed
operand is accumulated with fp32 atomics into a zeroed buffer and cast at the end; without one, tiles own their
rows and store directly.

Row offsets are int64 (rows * H * D may exceed 2**31); positions inside a sequence stay int32.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import triton
import triton.language as tl

from . import AotSpec

# Kernels spell log2(e) = 1.4426950408889634 and ln(2) = 0.6931471805599453 as literals: a plain global is
# not a compile-time constant to triton.jit.
_LOG2E = 1.4426950408889634

# Sequences a program reads per step while it looks up its tile in cu_seqlens (`_tile_bounds`): 64, or 32 for
# fp32 (`_tile_bounds`' FP32). The fp32 kernels (FMA dots, 8 warps, 48..64 registers) sit at ptxas' occupancy steps,
# where it spills a few long-lived scalars rather than use one register more; the widths and the fp32 epilogue
# re-reads below are the combination found to compile with no spill for every specialisation on sm_80 and sm_90.
# (Both are tied to ptxas' choices, not to a model of the register file: re-check with the AOT report.)


@dataclass(frozen=True)
class _Config:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


# 64 x 64 tiles: ragged batches after pruning are short (ViT-B: 20..197 tokens), and a sequence's last query
# tile computes BLOCK_M / 2 padding rows on average: 32 rows at 64, a 30% overhead at ~110 tokens, or 60% at 128.
# D <= 64 fits 4 warps; the padded 128-wide head dim (80, 96, 128) needs 8 warps to keep q, acc and the score
# tile in registers without spills. fp32 runs FMA dots ("ieee": no TF32 rounding), whose operands are
# replicated across threads: small tiles and 8 warps, the shapes found not to spill on sm_80 and sm_90.
def _fwd_config(dtype: torch.dtype, block_d: int) -> _Config:
    if dtype == torch.float32:
        return _Config(32, 32, 8, 2) if block_d <= 64 else _Config(16, 32, 8, 1)
    if block_d <= 64:
        return _Config(64, 64, 4, 3)
    if block_d <= 128:
        return _Config(64, 64, 8, 3)
    return _Config(64, 32, 8, 2)


# The statistics pass holds a key tile and streams query tiles: the same register shape as the forward minus
# the output accumulator.
_stats_config = _fwd_config


# The key-block backward pass holds k, v, dk and dv for BLOCK_N keys and streams BLOCK_M queries; the
# query-block pass holds q, dO and dq. Both hold about twice the forward's state: 32-row query tiles and
# 8 warps (at 4 warps the D=64 key-block pass sits at 255 registers on sm_80, one step from spilling).
# fp32 at D > 64: the query-block pass spills at 4 warps and the key-block pass (with atomics) at 8.
def _bwd_config(dtype: torch.dtype, block_d: int, key_pass: bool) -> _Config:
    if dtype == torch.float32:
        if block_d <= 64:
            return _Config(16, 32, 8, 1)
        return _Config(16, 16, 4 if key_pass else 8, 1)
    if block_d <= 128:
        return _Config(32, 64, 8, 2)
    return _Config(16, 32, 8, 1)


@triton.jit
def _physical_rows(index_ptr, logical, ok, HAS_INDEX: tl.constexpr):
    """Physical row of each logical row (int64): index[logical] with an index, else logical itself."""
    if HAS_INDEX:
        rows = tl.load(index_ptr + logical, mask=ok, other=0)
    else:
        rows = logical
    return rows.to(tl.int64)


@triton.jit
def _row_offsets(rows, h, H, offs_d, HEAD_DIM: tl.constexpr):
    return (rows * H + h)[:, None] * HEAD_DIM + offs_d[None, :]


@triton.jit
def _row_mask(ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # The head-dim mask only exists when D is padded to a power of two; otherwise loads vectorise freely.
    if BLOCK_D == HEAD_DIM:
        mask = ok[:, None]
    else:
        mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    return mask


@triton.jit
def _load_tile(ptr, index_ptr, logical, ok, h, H, offs_d, HAS_INDEX: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Rows `logical` (gathered through index_ptr if HAS_INDEX) of head h of a [P, H, D] tensor; 0 where !ok."""
    rows = _physical_rows(index_ptr, logical, ok, HAS_INDEX)
    return tl.load(ptr + _row_offsets(rows, h, H, offs_d, HEAD_DIM), mask=_row_mask(ok, offs_d, HEAD_DIM, BLOCK_D),
                   other=0.0)


@triton.jit
def _tile_bounds(cu_tiled_ptr, num_seqs, cu_q_ptr, cu_k_ptr, BLOCK: tl.constexpr, FP32: tl.constexpr):
    """(sequence, block start, q start, q length, k start, k length) of this program's tile.

    Tile t of the flat work list is block t - first(seq) of sequence seq, where the tiled side (cu_tiled_ptr:
    cu_q_ptr or cu_k_ptr, BLOCK rows a tile) gives sequence b nblk_b = cdiv(len_b, BLOCK) tiles and
    first(b) = sum of nblk over the sequences before b. The program finds its own seq by scanning the B
    lengths BLOCK_B at a time with a running cumsum `ends`: seq = #(ends <= t). Programs past the last tile
    get seq = num_seqs and must exit; the other fields are then those of the last sequence (never past cu[B]).
    """
    tile = tl.program_id(0)
    BLOCK_B: tl.constexpr = 32 if FP32 else 64
    offs_b = tl.arange(0, BLOCK_B)
    seq = tile * 0
    first_tile = tile * 0
    base = tile * 0  # tiles of the sequences before this chunk
    for b0 in range(0, num_seqs, BLOCK_B):
        b = b0 + offs_b
        b_ok = b < num_seqs
        lens = tl.load(cu_tiled_ptr + b + 1, mask=b_ok, other=0) - tl.load(cu_tiled_ptr + b, mask=b_ok, other=0)
        nblk = (lens + (BLOCK - 1)) // BLOCK
        ends = base + tl.cumsum(nblk, 0)
        before = b_ok & (ends <= tile)  # sequences wholly before this tile (a prefix: ends never decreases)
        seq += tl.sum(before.to(tl.int32), 0)
        first_tile += tl.sum(tl.where(before, nblk, 0), 0)
        base += tl.sum(nblk, 0)
    block_start = (tile - first_tile) * BLOCK
    s = tl.minimum(seq, num_seqs - 1)
    q_start = tl.load(cu_q_ptr + s)
    q_len = tl.load(cu_q_ptr + s + 1) - q_start
    k_start = tl.load(cu_k_ptr + s)
    k_len = tl.load(cu_k_ptr + s + 1) - k_start
    return seq, block_start, q_start, q_len, k_start, k_len


@triton.jit
def _listed_tile_bounds(tiles_ptr, num_tiles, num_seqs, cu_q_ptr, cu_k_ptr):
    """`_tile_bounds` from a device-built work list (`_tile_table`): the backward's, off the inference path.

    Surplus entries hold seq = num_seqs (the caller exits on it); their other fields are read for the last
    sequence, so that no load reaches cu[num_seqs + 1].
    """
    tile = tl.program_id(0)
    seq = tl.load(tiles_ptr + tile)
    block_start = tl.load(tiles_ptr + num_tiles + tile)
    s = tl.minimum(seq, num_seqs - 1)
    q_start = tl.load(cu_q_ptr + s)
    q_len = tl.load(cu_q_ptr + s + 1) - q_start
    k_start = tl.load(cu_k_ptr + s)
    k_len = tl.load(cu_k_ptr + s + 1) - k_start
    return seq, block_start, q_start, q_len, k_start, k_len


@triton.jit
def _key_range(m_start, k_len, diag, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(n_full, n_end): the key blocks a query tile [m_start, m_start + BLOCK_M) must visit.

    Query i sees key j iff j <= i + diag (diag = k_len - q_len: bottom-right causal alignment). Key blocks
    below n_full are allowed for every row of the tile (rows past q_len see more keys, never fewer) and need no
    mask; [n_full, n_end) does.
    """
    if CAUSAL:
        n_end = tl.minimum(k_len, m_start + BLOCK_M + diag)
        n_full = tl.maximum(tl.minimum(k_len, m_start + 1 + diag), 0) // BLOCK_N * BLOCK_N
    else:
        n_end = k_len
        n_full = k_len // BLOCK_N * BLOCK_N
    return n_full, n_end


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_ptr, v_ptr, kv_index_ptr, k_start, k_len, h, H, qk_scale, offs_m, diag,
               n_lo, n_hi, offs_d, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_INDEX: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update over key blocks [n_lo, n_hi). Scores and m_i are in base-2 units."""
    for n in range(n_lo, n_hi, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < k_len
        k = _load_tile(k_ptr, kv_index_ptr, k_start + offs_n, n_ok, h, H, offs_d, HAS_KV_INDEX, HEAD_DIM, BLOCK_D)
        v = _load_tile(v_ptr, kv_index_ptr, k_start + offs_n, n_ok, h, H, offs_d, HAS_KV_INDEX, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        if MASKED:
            allowed = n_ok[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + diag)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row with no allowed key so far keeps m = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all scores -inf: exp2 = 0, not NaN
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, q_index_ptr, kv_index_ptr, cu_q_ptr, cu_k_ptr,
                num_seqs, H, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_Q_INDEX: tl.constexpr, HAS_KV_INDEX: tl.constexpr):
    seq, m_start, q_start, q_len, k_start, k_len = _tile_bounds(cu_q_ptr, num_seqs, cu_q_ptr, cu_k_ptr, BLOCK_M,
                                                                q_ptr.dtype.element_ty == tl.float32)
    if seq >= num_seqs:  # past the last tile
        return
    h = tl.program_id(1)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    q = _load_tile(q_ptr, q_index_ptr, q_start + offs_m, m_ok, h, H, offs_d, HAS_Q_INDEX, HEAD_DIM, BLOCK_D)

    diag = k_len - q_len
    n_full, n_end = _key_range(m_start, k_len, diag, CAUSAL, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptr, v_ptr, kv_index_ptr, k_start, k_len, h, H, qk_scale,
                               offs_m, diag, 0, n_full, offs_d, False, CAUSAL, HAS_KV_INDEX, HEAD_DIM, BLOCK_D,
                               BLOCK_N)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptr, v_ptr, kv_index_ptr, k_start, k_len, h, H, qk_scale,
                               offs_m, diag, n_full, n_end, offs_d, True, CAUSAL, HAS_KV_INDEX, HEAD_DIM, BLOCK_D,
                               BLOCK_N)

    empty = l_i == 0.0  # no allowed key: output 0, log-sum-exp +inf (so that exp(s - lse) is 0 downstream)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if q_ptr.dtype.element_ty == tl.float32:
        # Re-read the rows' start and length rather than keep them (and the q load's 64-bit row offsets) live
        # across the key loops, where ptxas would spill them (see the note after _LOG2E). seq < num_seqs.
        q_start = tl.load(cu_q_ptr + seq, volatile=True)
        m_ok = offs_m < tl.load(cu_q_ptr + seq + 1, volatile=True) - q_start
    logical = (q_start + offs_m).to(tl.int64)
    tl.store(out_ptr + _row_offsets(logical, h, H, offs_d, HEAD_DIM), out.to(out_ptr.dtype.element_ty),
             mask=_row_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D))
    tl.store(lse_ptr + logical * H + h, lse, mask=m_ok)


@triton.jit
def _stats_kernel(q_ptr, k_ptr, lse_ptr, received_ptr, cls_ptr, q_index_ptr, kv_index_ptr, cu_q_ptr, cu_k_ptr,
                  num_seqs, H, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_Q_INDEX: tl.constexpr, HAS_KV_INDEX: tl.constexpr):
    seq, n_start, q_start, q_len, k_start, k_len = _tile_bounds(cu_k_ptr, num_seqs, cu_q_ptr, cu_k_ptr, BLOCK_N,
                                                                q_ptr.dtype.element_ty == tl.float32)
    if seq >= num_seqs:
        return
    h = tl.program_id(1)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < k_len
    k = _load_tile(k_ptr, kv_index_ptr, k_start + offs_n, n_ok, h, H, offs_d, HAS_KV_INDEX, HEAD_DIM, BLOCK_D)

    diag = k_len - q_len
    m_lo = 0
    if CAUSAL:  # queries before n_start - diag see none of these keys
        m_lo = tl.maximum(n_start - diag, 0) // BLOCK_M * BLOCK_M
    received = tl.zeros([BLOCK_N], dtype=tl.float32)
    cls = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m in range(m_lo, q_len, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_len
        q = _load_tile(q_ptr, q_index_ptr, q_start + offs_m, m_ok, h, H, offs_d, HAS_Q_INDEX, HEAD_DIM, BLOCK_D)
        # Rows past q_len read lse = +inf, and rows without any allowed key stored +inf: both give p = 0, so
        # only the causal triangle needs a mask (keys past k_len are never stored).
        lse = tl.load(lse_ptr + (q_start + offs_m).to(tl.int64) * H + h, mask=m_ok, other=float("inf"))
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        p = tl.math.exp2(s - lse[:, None] * 1.4426950408889634)
        # Padding rows: a zero q times an inf key is NaN, so their p is masked, not left to lse = +inf.
        p = tl.where(m_ok[:, None], p, 0.0)
        if CAUSAL:
            p = tl.where(offs_n[None, :] <= offs_m[:, None] + diag, p, 0.0)
        received += tl.sum(p, axis=0)
        if m == 0:
            cls = tl.sum(tl.where(offs_m[:, None] == 0, p, 0.0), axis=0)
    if q_ptr.dtype.element_ty == tl.float32:  # re-read, as in the forward's epilogue
        k_start = tl.load(cu_k_ptr + seq, volatile=True)
        n_ok = offs_n < tl.load(cu_k_ptr + seq + 1, volatile=True) - k_start
    out_offs = (k_start + offs_n).to(tl.int64) * H + h
    tl.store(received_ptr + out_offs, received, mask=n_ok)
    tl.store(cls_ptr + out_offs, cls, mask=n_ok)


@triton.jit
def _headmax_kernel(q_ptr, k_ptr, lse_ptr, headmax_ptr, q_index_ptr, kv_index_ptr, cu_q_ptr, cu_k_ptr,
                    num_seqs, H, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_Q_INDEX: tl.constexpr, HAS_KV_INDEX: tl.constexpr):
    """Per key block, all heads: headmax[j] = sum over queries i != 0 of max_h P_h(i -> j).

    The max over heads is taken per (query, key) pair, so the heads are looped inside each query block (a
    per-head program could only sum, which is `received`); the key tile of each head is re-read from cache.
    """
    seq, n_start, q_start, q_len, k_start, k_len = _tile_bounds(cu_k_ptr, num_seqs, cu_q_ptr, cu_k_ptr, BLOCK_N,
                                                                q_ptr.dtype.element_ty == tl.float32)
    if seq >= num_seqs:
        return
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < k_len
    diag = k_len - q_len
    m_lo = 0
    if CAUSAL:  # queries before n_start - diag see none of these keys
        m_lo = tl.maximum(n_start - diag, 0) // BLOCK_M * BLOCK_M
    # Physical rows are looked up once, not once per head (an index gather would repeat the same loads).
    k_rows = _physical_rows(kv_index_ptr, k_start + offs_n, n_ok, HAS_KV_INDEX)
    k_mask = _row_mask(n_ok, offs_d, HEAD_DIM, BLOCK_D)
    headmax = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m in range(m_lo, q_len, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_len
        q_rows = _physical_rows(q_index_ptr, q_start + offs_m, m_ok, HAS_Q_INDEX)
        q_mask = _row_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D)
        # Probabilities are >= 0, so 0 starts the max.
        pmax = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for h in range(0, H):
            k = tl.load(k_ptr + _row_offsets(k_rows, h, H, offs_d, HEAD_DIM), mask=k_mask, other=0.0)
            q = tl.load(q_ptr + _row_offsets(q_rows, h, H, offs_d, HEAD_DIM), mask=q_mask, other=0.0)
            lse = tl.load(lse_ptr + (q_start + offs_m).to(tl.int64) * H + h, mask=m_ok, other=float("inf"))
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            p = tl.math.exp2(s - lse[:, None] * 1.4426950408889634)
            # NaN propagates through the max, as the sums of `received` propagate it
            pmax = tl.maximum(pmax, p, propagate_nan=tl.PropagateNan.ALL)
        # The sequence's first query is left out (the official importance reads attn[:, :, 1:, 1:]); padding
        # rows (a zero q times an inf key is NaN) and the causal triangle count 0. Masked once per query block,
        # after the heads: the mask is not live across the head loop.
        counted = (m_ok & (offs_m > 0))[:, None] & n_ok[None, :]
        if CAUSAL:
            counted = counted & (offs_n[None, :] <= offs_m[:, None] + diag)
        headmax += tl.sum(tl.where(counted, pmax, 0.0), axis=0)
    if q_ptr.dtype.element_ty == tl.float32:  # re-read, as in the forward's epilogue
        k_start = tl.load(cu_k_ptr + seq, volatile=True)
        n_ok = offs_n < tl.load(cu_k_ptr + seq + 1, volatile=True) - k_start
    tl.store(headmax_ptr + (k_start + offs_n).to(tl.int64), headmax, mask=n_ok)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_ptr, v_ptr, kv_index_ptr, k_start, k_len, h, H, qk_scale, offs_m,
                  diag, n_lo, n_hi, offs_d, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_INDEX: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq += dS K over key blocks [n_lo, n_hi), dS = P * (dP - delta), P recomputed from the saved lse."""
    for n in range(n_lo, n_hi, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < k_len
        k = _load_tile(k_ptr, kv_index_ptr, k_start + offs_n, n_ok, h, H, offs_d, HAS_KV_INDEX, HEAD_DIM, BLOCK_D)
        v = _load_tile(v_ptr, kv_index_ptr, k_start + offs_n, n_ok, h, H, offs_d, HAS_KV_INDEX, HEAD_DIM, BLOCK_D)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse2[:, None])
        if MASKED:
            allowed = n_ok[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + diag)
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    return dq


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, out_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, q_index_ptr, kv_index_ptr,
                   cu_q_ptr, cu_k_ptr, tiles_ptr, num_tiles, num_seqs, H, scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_Q_INDEX: tl.constexpr, HAS_KV_INDEX: tl.constexpr):
    """Per (query block, head): delta = rowsum(dO * O), stored for the dk/dv pass, and dq.

    With HAS_Q_INDEX, dq_ptr is a zeroed fp32 [Pq, H, D] buffer that receives atomic adds at physical rows
    (an index may repeat a row); otherwise it is the [Tq, H, D] result in q's dtype.
    """
    seq, m_start, q_start, q_len, k_start, k_len = _listed_tile_bounds(tiles_ptr, num_tiles, num_seqs, cu_q_ptr,
                                                                       cu_k_ptr)
    if seq >= num_seqs:
        return
    h = tl.program_id(1)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    logical = (q_start + offs_m).to(tl.int64)
    q = _load_tile(q_ptr, q_index_ptr, logical, m_ok, h, H, offs_d, HAS_Q_INDEX, HEAD_DIM, BLOCK_D)
    do = _load_tile(do_ptr, q_index_ptr, logical, m_ok, h, H, offs_d, False, HEAD_DIM, BLOCK_D)
    o = _load_tile(out_ptr, q_index_ptr, logical, m_ok, h, H, offs_d, False, HEAD_DIM, BLOCK_D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(delta_ptr + logical * H + h, delta, mask=m_ok)
    # +inf for padding rows and for queries without keys: P = 0 there.
    lse2 = tl.load(lse_ptr + logical * H + h, mask=m_ok, other=float("inf")) * 1.4426950408889634

    diag = k_len - q_len
    n_full, n_end = _key_range(m_start, k_len, diag, CAUSAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_ptr, v_ptr, kv_index_ptr, k_start, k_len, h, H, qk_scale, offs_m,
                       diag, 0, n_full, offs_d, False, CAUSAL, HAS_KV_INDEX, HEAD_DIM, BLOCK_D, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_ptr, v_ptr, kv_index_ptr, k_start, k_len, h, H, qk_scale, offs_m,
                       diag, n_full, n_end, offs_d, True, CAUSAL, HAS_KV_INDEX, HEAD_DIM, BLOCK_D, BLOCK_N)
    dq *= scale
    rows = _physical_rows(q_index_ptr, logical, m_ok, HAS_Q_INDEX)
    offs = _row_offsets(rows, h, H, offs_d, HEAD_DIM)
    mask = _row_mask(m_ok, offs_d, HEAD_DIM, BLOCK_D)
    if HAS_Q_INDEX:
        tl.atomic_add(dq_ptr + offs, dq, mask=mask, sem="relaxed")
    else:
        tl.store(dq_ptr + offs, dq.to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, q_index_ptr, kv_index_ptr,
                     cu_q_ptr, cu_k_ptr, tiles_ptr, num_tiles, num_seqs, H, scale, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_Q_INDEX: tl.constexpr, HAS_KV_INDEX: tl.constexpr):
    """Per (key block, head): dv = P^T dO and dk = dS^T Q over the query blocks that see the keys.

    With HAS_KV_INDEX, dk_ptr/dv_ptr are zeroed fp32 [Pk, H, D] buffers receiving atomic adds at physical
    rows; otherwise the [Tk, H, D] results in k's dtype.
    """
    seq, n_start, q_start, q_len, k_start, k_len = _listed_tile_bounds(tiles_ptr, num_tiles, num_seqs, cu_q_ptr,
                                                                       cu_k_ptr)
    if seq >= num_seqs:
        return
    h = tl.program_id(1)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < k_len
    k = _load_tile(k_ptr, kv_index_ptr, k_start + offs_n, n_ok, h, H, offs_d, HAS_KV_INDEX, HEAD_DIM, BLOCK_D)
    v = _load_tile(v_ptr, kv_index_ptr, k_start + offs_n, n_ok, h, H, offs_d, HAS_KV_INDEX, HEAD_DIM, BLOCK_D)

    diag = k_len - q_len
    m_lo = 0
    if CAUSAL:  # queries before n_start - diag see none of these keys
        m_lo = tl.maximum(n_start - diag, 0) // BLOCK_M * BLOCK_M
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m in range(m_lo, q_len, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_len
        logical = (q_start + offs_m).to(tl.int64)
        q = _load_tile(q_ptr, q_index_ptr, logical, m_ok, h, H, offs_d, HAS_Q_INDEX, HEAD_DIM, BLOCK_D)
        do = _load_tile(do_ptr, q_index_ptr, logical, m_ok, h, H, offs_d, False, HEAD_DIM, BLOCK_D)
        # Padding rows read lse = +inf and dO = 0: they add nothing. Keys past k_len are never stored.
        lse2 = tl.load(lse_ptr + logical * H + h, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + logical * H + h, mask=m_ok, other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse2[:, None])
        p = tl.where(m_ok[:, None], p, 0.0)  # padding rows: zero q times an inf key is NaN
        if CAUSAL:
            p = tl.where(offs_n[None, :] <= offs_m[:, None] + diag, p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
    dk *= scale
    rows = _physical_rows(kv_index_ptr, (k_start + offs_n).to(tl.int64), n_ok, HAS_KV_INDEX)
    offs = _row_offsets(rows, h, H, offs_d, HEAD_DIM)
    mask = _row_mask(n_ok, offs_d, HEAD_DIM, BLOCK_D)
    if HAS_KV_INDEX:
        tl.atomic_add(dk_ptr + offs, dk, mask=mask, sem="relaxed")
        tl.atomic_add(dv_ptr + offs, dv, mask=mask, sem="relaxed")
    else:
        tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


def _num_tiles(num_seqs: int, block: int, max_seqlen: int, total: int) -> int:
    """Host-side bound on sum(cdiv(len_b, block)) over the sequences (no device sync): the grid's first axis.

    Programs past the true count find no sequence in `_tile_bounds` and exit.
    """
    return min(num_seqs * triton.cdiv(max_seqlen, block), num_seqs + total // block)


def _tile_table(cu_seqlens: torch.Tensor, block: int, max_seqlen: int, total: int) -> torch.Tensor:
    """int32 [2, n]: row 0 the sequence of each tile (B for surplus entries), row 1 the tile's first position.

    Built with device ops only: n is a host-side bound on sum(cdiv(len_b, block)), not the exact count.
    """
    B = cu_seqlens.numel() - 1
    n = min(B * triton.cdiv(max_seqlen, block), B + total // block)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    blocks = (lengths + (block - 1)) // block
    ends = torch.cumsum(blocks, 0, dtype=torch.int32)
    tile = torch.arange(n, dtype=torch.int32, device=cu_seqlens.device)
    seq = torch.searchsorted(ends, tile, right=True, out_int32=True)
    first_tile = (ends - blocks)[seq.clamp(max=max(B - 1, 0))]
    return torch.stack([seq, (tile - first_tile) * block])


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


def _index_or(index: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    # An absent index still needs a valid pointer argument; HAS_*_INDEX=False compiles its loads out.
    return fallback if index is None else index


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                     causal: bool, q_index: torch.Tensor | None, kv_index: torch.Tensor | None,
                     return_stats: bool, headmax_stats: bool,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out [Tq, H, D] q.dtype, received [Tk, H] fp32, cls [Tk, H] fp32, lse [Tq, H] fp32, headmax [Tk] fp32),
    logical order.

    received and cls are [0, H] unless return_stats, headmax [0] unless headmax_stats. lse is the natural
    log-sum-exp of each query's scaled scores over its allowed keys, +inf for a query with none;
    `varlen_attention_backward` takes it.
    """
    H, D = q.shape[1], q.shape[2]
    Tq = q.shape[0] if q_index is None else q_index.numel()
    Tk = k.shape[0] if kv_index is None else kv_index.numel()
    B = cu_seqlens_q.numel() - 1
    out = q.new_empty((Tq, H, D))
    lse = torch.empty((Tq, H), dtype=torch.float32, device=q.device)
    received = torch.empty((Tk if return_stats else 0, H), dtype=torch.float32, device=q.device)
    cls = torch.empty_like(received)
    headmax = torch.empty((Tk if headmax_stats else 0,), dtype=torch.float32, device=q.device)
    if B == 0 or H == 0 or Tq == 0:
        received.zero_()
        cls.zero_()
        headmax.zero_()
        return out, received, cls, lse, headmax

    block_d = _block_d(D)
    qk_scale = scale * _LOG2E
    flags = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=causal, HAS_Q_INDEX=q_index is not None,
                 HAS_KV_INDEX=kv_index is not None)
    q_idx, kv_idx = _index_or(q_index, cu_seqlens_q), _index_or(kv_index, cu_seqlens_k)

    cfg = _fwd_config(q.dtype, block_d)
    n = _num_tiles(B, cfg.block_m, max_seqlen_q, Tq)
    if n > 0:
        _fwd_kernel[(n, H)](
            q, k, v, out, lse, q_idx, kv_idx, cu_seqlens_q, cu_seqlens_k, B, H, qk_scale,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags)

    if return_stats and Tk > 0:
        cfg = _stats_config(q.dtype, block_d)
        n = _num_tiles(B, cfg.block_n, max_seqlen_k, Tk)
        if n > 0:
            _stats_kernel[(n, H)](
                q, k, lse, received, cls, q_idx, kv_idx, cu_seqlens_q, cu_seqlens_k, B, H, qk_scale,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, **flags)
    if headmax_stats and Tk > 0:
        cfg = _stats_config(q.dtype, block_d)
        n = _num_tiles(B, cfg.block_n, max_seqlen_k, Tk)
        if n > 0:
            _headmax_kernel[(n,)](
                q, k, lse, headmax, q_idx, kv_idx, cu_seqlens_q, cu_seqlens_k, B, H, qk_scale,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, **flags)
    return out, received, cls, lse, headmax


def varlen_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                              causal: bool, q_index: torch.Tensor | None, kv_index: torch.Tensor | None,
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv) shaped like q, k, v (physical rows; rows no index refers to get 0, repeated rows sum).

    grad_out and out are [Tq, H, D] and lse [Tq, H] in logical order, as `varlen_attention` returned them.
    """
    H, D = q.shape[1], q.shape[2]
    Tq = q.shape[0] if q_index is None else q_index.numel()
    Tk = k.shape[0] if kv_index is None else kv_index.numel()
    B = cu_seqlens_q.numel() - 1
    if B == 0 or H == 0 or Tq == 0 or Tk == 0:  # no query sees any key: every gradient is 0
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    grad_out = grad_out.contiguous()  # autograd may hand over an expanded or strided gradient

    # An indexed operand's gradient is accumulated in fp32 with atomics (rows may repeat or be skipped);
    # an unindexed one is written once per row by the tile that owns it.
    dq = q.new_empty(q.shape) if q_index is None else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    if kv_index is None:
        dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)
    else:
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros_like(dk)
    delta = torch.empty((Tq, H), dtype=torch.float32, device=q.device)

    block_d = _block_d(D)
    flags = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=causal, HAS_Q_INDEX=q_index is not None,
                 HAS_KV_INDEX=kv_index is not None)
    q_idx, kv_idx = _index_or(q_index, cu_seqlens_q), _index_or(kv_index, cu_seqlens_k)
    scalars = (B, H, scale, scale * _LOG2E)

    # The query-block pass runs first: it writes delta, which the key-block pass reads.
    cfg = _bwd_config(q.dtype, block_d, key_pass=False)
    tiles = _tile_table(cu_seqlens_q, cfg.block_m, max_seqlen_q, Tq)
    if tiles.shape[1] > 0:
        _bwd_dq_kernel[(tiles.shape[1], H)](
            q, k, v, out, grad_out, lse, delta, dq, q_idx, kv_idx, cu_seqlens_q, cu_seqlens_k, tiles,
            tiles.shape[1], *scalars, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **flags)
    cfg = _bwd_config(q.dtype, block_d, key_pass=True)
    tiles = _tile_table(cu_seqlens_k, cfg.block_n, max_seqlen_k, Tk)
    if tiles.shape[1] > 0:
        _bwd_dkdv_kernel[(tiles.shape[1], H)](
            q, k, v, grad_out, lse, delta, dk, dv, q_idx, kv_idx, cu_seqlens_q, cu_seqlens_k, tiles,
            tiles.shape[1], *scalars, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **flags)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _signatures(dt: str, indexed: bool) -> list[tuple]:
    """(kernel, its tile config function, its non-constexpr signature) for inputs of Triton type `dt`."""
    common = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "lse_ptr": "*fp32", "q_index_ptr": "*i32", "kv_index_ptr": "*i32",
              "cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "num_seqs": "i32",
              "H": "i32", "qk_scale": "fp32"}
    bwd = {**common, "v_ptr": f"*{dt}", "do_ptr": f"*{dt}", "delta_ptr": "*fp32", "scale": "fp32",
           "tiles_ptr": "*i32", "num_tiles": "i32"}
    grad = "*fp32" if indexed else f"*{dt}"  # gradients of an indexed operand accumulate in fp32
    return [
        (_fwd_kernel, _fwd_config, {**common, "v_ptr": f"*{dt}", "out_ptr": f"*{dt}"}),
        (_stats_kernel, _stats_config, {**common, "received_ptr": "*fp32", "cls_ptr": "*fp32"}),
        (_headmax_kernel, _stats_config, {**common, "headmax_ptr": "*fp32"}),
        (_bwd_dq_kernel, partial(_bwd_config, key_pass=False), {**bwd, "out_ptr": f"*{dt}", "dq_ptr": grad}),
        (_bwd_dkdv_kernel, partial(_bwd_config, key_pass=True), {**bwd, "dk_ptr": grad, "dv_ptr": grad}),
    ]


def _aot_specs() -> list[AotSpec]:
    specs = []
    # Torch allocations are 16-byte aligned; HEAD_DIM is a constexpr, so row strides need no hint.
    aligned = ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "do_ptr", "lse_ptr", "delta_ptr", "received_ptr", "cls_ptr",
               "headmax_ptr", "dq_ptr", "dk_ptr", "dv_ptr")
    for dt, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for kernel_index in range(len(_signatures(dt, False))):
            for head_dim in (32, 64, 80, 128):
                block_d = _block_d(head_dim)
                # Both causal modes without indices, and the gathering variant (its loads and stores differ).
                for causal, indexed in ((False, False), (True, False), (False, True)):
                    kernel, config, signature = _signatures(dt, indexed)[kernel_index]
                    cfg = config(dtype, block_d)
                    specs.append(AotSpec(
                        kernel, signature,
                        {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                         "CAUSAL": causal, "HAS_Q_INDEX": indexed, "HAS_KV_INDEX": indexed},
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        divisible_by_16=tuple(a for a in aligned if a in kernel.arg_names),
                        label=f"{dt} D={head_dim} causal={int(causal)} index={int(indexed)}"))
    return specs


AOT_SPECS = _aot_specs()
