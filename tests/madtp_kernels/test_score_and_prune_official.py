"""score_and_prune's two importance formulas and the no-saving rule (issue 15 A, B), on torch and Triton, against
the float64 decision oracle tests/madtp/_decision_oracle.py (written from the formulas; its official one
transcribed from double125/MADTP models/vit.py). Gradients of the official formula against float64 autograd.

A float32 decision may differ from the float64 one only on a token whose TIS is within AMBIGUOUS of theta: the
oracle follows the op there (its `flip`), nowhere else. The official received and alignment terms are divided by
their sums over the candidates: alignment scores of mixed sign can sum to ~0 and make the term arbitrarily
ill-conditioned, so the hypothesis inputs draw them of one sign per batch (both signs, as the official allows);
seeded tests use unshifted normal scores.
"""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch
from backend_params import backend_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import madtp_kernels as mk
from madtp_kernels import AttentionStats, pruning

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "madtp"))
import _decision_oracle as oracle  # noqa: E402

AMBIGUOUS = 1e-4
MERGED_TOL = dict(atol=2e-5, rtol=2e-5)
PARAMS = backend_params("score_and_prune")
IMPORTANCE = ["minmax", "official"]


def make(lengths, heads=3, head_dim=8, tokens=4, channels=5, seed=0, protect=0.0, sign=0, constant=False):
    """(x, cu, AttentionStats(received, cls, headmax), attn_out, align, protected or None). sign: +1 / -1 draws
    the alignment scores of that sign, 0 plain normal."""
    g = torch.Generator().manual_seed(seed)
    rows = sum(lengths)
    x = torch.randn(rows, channels, generator=g)
    received = torch.rand(rows, heads, generator=g) * 3
    cls = torch.rand(rows, heads, generator=g)
    headmax = torch.rand(rows, generator=g) * 3
    attn_out = torch.randn(rows, heads, head_dim, generator=g)
    align = torch.randn(rows, tokens, generator=g)
    if sign:
        align = sign * (align.abs() + 0.05)
    if constant:   # every candidate alike: the minmax terms constant, the official TIS all equal
        received[:], cls[:], headmax[:], align[:] = 1.0, 0.25, 2.0, 0.5
        attn_out[:] = attn_out[0]
    protected = (torch.rand(rows, generator=g) < protect) if protect else None
    cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)
    return x, cu, AttentionStats(received, cls, headmax), attn_out, align, protected


def run(backend, device, inputs, tau, merge, importance):
    x, cu, stats, attn_out, align, protected = inputs
    to = (lambda t: None if t is None else t.to(device))
    with mk.use_backend(backend):
        return mk.score_and_prune(to(x), to(cu), AttentionStats(*(to(t) for t in stats)), to(attn_out), to(align),
                                  temperature=tau, protected=to(protected), merge=merge, importance=importance)


def check(out, lengths, inputs, tau, merge, importance):
    """The op's outputs sample by sample against the oracle's decision (ambiguous tokens follow the op)."""
    x, cu, stats, attn_out, align, protected = inputs
    prot = protected.tolist() if protected is not None else [False] * x.shape[0]
    imp, theta = out.importance.cpu().double(), out.threshold.cpu().double()
    kept_index, y = out.kept_index.cpu(), out.x.cpu()
    got_lengths = out.layout.lengths()
    assert len(got_lengths) == len(lengths)
    start_in = start_out = 0
    for b, n in enumerate(lengths):
        s = slice(start_in, start_in + n)
        args = (x[s], stats.received[s], stats.cls[s], attn_out[s], align[s], prot[s], tau, merge)
        kw = dict(importance=importance, headmax=stats.headmax[s])
        dec = oracle.decide(*args, **kw)
        got = set(kept_index[start_out:start_out + got_lengths[b]].tolist())
        flip = frozenset(i for i in dec.ambiguous(AMBIGUOUS) if (start_in + i in got) != (i in dec.kept))
        if flip:
            dec = oracle.decide(*args, flip=flip, **kw)
        assert abs(float(theta[b]) - dec.theta) <= 1e-5 * max(1.0, abs(dec.theta)), (b, float(theta[b]), dec.theta)
        for i in range(n):
            want = dec.tis.get(i, 0.0)   # 0 off the candidates
            assert abs(float(imp[start_in + i]) - want) <= 1e-5 * max(1.0, abs(want)), (b, i, float(imp[start_in + i]),
                                                                                         want)
        expect = [start_in + i for i in dec.kept] + ([-1] if dec.merged is not None else [])
        assert got_lengths[b] == len(expect), (b, got_lengths[b], expect)
        seg = slice(start_out, start_out + len(expect))
        assert kept_index[seg].tolist() == expect, b
        kept_rows = [start_in + i for i in dec.kept]
        assert torch.equal(y[seg][:len(kept_rows)], x[kept_rows]), "kept rows are exact copies"
        if dec.merged is not None:
            torch.testing.assert_close(y[start_out + len(expect) - 1].double(), dec.merged, **MERGED_TOL)
        if protected is not None:
            assert out.protected.cpu()[seg].tolist() == [bool(protected[i]) if i >= 0 else False for i in expect]
        start_in, start_out = start_in + n, start_out + len(expect)
    assert start_out == y.shape[0]


