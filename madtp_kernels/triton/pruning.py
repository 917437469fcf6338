"""Triton kernels for score_and_prune: importance, per-sample threshold, keep count, then the compaction.

The launcher receives inputs that `madtp_kernels.pruning` has already validated: contiguous, on one device
(CUDA, or CPU under TRITON_INTERPRET=1), received / cls / align fp32, cu_seqlens int32 with cu[-1] == T.

Three Triton launches and two small torch ops (zeros + cumsum for cu_new), nothing read back to the host:
  1. `_score_kernel`, one program per sample, four passes over its tokens in BLOCK_T tiles:
       a. the raw terms (received max over heads, cls weighted by the head norms of the first row, alignment
          max over K tiles) -> a [3, T] fp32 scratch, with the running min / max over the candidates;
          OFFICIAL: received = stats.headmax, cls weighted by the row's own head norms (a head at a time), and
          the running sums of received and alignment over the candidates instead;
       b. the TIS from the scratch -> importance (0 off the candidates) and the compaction's per-row score
          (TIS for candidates, +inf for the rows that always stay: the first and the protected ones);
       c. K tiles outer, token tiles inner: per alignment token an online softmax over the candidates
          (running max, sum exp, sum exp * TIS) -> theta = the min over alignment tokens (0 without candidates);
       d. the sample's output row count from the scores, by the compaction's own rule; with MERGE, a sample
          that drops exactly one candidate keeps it (no saving): its score becomes +inf.
     Barriers order the passes: a program reads back rows that other threads of it wrote.
  2. cu_new = the exclusive prefix of the counts.
  3. `tokens._compact_kernel` (prune_tokens' compaction, reused unchanged, fp32 scores and thresholds): keeps
     t < 1 or score > theta, in order, then the score-weighted mean of the dropped rows (their plain mean if
     those TIS sum to 0). The +inf scores pass any threshold and are never read as merge weights.
  4. `_finish_kernel`: protected_new = protected[kept_index] on result rows (False on merged rows), and zeros on
     the capacity rows (at and past cu_new[-1]) of y, kept_index and protected_new: every output is
     deterministic without zero-filling whole buffers first.
A sample is scored by a single program: its cost grows with its length x K (two reads of its alignment
scores), so a batch with one very long sample waits for that one. The softmax runs on A * (1 / tau) rather
than A / tau: within the comparison tolerance, and one multiply per element.

Non-finite values follow the torch reference (reference/pruning.py's docstring, README "Non-finite values"):
`tl.max` / `tl.min` drop NaN (maxnumf; np.nanmax under the interpreter), so every max / min here is a
NaN-propagating one (`_nan_max`, `_nan_min`, `propagate_nan=ALL`); a term is 0 only where its span is exactly 0;
candidates are recognised in pass c by a score other than +inf (a NaN TIS is still a candidate); and the
compaction compares against a decision threshold that is theta, or FLT_MAX where theta is NaN, so that the rows
that always stay (score +inf) stay and every candidate drops, while `theta` itself is returned as NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import AotSpec
from .tokens import _COMPACT_BLOCK_C, _COMPACT_BLOCK_T, _block_c, _compact_kernel

# Token tile of the scoring passes and alignment-token tile: 64 x 64, K = 100 (MADTP's default) in two K
# tiles. The tile's lanes run along K (its contiguous dim), so every per-row vector is held by each thread
# once per row it covers: 8 warps (16 rows per thread) keep sm_80 / sm_90 at ~220 registers without spills,
# where 4 warps (32 rows per thread) reach the 255 cap. One program per sample: occupancy is not the limit.
_SCORE_BLOCK_T = 64
_SCORE_BLOCK_K = 64
_SCORE_NUM_WARPS = 8
_SCORE_BLOCK_D = 64
# official: each token's own head norms, a [BLOCK_T, 32] tile of one head per step (64 wide: 253 registers on
# sm_80, at the cap; 32: 216).
_SCORE_BLOCK_DT = 32
_FINISH_BLOCK_R = 64
_FINISH_BLOCK_C = 64
_NUM_WARPS = 4


@triton.jit
def _nan_max(x, axis: tl.constexpr):
    """tl.max along axis, NaN where any element is NaN (tl.max drops NaN)."""
    return tl.where(tl.sum((x != x).to(tl.int32), axis=axis) > 0, float("nan"), tl.max(x, axis=axis))


@triton.jit
def _nan_min(x, axis: tl.constexpr):
    """tl.min along axis, NaN where any element is NaN (tl.min drops NaN)."""
    return tl.where(tl.sum((x != x).to(tl.int32), axis=axis) > 0, float("nan"), tl.min(x, axis=axis))


@triton.jit
def _score_kernel(received_ptr, cls_ptr, attn_ptr, align_ptr, prot_ptr, cu_ptr, scratch_ptr, importance_ptr,
                  score_ptr, theta_ptr, dthr_ptr, rows_ptr, headmax_ptr, inv_tau, T, H, D, K,
                  HAS_PROT: tl.constexpr, MERGE: tl.constexpr, OFFICIAL: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DT: tl.constexpr):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b).to(tl.int64)
    length = (tl.load(cu_ptr + b + 1) - start).to(tl.int32)
    heads = tl.arange(0, BLOCK_H)
    head_ok = heads < H
    ks = tl.arange(0, BLOCK_K)
    # Per-sample base pointers (int64 row offsets once), int32 offsets inside the sample: a 64-bit address
    # per element of the [BLOCK_T, BLOCK_K] tile would double its registers.
    received_ptr += start * H
    cls_ptr += start * H
    align_ptr += start * K
    scratch_ptr += start
    importance_ptr += start
    score_ptr += start
    if HAS_PROT:
        prot_ptr += start
    if OFFICIAL:
        headmax_ptr += start
        attn_ptr += start * H * D   # each token's own head norms (int32 offsets inside the sample)
    else:
        # Head weights from the first row's attention output: w_h = |o_h| / sum_h' |o_h'|.
        sq = tl.zeros([BLOCK_H], dtype=tl.float32)
        first = tl.minimum(start, T - 1)   # an empty last sample must not read past the buffer
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            o = tl.load(attn_ptr + first * H * D + heads[:, None] * D + d[None, :],
                        mask=head_ok[:, None] & (d < D)[None, :] & (length > 0), other=0.0).to(tl.float32)
            sq += tl.sum(o * o, axis=1)
        norms = tl.sqrt(sq)
        weight = norms / tl.maximum(tl.sum(norms, axis=0), 1.1754943508222875e-38,
                                    propagate_nan=tl.PropagateNan.ALL)

    # Pass a: raw terms to the scratch, running min / max over candidates. The running values are scalars:
    # per-row vectors live in the [BLOCK_T, BLOCK_K] tile's row layout, replicated across its lanes.
    lo_r = float("inf")
    lo_c = float("inf")
    lo_a = float("inf")
    hi_r = float("-inf")
    hi_c = float("-inf")
    hi_a = float("-inf")
    sum_r = 0.0   # official: the received and alignment terms' sums over the candidates
    sum_a = 0.0
    n_cand = 0
    for t0 in range(0, length, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        valid = t < length
        cand = valid & (t > 0)
        if HAS_PROT:
            cand = cand & (tl.load(prot_ptr + t, mask=valid, other=1) == 0)
        n_cand += tl.sum(cand.to(tl.int32), axis=0)
        if OFFICIAL:
            # r = stats.headmax; c = sum_h cls_h n_h / (sum_h n_h + 1e-8), n_h = |o_h| of this token: one head
            # at a time, a [BLOCK_T, BLOCK_D] tile per step (a [BLOCK_T, H, D] tile would not fit registers).
            r = tl.load(headmax_ptr + t, mask=valid, other=0.0)
            c_num = tl.zeros([BLOCK_T], dtype=tl.float32)
            n_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
            for h in range(0, H):
                sq_t = tl.zeros([BLOCK_T], dtype=tl.float32)
                for d0 in range(0, D, BLOCK_DT):
                    d = d0 + tl.arange(0, BLOCK_DT)
                    o = tl.load(attn_ptr + t[:, None] * (H * D) + h * D + d[None, :],
                                mask=cand[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
                    sq_t += tl.sum(o * o, axis=1)
                n_h = tl.sqrt(sq_t)
                c_num += tl.load(cls_ptr + t * H + h, mask=cand, other=0.0) * n_h
                n_sum += n_h
            c = c_num / (n_sum + 1e-8)
        else:
            rh_mask = valid[:, None] & head_ok[None, :]
            rec = tl.load(received_ptr + t[:, None] * H + heads[None, :], mask=rh_mask, other=float("-inf"))
            r = _nan_max(rec, 1)
            cl = tl.load(cls_ptr + t[:, None] * H + heads[None, :], mask=rh_mask, other=0.0)
            c = tl.sum(cl * weight[None, :], axis=1)
        a = tl.full([BLOCK_T], float("-inf"), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            al = tl.load(align_ptr + t[:, None] * K + k[None, :], mask=valid[:, None] & (k < K)[None, :],
                         other=float("-inf"))
            a = tl.maximum(a, _nan_max(al, 1), propagate_nan=tl.PropagateNan.ALL)
        tl.store(scratch_ptr + t, r, mask=valid)
        tl.store(scratch_ptr + T + t, c, mask=valid)
        tl.store(scratch_ptr + 2 * T + t, a, mask=valid)
        if OFFICIAL:   # off the candidates replaced by 0, not multiplied: a NaN there reaches nothing
            sum_r += tl.sum(tl.where(cand, r, 0.0), axis=0)
            sum_a += tl.sum(tl.where(cand, a, 0.0), axis=0)
        lo_r = tl.minimum(lo_r, _nan_min(tl.where(cand, r, float("inf")), 0),
                            propagate_nan=tl.PropagateNan.ALL)
        lo_c = tl.minimum(lo_c, _nan_min(tl.where(cand, c, float("inf")), 0),
                            propagate_nan=tl.PropagateNan.ALL)
        lo_a = tl.minimum(lo_a, _nan_min(tl.where(cand, a, float("inf")), 0),
                            propagate_nan=tl.PropagateNan.ALL)
        hi_r = tl.maximum(hi_r, _nan_max(tl.where(cand, r, float("-inf")), 0),
                            propagate_nan=tl.PropagateNan.ALL)
        hi_c = tl.maximum(hi_c, _nan_max(tl.where(cand, c, float("-inf")), 0),
                            propagate_nan=tl.PropagateNan.ALL)
        hi_a = tl.maximum(hi_a, _nan_max(tl.where(cand, a, float("-inf")), 0),
                            propagate_nan=tl.PropagateNan.ALL)
    min_r = lo_r
    min_c = lo_c
    min_a = lo_a
    # A term that is constant over the candidates (span exactly 0) contributes 0; a NaN or infinite span is
    # divided by, as in the reference.
    span_r = hi_r - min_r
    span_c = hi_c - min_c
    span_a = hi_a - min_a
    ok_r = span_r != 0.0
    ok_c = span_c != 0.0
    ok_a = span_a != 0.0
    span_r = tl.where(ok_r, span_r, 1.0)
    span_c = tl.where(ok_c, span_c, 1.0)
    span_a = tl.where(ok_a, span_a, 1.0)
    tl.debug_barrier()   # the scratch rows of pass a are read below by other threads of this program

    # Pass b: TIS -> importance, and the compaction's score: TIS for candidates, +inf for rows that stay.
    for t0 in range(0, length, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        valid = t < length
        cand = valid & (t > 0)
        if HAS_PROT:
            cand = cand & (tl.load(prot_ptr + t, mask=valid, other=1) == 0)
        r = tl.load(scratch_ptr + t, mask=valid, other=0.0)
        c = tl.load(scratch_ptr + T + t, mask=valid, other=0.0)
        a = tl.load(scratch_ptr + 2 * T + t, mask=valid, other=0.0)
        if OFFICIAL:
            tis = tl.where(cand, (r / (sum_r + 1e-8) + a / (sum_a + 1e-8) + c) / 3.0, 0.0)
        else:
            # (the scalar flag second: the interpreter cannot broadcast a scalar comparison into an &)
            nr = tl.where(ok_r, tl.where(cand, (r - min_r) / span_r, 0.0), 0.0)
            nc = tl.where(ok_c, tl.where(cand, (c - min_c) / span_c, 0.0), 0.0)
            na = tl.where(ok_a, tl.where(cand, (a - min_a) / span_a, 0.0), 0.0)
            tis = (nr + nc + na) / 3.0
        tl.store(importance_ptr + t, tis, mask=valid)
        tl.store(score_ptr + t, tl.where(cand, tis, float("inf")), mask=valid)
    tl.debug_barrier()   # the scores are read below by other threads of this program

    # Pass c: per alignment token k, softmax_i(A_ik / tau) . TIS_i over candidates, online over token tiles.
    # Only the score is loaded per row (candidates: a score other than +inf, a NaN TIS included): per-row
    # vectors are replicated across the lanes that share a row of the [BLOCK_T, BLOCK_K] tile.
    theta = float("inf")
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        m = tl.full([BLOCK_K], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
        s_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
        for t0 in range(0, length, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            valid = t < length
            score = tl.load(score_ptr + t, mask=valid, other=float("inf"))
            cand = score != float("inf")
            tis = tl.where(cand, score, 0.0)
            al = tl.load(align_ptr + t[:, None] * K + k[None, :], mask=cand[:, None] & k_ok[None, :],
                         other=float("-inf"))
            logit = al * inv_tau
            m_new = tl.maximum(m, tl.max(logit, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # no (-inf) - (-inf)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(logit - m_safe[None, :])
            l_sum = l_sum * alpha + tl.sum(p, axis=0)
            s_sum = s_sum * alpha + tl.sum(p * tis[:, None], axis=0)
            m = m_new
        # l_sum == 0 (every logit -inf): zero weights, so s_sum is 0 (or NaN, from 0 * a NaN TIS) over any divisor.
        per_k = tl.where(k_ok, s_sum / tl.maximum(l_sum, 1.1754943508222875e-38, propagate_nan=tl.PropagateNan.ALL),
                         float("inf"))
        theta = tl.minimum(theta, _nan_min(per_k, 0), propagate_nan=tl.PropagateNan.ALL)
    theta = tl.where(n_cand > 0, theta, 0.0)
    tl.store(theta_ptr + b, theta)
    # The compaction's threshold: a NaN theta drops every candidate (TIS > NaN is false) but must keep the rows
    # that always stay, whose score is +inf; FLT_MAX does both (a minmax TIS is at most 1, or NaN; an official
    # one is far below FLT_MAX unless a term's sum is within ~1e-38 of -1e-8).
    theta = tl.where(theta != theta, 3.4028234663852886e38, theta)
    tl.store(dthr_ptr + b, theta)

    # Pass d: the output rows, by the rule the compaction applies (t < 1 or score > theta, in fp32).
    n_kept = 0
    for t0 in range(0, length, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        valid = t < length
        s = tl.load(score_ptr + t, mask=valid, other=0.0)
        n_kept += tl.sum((valid & ((t < 1) | (s > theta))).to(tl.int32), axis=0)
    rows_out = n_kept
    if MERGE:
        # No saving, no pruning: n - 1 kept rows + 1 merged row. The dropped row's score becomes +inf, so the
        # compaction keeps it (importance keeps its TIS).
        if length - n_kept == 1:
            for t0 in range(1, length, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                valid = t < length
                s = tl.load(score_ptr + t, mask=valid, other=float("inf"))
                tl.store(score_ptr + t, tl.full([BLOCK_T], float("inf"), tl.float32), mask=valid & ~(s > theta))
            rows_out = length
        rows_out += (rows_out < length).to(tl.int32)
    tl.store(rows_ptr + b, rows_out)


@triton.jit
def _finish_kernel(y_ptr, index_ptr, prot_ptr, prot_new_ptr, cu_new_ptr, B, T, C,
                   HAS_PROT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows r0.. of the outputs: protected flags of the result rows, zeros on the capacity rows."""
    r0 = tl.program_id(0) * BLOCK_R
    total = tl.load(cu_new_ptr + B)
    r = r0 + tl.arange(0, BLOCK_R)
    in_range = r < T
    live = r < total
    if HAS_PROT:
        src = tl.load(index_ptr + r, mask=live, other=-1)
        flag = tl.load(prot_ptr + src, mask=live & (src >= 0), other=0)
        tl.store(prot_new_ptr + r, flag, mask=in_range)
    if r0 + BLOCK_R > total:
        dead = in_range & ~live
        tl.store(index_ptr + r, tl.zeros([BLOCK_R], dtype=tl.int32), mask=dead)
        rows = r.to(tl.int64)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            tl.store(y_ptr + rows[:, None] * C + cols[None, :],
                     tl.zeros([BLOCK_R, BLOCK_C], dtype=y_ptr.dtype.element_ty),
                     mask=dead[:, None] & (cols < C)[None, :])


