"""Non-finite values (NaN, +inf, -inf): one semantics on every backend, against float64 oracles from the formulas.

The rule (README "Non-finite values"): IEEE propagation, no host sync. A NaN or inf reaches exactly the outputs
whose formula reads it, and nothing else: masked and unselected values are selected away (where), never
multiplied by 0. Two conventions come from flash-attention / PyTorch SDPA: a query whose scores are all -inf
(and a softmax over nothing but -inf) has zero weights, and a comparison with NaN is false (a NaN score or
importance is dropped; a NaN threshold drops every candidate). Each oracle below is a plain float64 loop over
samples written from those formulas; it shares no code with any backend. Inputs are fresh random draws each run
(the seed is in every failure message).
"""
from __future__ import annotations

import os

import pytest
import torch

import madtp_kernels as mk
from madtp_kernels import _dispatch

NAN, INF = float("nan"), float("inf")
VALUES = pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
TINY32 = torch.finfo(torch.float32).tiny


def backend_params(op: str):
    """torch on CPU, Triton (under the interpreter without a GPU), and on a GPU torch and cuda as well."""
    gpu = torch.cuda.is_available()
    params = [pytest.param("torch", "cpu", id="torch-cpu"),
              pytest.param("triton", "cuda" if gpu else "cpu", id="triton")]
    for name in ("torch", "cuda"):
        built = name != "cuda" or (gpu and _dispatch.BACKENDS["cuda"].is_available()
                                   and name in _dispatch.implementations(op))
        params.append(pytest.param(name, "cuda", id=f"{name}-cuda", marks=[
            pytest.mark.cuda, pytest.mark.skipif(not (gpu and built), reason="needs a CUDA GPU (and _C)")]))
    return params


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def same(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, msg: str) -> None:
    """NaN positions equal, infinities equal, finite values close."""
    actual = actual.detach().cpu().double()
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"{msg}: NaN at {actual.isnan().nonzero().tolist()[:8]}, expected at {expected.isnan().nonzero().tolist()[:8]}")
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{msg}: {m}")