@st.composite
def batches(draw, max_batch=5):
    batch = draw(st.integers(1, max_batch))
    lengths = draw(st.lists(st.sampled_from([0, 1, 2, 3, 6, 11]), min_size=batch, max_size=batch))
    if draw(st.booleans()):
        lengths[draw(st.integers(0, batch - 1))] = draw(st.integers(65, 200))   # past one token tile
    return dict(lengths=lengths, channels=draw(st.sampled_from([1, 5, 70])), heads=draw(st.sampled_from([1, 3])),
                head_dim=draw(st.sampled_from([1, 8, 33])), tokens=draw(st.sampled_from([1, 4, 37])),
                seed=draw(st.integers(0, 2**31 - 1)), protect=draw(st.sampled_from([0.0, 0.2])),
                sign=draw(st.sampled_from([1, -1])))


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("importance", IMPORTANCE)
@given(case=batches(), tau=st.sampled_from([1e-3, 0.3, 1.0, 50.0]), merge=st.booleans())
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_matches_the_decision_oracle(backend, device, importance, case, tau, merge):
    inputs = make(**case)
    check(run(backend, device, inputs, tau, merge, importance), case["lengths"], inputs, tau, merge, importance)


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("importance", IMPORTANCE)
def test_long_sample_many_alignment_tokens(backend, device, importance):
    # Longer than every token tile (Triton: 64-token tiles, a 1,130-token loop) and K = 256 (four 64-wide
    # alignment-token tiles); unshifted normal scores; protected rows; empty and length-1 samples.
    lengths = [1130, 3, 0, 1, 257]
    inputs = make(lengths, heads=2, head_dim=16, tokens=256, channels=33, seed=7, protect=0.05)
    for merge in (True, False):
        check(run(backend, device, inputs, 0.5, merge, importance), lengths, inputs, 0.5, merge, importance)


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("importance", IMPORTANCE)
def test_all_equal_and_tied_scores(backend, device, importance):
    # Every candidate alike: minmax TIS all 0 = theta (a tie: all drop), official TIS all equal to theta up to
    # rounding (the oracle follows the op on those). Length-2 samples: theta is the lone candidate's TIS exactly.
    lengths = [4, 1, 0, 7, 2, 90]
    inputs = make(lengths, constant=True, seed=3)
    for merge in (True, False):
        out = run(backend, device, inputs, 1.0, merge, importance)
        check(out, lengths, inputs, 1.0, merge, importance)
        assert float(out.threshold[4]) == float(out.importance[sum(lengths[:4]) + 1])
    if importance == "minmax":
        assert run(backend, device, inputs, 1.0, True, importance).layout.lengths() == [2, 1, 0, 2, 2, 2]


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("importance", IMPORTANCE)
def test_one_drop_is_kept_with_merge_and_dropped_without(backend, device, importance):
    # Two candidates with different TIS: theta is a weighted mean of the two, so exactly the lower one drops.
    # With merge that is 1 kept + 1 merged row out of 2: no saving, so it stays; without merge it goes. One
    # candidate (length 2) ties with theta and drops by the same rule. The 30-token sample drops several:
    # unaffected.
    lengths = [3, 2, 30, 3]
    inputs = make(lengths, seed=11, tokens=4)
    base = [0, 3, 5, 35]
    with_merge = run(backend, device, inputs, 0.7, True, importance)
    without = run(backend, device, inputs, 0.7, False, importance)
    imp = without.importance
    for s in (0, 3):
        assert float(imp[base[s] + 1]) != float(imp[base[s] + 2])
    lw, lo = with_merge.layout.lengths(), without.layout.lengths()
    assert lo[0] == 2 and lo[1] == 1 and lo[3] == 2, lo
    assert lw[0] == 3 and lw[1] == 2 and lw[3] == 3, lw
    assert with_merge.kept_index.tolist()[:5] == [0, 1, 2, 3, 4]
    assert lw[2] >= 2 and -1 in with_merge.kept_index.tolist()[5:5 + lw[2]], "several drops still merge"
    check(with_merge, lengths, inputs, 0.7, True, importance)
    check(without, lengths, inputs, 0.7, False, importance)
    assert torch.equal(with_merge.threshold, without.threshold)   # the rule changes the decision, not theta