def _pow2(n: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, triton.next_power_of_2(n)))


def score_and_prune(x: torch.Tensor, cu_seqlens: torch.Tensor, received: torch.Tensor, cls: torch.Tensor,
                    attn_out: torch.Tensor, align: torch.Tensor, temperature: float, protected: torch.Tensor | None,
                    merge: bool, max_len: int, headmax: torch.Tensor | None = None, importance: str = "minmax"):
    """-> (y [T, C], cu_new int32 [B+1], kept_index int32 [T], protected_new bool [T] (or [0]),
    importance fp32 [T], theta fp32 [B]); rows at and past cu_new[-1] are capacity (zeros)."""
    rows, C = x.shape
    batch = cu_seqlens.numel() - 1
    dev = x.device
    if rows == 0:
        return (x.new_empty(x.shape), torch.zeros_like(cu_seqlens), cu_seqlens.new_empty((0,)),
                torch.zeros(0, dtype=torch.bool, device=dev), x.new_empty((0,), dtype=torch.float32),
                x.new_zeros((batch,), dtype=torch.float32))
    H = received.shape[1]
    D = attn_out.shape[2]
    K = align.shape[1]
    scratch = torch.empty((3, rows), dtype=torch.float32, device=dev)
    official = importance == "official"
    importance = torch.empty(rows, dtype=torch.float32, device=dev)
    score = torch.empty(rows, dtype=torch.float32, device=dev)
    theta = torch.empty(batch, dtype=torch.float32, device=dev)
    decision = torch.empty(batch, dtype=torch.float32, device=dev)   # theta, FLT_MAX where theta is NaN
    counts = torch.empty(batch, dtype=torch.int32, device=dev)
    prot = protected.view(torch.uint8) if protected is not None else counts   # unused without HAS_PROT
    _score_kernel[(batch,)](
        received, cls, attn_out, align, prot, cu_seqlens, scratch, importance, score, theta, decision, counts,
        headmax if official else score, 1.0 / temperature, rows, H, D, K,   # (score: unused without OFFICIAL)
        HAS_PROT=protected is not None, MERGE=merge, OFFICIAL=official, BLOCK_T=_SCORE_BLOCK_T,
        BLOCK_H=_pow2(H, 2, 1 << 30),
        BLOCK_D=_pow2(D, 16, _SCORE_BLOCK_D), BLOCK_K=_pow2(K, 16, _SCORE_BLOCK_K),
        BLOCK_DT=_pow2(D, 16, _SCORE_BLOCK_DT), num_warps=_SCORE_NUM_WARPS)
    cu_new = torch.zeros(batch + 1, dtype=torch.int32, device=dev)
    torch.cumsum(counts, 0, dtype=torch.int32, out=cu_new[1:])

    y = torch.empty_like(x)
    kept_index = torch.empty(rows, dtype=torch.int32, device=dev)
    block_c = _block_c(C, _COMPACT_BLOCK_C)
    # At least one column block even when C == 0: column block 0 writes kept_index.
    _compact_kernel[(batch, max(1, triton.cdiv(C, block_c)))](
        x, y, kept_index, cu_seqlens, cu_new, score, decision, 1, 0, C,
        FROM_MASK=False, MERGE=merge, WRITE_INDEX=True,
        BLOCK_T=_COMPACT_BLOCK_T, BLOCK_C=block_c, num_warps=_NUM_WARPS)

    protected_new = torch.empty(rows if protected is not None else 0, dtype=torch.bool, device=dev)
    _finish_kernel[(triton.cdiv(rows, _FINISH_BLOCK_R),)](
        y, kept_index, prot, protected_new.view(torch.uint8) if protected is not None else counts, cu_new,
        batch, rows, C, HAS_PROT=protected is not None, BLOCK_R=_FINISH_BLOCK_R, BLOCK_C=_FINISH_BLOCK_C,
        num_warps=_NUM_WARPS)
    return y, cu_new, kept_index, protected_new, importance, theta