def bounds(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def cu(lengths):
    return torch.tensor(bounds(lengths), dtype=torch.int32)


# ------------------------------------------------------------------ varlen_attention

ATT_LENGTHS = [5, 0, 70, 3, 1]   # 70 keys: whole key blocks (no mask) as well as a ragged tail on every backend
ATT_TOL = dict(atol=2e-5, rtol=1e-5)


def attention_oracle(q, k, v, lengths, scale, causal=False):
    """(out [T, H, D], received [T, H], cls [T, H]) in float64. p = softmax over the keys a query sees (all of
    its sequence's, or j <= i if causal), with p = 0 on a row whose scores are all -inf; out = sum over the
    visible keys of p_j v_j elementwise (0 * NaN = NaN for a visible key; a hidden key is never read)."""
    q, k, v = (t.double() for t in (q, k, v))
    out, received, cls = torch.zeros_like(q), torch.zeros(k.shape[:2], dtype=torch.float64), None
    cls = torch.zeros_like(received)
    b = bounds(lengths)
    for s in range(len(lengths)):
        lo, hi = b[s], b[s + 1]
        if hi == lo:
            continue
        qb, kb, vb = q[lo:hi].transpose(0, 1), k[lo:hi].transpose(0, 1), v[lo:hi].transpose(0, 1)  # [H, L, D]
        scores = (qb[:, :, None, :] * kb[:, None, :, :]).sum(-1) * scale                            # [H, L, L]
        n = hi - lo
        visible = torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
        scores = torch.where(visible, scores, -INF)
        m = scores.amax(-1, keepdim=True)
        e = torch.exp(scores - m)
        p = torch.where(m == -INF, 0.0, e / e.sum(-1, keepdim=True))
        p = torch.where(visible, p, 0.0)  # a NaN row's softmax is NaN everywhere; hidden keys get nothing
        terms = torch.where(visible[None, :, :, None], p[..., None] * vb[:, None, :, :], 0.0)
        out[lo:hi] = terms.sum(2).transpose(0, 1)
        received[lo:hi] = p.sum(1).transpose(0, 1)
        cls[lo:hi] = p[:, 0, :].transpose(0, 1)
    return out, received, cls


# (case, value): a value in a q, k or v row; a q row whose every score is -inf; a value in a physical row that
# no index refers to.
ATT_CASES = [(case, value) for case in ("q", "k", "v", "unreferenced-row") for value in (NAN, INF, -INF)] + [
    ("q-all-scores-neg-inf", -INF)]


@pytest.mark.parametrize("backend,device", backend_params("varlen_attention"))
@pytest.mark.parametrize("case,value", ATT_CASES, ids=[f"{c}={v}" for c, v in ATT_CASES])
@pytest.mark.parametrize("stats", [False, True], ids=["out", "stats"])
@pytest.mark.parametrize("indexed", [False, True], ids=["packed", "indexed"])
def test_varlen_attention(backend, device, case, value, stats, indexed):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    heads, dim = 2, 16
    rows = sum(ATT_LENGTHS)
    q, k, v = (torch.randn(rows, heads, dim, generator=g) for _ in range(3))
    seq = int(torch.randint(0, 3, (1,), generator=g)) * 2 if case != "unreferenced-row" else 0  # 0, 2 or 4
    b = bounds(ATT_LENGTHS)
    row = int(torch.randint(b[seq], b[seq + 1], (1,), generator=g))
    h, d = int(torch.randint(0, heads, (1,), generator=g)), int(torch.randint(0, dim, (1,), generator=g))
    if case == "q-all-scores-neg-inf":
        k[b[seq]:b[seq + 1], h, d] = k[b[seq]:b[seq + 1], h, d].abs() + 0.5   # q_d = -inf: every score is -inf
        q[row, h, d] = value
    elif case != "unreferenced-row":
        {"q": q, "k": k, "v": v}[case][row, h, d] = value
    scale = dim ** -0.5
    want = attention_oracle(q, k, v, ATT_LENGTHS, scale)
    args = (q, k, v)
    kwargs = {}
    if indexed or case == "unreferenced-row":
        # Physical buffers with one extra row that no index refers to; logical row i is physical perm[i].
        perm = torch.randperm(rows + 1, generator=g)
        spare = int(perm[-1])
        perm = perm[:-1]
        phys = []
        for t in (q, k, v):
            buf = torch.randn(rows + 1, heads, dim, generator=g)
            buf[perm] = t
            if case == "unreferenced-row":
                buf[spare] = value
            phys.append(buf)
        args = tuple(phys)
        kwargs = dict(q_index=perm.to(torch.int32), kv_index=perm.to(torch.int32))
    msg = f"seed {seed}, case {case}={value} at row {row} head {h} dim {d}"
    with mk.use_backend(backend):
        got = mk.varlen_attention(*(t.to(device) for t in args), cu(ATT_LENGTHS).to(device), scale=scale,
                                  return_stats=stats,
                                  **{n: t.to(device) for n, t in kwargs.items()})
    out, st = got if stats else (got, None)
    same(out, want[0], msg=msg + " (out)", **ATT_TOL)
    if stats:
        same(st.received, want[1], msg=msg + " (received)", **ATT_TOL)
        same(st.cls, want[2], msg=msg + " (cls)", **ATT_TOL)


CAUSAL_CASES = [(case, value) for case in ("q", "k", "v") for value in (NAN, INF, -INF)]


@pytest.mark.parametrize("backend,device", backend_params("varlen_attention"))
@pytest.mark.parametrize("case,value", CAUSAL_CASES, ids=[f"{c}={v}" for c, v in CAUSAL_CASES])
@pytest.mark.parametrize("stats", [False, True], ids=["out", "stats"])
def test_varlen_attention_causal(backend, device, case, value, stats, request):
    """causal=True: a value reaches only what the mask lets read it. A v row j must not reach the queries
    before j (in the same key block as well as in earlier ones), a q row not the statistics of later keys."""
    if backend == "triton" and case == "v":
        # Known gap (README "Non-finite values"): the Triton forward's diagonal tile multiplies the hidden keys'
        # v by p = 0. An exact tile (the visible non-finite terms counted apart) spilled on sm_80. Strict: a fix
        # shows up here as a failure to remove this mark.
        request.applymarker(pytest.mark.xfail(strict=True, reason="Triton causal: a non-finite v row reaches the "
                                                                  "earlier queries of its key block"))
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    heads, dim = 2, 16
    rows = sum(ATT_LENGTHS)
    q, k, v = (torch.randn(rows, heads, dim, generator=g) for _ in range(3))
    b = bounds(ATT_LENGTHS)
    seq = 2  # the 70-row sequence: whole key blocks and a ragged tail
    # in the first 64 rows, never a multiple of 16 (a block start for every tile size): the block holding the
    # value also holds queries the mask hides it from
    row = b[seq] + 16 * int(torch.randint(0, 4, (1,), generator=g)) + int(torch.randint(1, 16, (1,), generator=g))
    h, d = int(torch.randint(0, heads, (1,), generator=g)), int(torch.randint(0, dim, (1,), generator=g))
    {"q": q, "k": k, "v": v}[case][row, h, d] = value
    scale = dim ** -0.5
    want = attention_oracle(q, k, v, ATT_LENGTHS, scale, causal=True)
    msg = f"seed {seed}, causal, case {case}={value} at row {row} head {h} dim {d}"
    with mk.use_backend(backend):
        got = mk.varlen_attention(q.to(device), k.to(device), v.to(device), cu(ATT_LENGTHS).to(device),
                                  scale=scale, causal=True, return_stats=stats)
    out, st = got if stats else (got, None)
    same(out, want[0], msg=msg + " (out)", **ATT_TOL)
    if stats:
        same(st.received, want[1], msg=msg + " (received)", **ATT_TOL)
        same(st.cls, want[2], msg=msg + " (cls)", **ATT_TOL)


# ------------------------------------------------------------------ pack / unpack

@pytest.mark.parametrize("backend,device", backend_params("pack"))
@VALUES
def test_pack_copies_kept_values_and_never_a_dropped_one(backend, device, value):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 9, 5, generator=g)
    mask = torch.rand(3, 9, generator=g) < 0.5
    mask[0, 0], mask[1, 3] = True, False
    x[0, 0, 2] = value    # kept: copied as is
    x[1, 3, :] = value    # masked out: must not appear anywhere
    want = torch.cat([x[b][mask[b]] for b in range(3)]).double()
    with mk.use_backend(backend):
        packed = mk.pack(x.to(device), mask=mask.to(device))
    same(packed.x, want, 0, 0, f"seed {seed}")