def _official_formula(x, lengths, headmax, cls, attn_out, align, kept, merge):
    """The official TIS and merged rows as differentiable float64 tensor ops (models/vit.py, per sample over its
    patch tokens 1:), on the op's decisions `kept`."""
    ys, start = [], 0
    for n in lengths:
        rows = list(range(start, start + n))
        start += n
        if not n:
            continue
        cand = rows[1:]
        ys += [x[r] for r in rows if r not in cand or r in kept]
        if not cand:
            continue
        self_attn_w = headmax[cand] / (headmax[cand].sum() + 1e-8)
        token_attn_w = align[cand].max(1)[0]
        token_attn_w = token_attn_w / (token_attn_w.sum() + 1e-8)
        head_importance = attn_out[cand].norm(dim=-1)
        head_importance = head_importance / (head_importance.sum(dim=1, keepdim=True) + 1e-8)
        cls_attn = (cls[cand] * head_importance).sum(dim=1)
        tis = (self_attn_w + token_attn_w + cls_attn) / 3
        dropped = [i for i, r in enumerate(cand) if r not in kept]
        if merge and dropped:
            wd = tis[dropped]
            xs = torch.stack([x[cand[i]] for i in dropped])
            ys.append((wd[:, None] * xs).sum(0) / wd.sum())
    return torch.stack(ys)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_official_gradients_match_autograd_of_the_formula(backend, device):
    # The op's backward (replayed decisions, recomputed importance) against float64 autograd of the official
    # formula; torch runs float64, Triton float32 (its backward is the same torch recompute).
    dtype = torch.float64 if backend == "torch" else torch.float32
    lengths = [6, 1, 0, 9, 3]
    x, cu, stats, attn_out, align, _ = make(lengths, tokens=3, seed=5, sign=1)
    x, attn_out = x.to(dtype), attn_out.to(dtype)
    stats = AttentionStats(*(t.to(dtype) for t in stats))
    align = align.to(dtype)
    leaves = [t.to(device).requires_grad_() for t in (x, attn_out, align)]
    with mk.use_backend(backend):
        out = mk.score_and_prune(leaves[0], cu.to(device), AttentionStats(*(t.to(device) for t in stats)),
                                 leaves[1], leaves[2], temperature=0.4, importance="official")
    g = torch.randn(out.x.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out.x, leaves, g.to(dtype).to(device))
    kept = set(out.kept_index.tolist())
    assert -1 in kept, "some sample must merge, or the scores get no gradient"
    f64 = [t.detach().double().requires_grad_() for t in (x, attn_out, align)]
    want = torch.autograd.grad(_official_formula(f64[0], lengths, stats.headmax.double(), stats.cls.double(),
                                                 f64[1], f64[2], kept, True), f64, g)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
    for got, w in zip(grads, want, strict=True):
        torch.testing.assert_close(got.cpu().double(), w, **tol)
    assert grads[1].abs().sum() > 0 and grads[2].abs().sum() > 0


@pytest.mark.parametrize("backend,device", [p for p in PARAMS if p.id.endswith("cpu")])
def test_opcheck_official(backend, device):
    x, cu, stats, attn_out, align, protected = make([4, 0, 7, 1, 3], protect=0.2, sign=1)
    x.requires_grad_(), attn_out.requires_grad_(), align.requires_grad_()
    op = getattr(torch.ops.madtp_kernels, f"score_and_prune_{backend}")
    torch.library.opcheck(op, (x, cu, stats.received, stats.cls, attn_out, align, 0.5, protected, True, 7,
                               stats.headmax, "official"))


def test_minmax_is_the_default_and_ignores_headmax():
    inputs = make([5, 8, 2], seed=2)
    x, cu, stats, attn_out, align, _ = inputs
    a = mk.score_and_prune(x, cu, stats, attn_out, align, temperature=0.5)
    b = mk.score_and_prune(x, cu, (stats.received, stats.cls), attn_out, align, temperature=0.5, importance="minmax")
    c = mk.score_and_prune(x, cu, stats, attn_out, align, temperature=0.5, importance="official")
    assert torch.equal(a.importance, b.importance) and torch.equal(a.x, b.x)
    assert not torch.equal(a.importance, c.importance)