def _aot_specs() -> list[AotSpec]:
    specs = []
    # ViT-B / BERT-base heads with MADTP's 100 alignment tokens for every attn_out dtype; ViT-L's 16 heads;
    # a narrow K (one 16-wide K tile). Scores and statistics are fp32 whatever the rows' dtype.
    score_cases = [(dt, 12, 100) for dt in ("fp16", "bf16", "fp32")] + [("fp16", 16, 100), ("fp16", 12, 8)]
    for (attn_dt, heads, k_tokens), official in [(c, False) for c in score_cases] + [(c, True) for c in score_cases]:
        for has_prot in (False, True):
            specs.append(AotSpec(
                _score_kernel,
                {"received_ptr": "*fp32", "cls_ptr": "*fp32", "attn_ptr": f"*{attn_dt}", "align_ptr": "*fp32",
                 "prot_ptr": "*u8" if has_prot else "*i32", "cu_ptr": "*i32", "scratch_ptr": "*fp32",
                 "importance_ptr": "*fp32", "score_ptr": "*fp32", "theta_ptr": "*fp32", "dthr_ptr": "*fp32",
                 "rows_ptr": "*i32", "headmax_ptr": "*fp32",
                 "inv_tau": "fp32", "T": "i32", "H": "i32", "D": "i32", "K": "i32"},
                {"HAS_PROT": has_prot, "MERGE": True, "OFFICIAL": official, "BLOCK_T": _SCORE_BLOCK_T,
                 "BLOCK_H": _pow2(heads, 2, 1 << 30), "BLOCK_D": _pow2(64, 16, _SCORE_BLOCK_D),
                 "BLOCK_K": _pow2(k_tokens, 16, _SCORE_BLOCK_K), "BLOCK_DT": _pow2(64, 16, _SCORE_BLOCK_DT)},
                num_warps=_SCORE_NUM_WARPS,
                label=f"attn {attn_dt} H={heads} D=64 K={k_tokens} protected={int(has_prot)} "
                      f"{'official' if official else 'minmax'}"))
    for dt in ("fp16", "bf16", "fp32"):
        for merge in (False, True):
            specs.append(AotSpec(
                _compact_kernel,
                {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "index_ptr": "*i32", "src_cu_ptr": "*i32",
                 "dst_cu_ptr": "*i32", "keep_ptr": "*fp32", "thr_ptr": "*fp32", "keep_first": "i32", "N": "i32",
                 "C": "i32"},
                {"FROM_MASK": False, "MERGE": merge, "WRITE_INDEX": True, "BLOCK_T": _COMPACT_BLOCK_T,
                 "BLOCK_C": _COMPACT_BLOCK_C}, num_warps=_NUM_WARPS, divisible_by_16=("x_ptr", "y_ptr", "C"),
                label=f"{dt} fp32 scores merge={int(merge)} (score_and_prune)"))
        for has_prot in (False, True):
            specs.append(AotSpec(
                _finish_kernel,
                {"y_ptr": f"*{dt}", "index_ptr": "*i32", "prot_ptr": "*u8" if has_prot else "*i32",
                 "prot_new_ptr": "*u8" if has_prot else "*i32", "cu_new_ptr": "*i32", "B": "i32", "T": "i32",
                 "C": "i32"},
                {"HAS_PROT": has_prot, "BLOCK_R": _FINISH_BLOCK_R, "BLOCK_C": _FINISH_BLOCK_C},
                num_warps=_NUM_WARPS, divisible_by_16=("y_ptr", "C"), label=f"{dt} protected={int(has_prot)}"))
    return specs


AOT_SPECS = _aot_specs()