@pytest.mark.parametrize("backend,device", backend_params("unpack"))
@VALUES
@pytest.mark.parametrize("where", ["pad_value", "row"])
def test_unpack_non_finite_rows_and_padding(backend, device, value, where):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    lengths = [4, 0, 7, 1]
    packed = torch.randn(sum(lengths), 6, generator=g)
    pad = value if where == "pad_value" else 0.0
    if where == "row":
        packed[int(torch.randint(0, packed.shape[0], (1,), generator=g)), 3] = value
    want = torch.full((4, 7, 6), pad, dtype=torch.float64)
    b = bounds(lengths)
    for s, n in enumerate(lengths):
        want[s, :n] = packed[b[s]:b[s + 1]].double()
    with mk.use_backend(backend):
        out = mk.unpack(packed.to(device), cu(lengths).to(device), pad_value=pad)
    same(out, want, 0, 0, f"seed {seed}")


# ------------------------------------------------------------------ prune_tokens

TOK_LENGTHS = [6, 0, 1, 9, 40]
TOK_TOL = dict(atol=1e-5, rtol=1e-5)


def prune_oracle(x, lengths, scores, threshold, keep_first=1):
    """(y, cu_new, kept_index): keep t < keep_first or score > threshold (False for NaN); merged row
    sum_d s_d x_d / sum_d s_d over the dropped rows (their plain mean where that sum is exactly 0)."""
    x64, s64 = x.double(), scores.double()
    ys, index, counts = [], [], []
    b = bounds(lengths)
    for s in range(len(lengths)):
        rows = range(b[s], b[s + 1])
        kept = [r for r in rows if r - b[s] < keep_first or bool(s64[r] > float(threshold[s]))]
        dropped = [r for r in rows if r not in kept]
        ys += [x64[r] for r in kept]
        index += kept
        if dropped:
            w, xs = s64[dropped], x64[dropped]
            total = w.sum()
            ys.append(xs.sum(0) / len(dropped) if bool(total == 0) else (w[:, None] * xs).sum(0) / total)
            index.append(-1)
        counts.append(len(kept) + bool(dropped))
    return torch.stack(ys), bounds(counts), index


def draw_prune(seed):
    g = torch.Generator().manual_seed(seed)
    rows = sum(TOK_LENGTHS)
    x = torch.randn(rows, 5, generator=g)
    scores = torch.rand(rows, generator=g)
    threshold = torch.rand(len(TOK_LENGTHS), generator=g) * 0.6 + 0.2
    return g, x, scores, threshold


def pick(g, rows):
    return rows[int(torch.randint(0, len(rows), (1,), generator=g))]