@pytest.mark.parametrize("stats,error,match", [
    (lambda s: (s.received, s.cls), ValueError, r"stats\.headmax: .*official.*got None"),
    (lambda s: s._replace(headmax=None), ValueError, r"stats\.headmax: .*got None"),
    (lambda s: s._replace(headmax=s.headmax[:-1]), ValueError, r"stats\.headmax: expected shape \(7,\)"),
    (lambda s: s._replace(headmax=s.headmax[:, None]), ValueError, r"stats\.headmax: expected shape \(7,\)"),
    (lambda s: s._replace(headmax=s.headmax.double()), TypeError, r"stats\.headmax: expected dtype torch\.float32"),
    (lambda s: s._replace(headmax=s.headmax.to("meta")), ValueError, r"stats\.headmax: expected a tensor on cpu"),
    (lambda s: s._replace(headmax=[1.0] * 7), TypeError, r"stats\.headmax"),
])
def test_official_needs_a_valid_headmax(stats, error, match):
    x, cu, s, attn_out, align, _ = make([3, 4])
    with pytest.raises(error, match=match):
        mk.score_and_prune(x, cu, stats(s), attn_out, align, temperature=0.5, importance="official")


@pytest.mark.parametrize("importance", ["Official", "", None, 1, "min-max"])
def test_unknown_importance_is_refused(importance):
    x, cu, s, attn_out, align, _ = make([3, 4])
    with pytest.raises(ValueError, match=r"importance: expected one of \('minmax', 'official'\)"):
        pruning.score_and_prune(x, cu, s, attn_out, align, temperature=0.5, importance=importance)


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("where", ["headmax-candidate", "attn_out-candidate", "headmax-first", "attn_out-first",
                                   "headmax-protected", "attn_out-protected"])
def test_official_non_finite(backend, device, where):
    # The README's rule, for the official terms: a NaN in a candidate's headmax reaches every candidate through
    # the sum (all TIS NaN, theta NaN, every candidate dropped); one in a candidate's own head outputs makes its
    # TIS NaN, hence theta NaN. Rows that are not candidates are never read: a NaN there changes nothing.
    lengths = [9, 12]
    inputs = make(lengths, seed=21, sign=1, protect=0.0)
    protected = torch.zeros(sum(lengths), dtype=torch.bool)
    protected[4] = True
    inputs = (*inputs[:5], protected)
    clean = run(backend, device, inputs, 0.5, True, "official")
    tensor, kind = where.split("-")
    row = {"candidate": 2, "first": 0, "protected": 4}[kind]
    x, cu, stats, attn_out, align, _ = inputs
    stats = AttentionStats(stats.received, stats.cls, stats.headmax.clone())
    attn_out = attn_out.clone()
    if tensor == "headmax":
        stats.headmax[row] = float("nan")
    else:
        attn_out[row, 1, 3] = float("nan")
    got = run(backend, device, (x, cu, stats, attn_out, align, protected), 0.5, True, "official")
    assert torch.equal(got.importance[9:], clean.importance[9:]) and bool(got.threshold[1] == clean.threshold[1])
    if kind != "candidate":
        assert torch.equal(got.importance, clean.importance) and torch.equal(got.kept_index, clean.kept_index)
        return
    cand = [i for i in range(1, 9) if i != 4]
    nan_rows = cand if tensor == "headmax" else [row]
    assert got.importance[nan_rows].isnan().all() and bool(got.threshold[0].isnan())
    assert got.layout.lengths()[0] == 3 and got.kept_index[:3].tolist() == [0, 4, -1]   # first, protected, merged


@pytest.mark.parametrize("backend,device", [p for p in PARAMS if p.id.endswith("cpu")])
@pytest.mark.parametrize("importance", IMPORTANCE)
@pytest.mark.parametrize("merge", [True, False])
def test_one_host_read(backend, device, importance, merge, monkeypatch):
    # Given a RaggedLayout (offsets already known), the op reads the device once: the new offsets. The
    # no-saving rule and the official sums are device ops (a Python `if` on a tensor would be a second read).
    lengths = [5, 0, 9, 1, 3, 2]
    x, cu, stats, attn_out, align, protected = make(lengths, protect=0.2, sign=1)
    layout = mk.RaggedLayout.from_cu_seqlens(cu, x.shape[0])
    reads = []
    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    with mk.use_backend(backend):
        out = mk.score_and_prune(x, layout, stats, attn_out, align, temperature=0.5, protected=protected,
                                 merge=merge, importance=importance)
    monkeypatch.undo()
    assert reads == ["tolist"], reads
    assert out.layout.offsets[-1] == out.x.shape[0]