PRUNE_CASES = ["x-kept", "x-dropped", "x-first", "score-dropped", "score-kept", "score-first", "threshold"]


@pytest.mark.parametrize("backend,device", backend_params("prune_tokens"))
@pytest.mark.parametrize("case", PRUNE_CASES)
@VALUES
def test_prune_tokens(backend, device, case, value):
    seed = fresh_seed()
    g, x, scores, threshold = draw_prune(seed)
    b = bounds(TOK_LENGTHS)
    sample = 4   # 40 rows: kept and dropped rows both (a 40-row sample with none of either is ~1e-9 likely)
    rows = list(range(b[sample] + 1, b[sample + 1]))
    kept = [r for r in rows if scores[r] > threshold[sample]]
    dropped = [r for r in rows if r not in kept]
    if case == "x-kept":
        x[pick(g, kept), 2] = value
    elif case == "x-dropped":
        x[pick(g, dropped), 2] = value
    elif case == "x-first":
        x[b[sample], :] = value
    elif case == "score-dropped":
        scores[pick(g, dropped)] = value
    elif case == "score-kept":
        scores[pick(g, kept)] = value
    elif case == "score-first":
        scores[b[sample]] = value
    else:
        threshold[sample] = value
    want_y, want_cu, want_index = prune_oracle(x, TOK_LENGTHS, scores, threshold)
    msg = f"seed {seed}, {case}={value}"
    with mk.use_backend(backend):
        got = mk.prune_tokens(x.to(device), cu(TOK_LENGTHS).to(device), scores.to(device), threshold.to(device))
    assert got.layout.cu_seqlens.cpu().tolist() == want_cu, msg
    assert got.kept_index.cpu().tolist() == want_index, msg
    same(got.x, want_y, msg=msg, **TOK_TOL)


# ------------------------------------------------------------------ score_and_prune

SP_LENGTHS = [9, 0, 1, 14, 40]
SP_TARGET = 3          # the sample that gets the non-finite value (14 rows, one of them protected)
SP_PROTECTED = 5       # its protected row (local position)
SP_TAU = 0.5
SP_TOL = dict(atol=1e-5, rtol=1e-5)


def nan_clamp_min(t, lo):
    return torch.where(t.isnan() | (t > lo), t, torch.full_like(t, lo))


def score_oracle(x, lengths, received, cls, attn_out, align, tau, protected):
    """(y, cu_new, kept_index, importance [T], theta [B]) in float64 from the formulas of
    madtp_kernels.pruning.score_and_prune, IEEE throughout: NaN-propagating max / min, 0 where a term's span over
    the candidates is exactly 0 (and only there), zero softmax weights where every logit is -inf."""
    x, rec, cl, ao, al = (t.double() for t in (x, received, cls, attn_out, align))
    importance = torch.zeros(x.shape[0], dtype=torch.float64)
    thetas, ys, index, counts = [], [], [], []
    b = bounds(lengths)
    for s, n in enumerate(lengths):
        rows = list(range(b[s], b[s + 1]))
        if n == 0:
            thetas.append(0.0)
            counts.append(0)
            continue
        cand = [r for r in rows[1:] if not bool(protected[r])]
        theta = torch.tensor(0.0, dtype=torch.float64)
        if cand:
            norms = (ao[rows[0]] ** 2).sum(-1).sqrt()                        # [H]
            w = norms / nan_clamp_min(norms.sum(), TINY32)
            terms = [torch.stack([rec[r].amax() for r in cand]), torch.stack([(w * cl[r]).sum() for r in cand]),
                     torch.stack([al[r].amax() for r in cand])]
            tis = torch.zeros(len(cand), dtype=torch.float64)
            for t in terms:
                lo, span = t.amin(), t.amax() - t.amin()
                tis = tis + torch.where(span == 0, 0.0, (t - lo) / span)
            tis = tis / 3
            importance[cand] = tis
            logits = al[cand] / tau                                          # [n, K]
            m = logits.amax(0)
            e = torch.exp(logits - m)
            p = torch.where(m == -INF, 0.0, e / e.sum(0))
            theta = (p * tis[:, None]).sum(0).amin()
        thetas.append(float(theta))
        keep = [r for r in rows if r not in cand or bool(importance[r] > theta)]
        dropped = [r for r in rows if r not in keep]
        if len(dropped) == 1:   # merge: n - 1 kept + 1 merged row saves nothing, so nothing is dropped
            keep, dropped = rows, []
        ys += [x[r] for r in keep]
        index += keep
        if dropped:
            wd, xs = importance[dropped], x[dropped]
            total = wd.sum()
            ys.append(xs.sum(0) / len(dropped) if bool(total == 0) else (wd[:, None] * xs).sum(0) / total)
            index.append(-1)
        counts.append(len(keep) + bool(dropped))
    y = torch.stack(ys)
    return y, bounds(counts), index, importance, torch.tensor(thetas, dtype=torch.float64)


def draw_scores(seed):
    g = torch.Generator().manual_seed(seed)
    rows, heads, dim, tokens = sum(SP_LENGTHS), 3, 4, 8
    x = torch.randn(rows, 5, generator=g)
    received = torch.rand(rows, heads, generator=g) * 3
    cls = torch.rand(rows, heads, generator=g)
    attn_out = torch.randn(rows, heads, dim, generator=g)
    align = torch.randn(rows, tokens, generator=g)
    protected = torch.rand(rows, generator=g) < 0.1
    b = bounds(SP_LENGTHS)
    protected[b[SP_TARGET]:b[SP_TARGET + 1]] = False
    protected[b[SP_TARGET] + SP_PROTECTED] = True
    return g, [x, received, cls, attn_out, align, protected]


def scored_inputs():
    """Fresh inputs whose finite decisions are clear: every candidate's TIS at least 1e-4 from its threshold
    (the backends compute in float32), and the target sample keeps some candidates and drops others."""
    b = bounds(SP_LENGTHS)
    for _ in range(100):
        seed = fresh_seed()
        g, inputs = draw_scores(seed)
        _, _, index, importance, theta = score_oracle(inputs[0], SP_LENGTHS, *inputs[1:5], SP_TAU, inputs[5])
        margins = []
        for s in range(len(SP_LENGTHS)):
            for r in range(b[s] + 1, b[s + 1]):
                if not bool(inputs[5][r]):
                    margins.append(abs(float(importance[r] - theta[s])))
        target = [r for r in range(b[SP_TARGET] + 1, b[SP_TARGET + 1]) if not bool(inputs[5][r])]
        kept = [r for r in target if r in index]
        if min(margins) > 1e-4 and kept and len(kept) < len(target):
            return seed, g, inputs, kept, [r for r in target if r not in kept]
    raise AssertionError("no clear draw in 100 tries")


SP_CASES = ["x-kept", "x-dropped", "x-protected", "x-first", "received-candidate", "received-protected",
            "received-first", "cls-candidate", "cls-first", "attn_out-first", "attn_out-candidate",
            "align-candidate", "align-protected", "align-first"]


@pytest.mark.parametrize("backend,device", backend_params("score_and_prune"))
@pytest.mark.parametrize("case", SP_CASES)
@VALUES
def test_score_and_prune(backend, device, case, value):
    seed, g, inputs, kept, dropped = scored_inputs()
    x, received, cls, attn_out, align, protected = inputs
    b = bounds(SP_LENGTHS)
    first, prot = b[SP_TARGET], b[SP_TARGET] + SP_PROTECTED
    tensor, kind = case.split("-")
    row = {"kept": pick(g, kept), "dropped": pick(g, dropped), "protected": prot, "first": first,
           "candidate": pick(g, kept + dropped)}[kind]
    t = {"x": x, "received": received, "cls": cls, "attn_out": attn_out, "align": align}[tensor]
    col = int(torch.randint(0, t.shape[1], (1,), generator=g))
    t[row, col] = value
    want_y, want_cu, want_index, want_imp, want_theta = score_oracle(x, SP_LENGTHS, received, cls, attn_out, align,
                                                                     SP_TAU, protected)
    msg = f"seed {seed}, {case}={value} at row {row} column {col}"
    with mk.use_backend(backend):
        got = mk.score_and_prune(x.to(device), cu(SP_LENGTHS).to(device),
                                 (received.to(device), cls.to(device)), attn_out.to(device), align.to(device),
                                 temperature=SP_TAU, protected=protected.to(device))
    same(got.importance, want_imp, msg=msg + " (importance)", **SP_TOL)
    same(got.threshold, want_theta, msg=msg + " (threshold)", **SP_TOL)
    assert got.layout.cu_seqlens.cpu().tolist() == want_cu, msg
    assert got.kept_index.cpu().tolist() == want_index, msg
    same(got.x, want_y, msg=msg + " (rows)", **SP_TOL)
