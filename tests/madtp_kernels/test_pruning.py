"""score_and_prune: every backend against a per-sample loop written from the formulas (float64), gradients,
opcheck, bad input.

The oracle is a plain loop over samples and tokens, from the definitions in madtp_kernels.pruning's docstring:
it shares no code with any backend. Importance and threshold are compared within twice the error of the same
loop run in float32 (flash-attention's rule); decisions are compared exactly wherever no candidate lies within
that error of its threshold, and elsewhere taken from the backend and checked for consistency with its own
importance and threshold.
"""
from __future__ import annotations

import math

import pytest
import torch
from backend_params import backend_dtype_params, backend_params, run_or_refused
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import madtp_kernels as mk
from madtp_kernels import pruning

MERGED_TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3),
              torch.bfloat16: (8e-3, 8e-3)}  # ~ the dtype's epsilon, as fp16's


# ------------------------------------------------------------------ the oracle

def oracle(x, lengths, received, cls, attn_out, align, tau, protected, merge, dtype=torch.float64, decide=None):
    """(y, counts, kept_index, importance [T], theta [B]) by the formulas, in `dtype`. decide[b]: an optional
    list of kept candidate rows that replaces the oracle's own decision for sample b."""
    x64 = x.to(torch.float64)
    rec, cl, ao, al = (t.to(dtype) for t in (received, cls, attn_out, align))
    importance = torch.zeros(x.shape[0], dtype=dtype)
    thetas, ys, index, counts = [], [], [], []
    start = 0
    for b, n in enumerate(lengths):
        rows = list(range(start, start + n))
        start += n
        if n == 0:
            thetas.append(0.0)
            counts.append(0)
            continue
        cand = [r for r in rows[1:] if protected is None or not bool(protected[r])]
        norms = torch.stack([torch.sqrt((ao[rows[0], h] ** 2).sum()) for h in range(ao.shape[1])])
        w = norms / norms.sum() if float(norms.sum()) > 0 else torch.zeros_like(norms)
        terms = {r: (max(rec[r]), sum(w[h] * cl[r, h] for h in range(cl.shape[1])), max(al[r])) for r in cand}
        for j in range(3):
            vals = [terms[r][j] for r in cand]
            lo, hi = (min(vals), max(vals)) if vals else (0, 0)
            for r in cand:
                importance[r] += ((terms[r][j] - lo) / (hi - lo) if hi > lo else 0) / 3
        theta = 0.0
        if cand:
            per_token = []
            for k in range(al.shape[1]):
                e = torch.exp(torch.stack([al[r, k] / tau for r in cand]) - max(al[r, k] / tau for r in cand))
                p = e / e.sum()
                per_token.append(float(sum(p[i] * importance[r] for i, r in enumerate(cand))))
            theta = min(per_token)
        thetas.append(theta)
        kept_cands = decide[b] if decide is not None and decide.get(b) is not None else \
            [r for r in cand if float(importance[r]) > theta]
        if merge and len(cand) - len(kept_cands) == 1:   # n - 1 kept + 1 merged: no saving, nothing dropped
            kept_cands = cand
        kept = [r for r in rows if r not in cand or r in kept_cands]
        dropped = [r for r in cand if r not in kept_cands]
        ys += [x64[r] for r in kept]
        index += kept
        if merge and dropped:
            ws = torch.tensor([float(importance[r]) for r in dropped], dtype=torch.float64)
            xs = torch.stack([x64[r] for r in dropped])
            ys.append((ws[:, None] * xs).sum(0) / ws.sum() if float(ws.sum()) != 0 else xs.mean(0))
            index.append(-1)
        counts.append(len(kept) + int(merge and bool(dropped)))
    y = torch.stack(ys) if ys else x64.new_zeros((0, x.shape[1]))
    return y, counts, index, importance, torch.tensor(thetas, dtype=dtype)


# ------------------------------------------------------------------ inputs

def make_inputs(lengths, channels=5, heads=3, head_dim=4, tokens=4, seed=0, dtype=torch.float32, protect=0.0,
                constant=False):
    g = torch.Generator().manual_seed(seed)
    rows = sum(lengths)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(rows, channels, generator=g).to(dtype)
    if constant:   # every term equal within each sample: all TIS 0, theta 0
        received = torch.ones(rows, heads, dtype=stats_dtype)
        cls = torch.full((rows, heads), 0.25, dtype=stats_dtype)
        align = torch.ones(rows, tokens, dtype=stats_dtype)
    else:
        received = (torch.rand(rows, heads, generator=g) * 3).to(stats_dtype)
        cls = torch.rand(rows, heads, generator=g).to(stats_dtype)
        align = torch.randn(rows, tokens, generator=g).to(stats_dtype)
    attn_out = torch.randn(rows, heads, head_dim, generator=g).to(dtype)
    protected = (torch.rand(rows, generator=g) < protect) if protect else None
    cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)
    return x, cu, received, cls, attn_out, align, protected


def run(backend, device, x, cu, received, cls, attn_out, align, protected, tau, merge):
    to = (lambda t: None if t is None else t.to(device))
    with mk.use_backend(backend):
        return pruning.score_and_prune(to(x), to(cu), (to(received), to(cls)), to(attn_out), to(align),
                                       temperature=tau, protected=to(protected), merge=merge)


def check_against_oracle(out, lengths, inputs, tau, merge):
    x, cu, received, cls, attn_out, align, protected = inputs
    args = (x, lengths, received, cls, attn_out, align, tau, protected, merge)
    _, _, _, imp64, theta64 = oracle(*args)
    low = torch.float64 if x.dtype == torch.float64 else torch.float32
    _, _, _, imp_low, theta_low = oracle(*args, dtype=low)
    imp, theta = out.importance.cpu().double(), out.threshold.cpu().double()
    budget = 2 * max((imp_low.double() - imp64).abs().max().item() if imp64.numel() else 0,
                     (theta_low.double() - theta64).abs().max().item() if theta64.numel() else 0) + 1e-6
    if imp64.numel():
        assert (imp - imp64).abs().max().item() <= budget, "importance beyond the error budget"
    assert (theta - theta64).abs().max().item() <= budget if theta64.numel() else True, "threshold off"
    # Decisions: exact where nothing is within the budget of the threshold, else the backend's own (consistent).
    kept_rows = set(out.kept_index.cpu().tolist())
    decide, start = {}, 0
    for b, n in enumerate(lengths):
        rows = range(start + 1, start + n)
        start += n
        cands = [r for r in rows if protected is None or not bool(protected[r])]
        if any(abs(float(imp64[r]) - float(theta64[b])) <= 2 * budget for r in cands):
            decide[b] = [r for r in cands if r in kept_rows]
            own = [r for r in cands if float(imp[r]) > float(theta[b])]
            if merge and len(cands) - len(own) == 1:
                own = cands
            assert decide[b] == own, "the backend must follow its own numbers"
    y, counts, index, _, _ = oracle(*args, decide=decide)
    assert out.layout.lengths() == counts
    assert torch.equal(out.layout.cu_seqlens.cpu(), torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()],
                                                                  dtype=torch.int32)) if counts else True
    assert out.kept_index.cpu().tolist() == index
    keep = torch.tensor(index, dtype=torch.long) >= 0
    assert out.x.dtype == x.dtype and out.x.shape == y.shape
    assert torch.equal(out.x.cpu()[keep], y[keep].to(x.dtype)), "kept rows must be exact copies"
    atol, rtol = MERGED_TOL[x.dtype]
    torch.testing.assert_close(out.x.cpu()[~keep].double(), y[~keep], atol=atol, rtol=rtol)
    if protected is not None:
        src = torch.tensor(index, dtype=torch.long)
        assert torch.equal(out.protected.cpu(), torch.where(src >= 0, protected[src.clamp_min(0)], False))


@st.composite
def batches(draw, max_batch=5):
    batch = draw(st.integers(1, max_batch))
    lengths = draw(st.lists(st.sampled_from([0, 1, 2, 3, 6, 11]), min_size=batch, max_size=batch))
    if draw(st.booleans()):
        lengths[draw(st.integers(0, batch - 1))] = draw(st.integers(130, 300))   # past one token tile
    return dict(lengths=lengths, channels=draw(st.sampled_from([1, 5, 70])), heads=draw(st.sampled_from([1, 3])),
                head_dim=draw(st.sampled_from([1, 8, 33])), tokens=draw(st.sampled_from([1, 4, 37])),
                seed=draw(st.integers(0, 2**31 - 1)), protect=draw(st.sampled_from([0.0, 0.2])))


PARAMS = backend_params("score_and_prune")
# fp32 everywhere, and bf16 on a GPU (bf16 runs on CPU in test_matches_oracle).
GPU_BF16_PARAMS = backend_dtype_params("score_and_prune", (torch.float32,), cpu_bf16=False)


@pytest.mark.parametrize("backend,device,dtype",
                         backend_dtype_params("score_and_prune", (torch.float32, torch.float16, torch.float64)))
@given(case=batches(), tau=st.sampled_from([1e-3, 0.3, 1.0, 50.0]), merge=st.booleans())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_matches_oracle(backend, device, dtype, case, tau, merge):
    inputs = make_inputs(dtype=dtype, **case)
    # float64 runs on the torch backend only: the others must refuse it with their declared reason.
    with run_or_refused(backend, device, "score_and_prune", dtype) as supported:
        out = run(backend, device, *inputs, tau, merge)
    if supported:
        check_against_oracle(out, case["lengths"], inputs, tau, merge)


@pytest.mark.parametrize("backend,device,dtype", GPU_BF16_PARAMS)
def test_constant_terms_drop_every_candidate(backend, device, dtype):
    # All terms equal: every TIS is 0 and theta is 0, a tie that "TIS > theta" must break by dropping.
    lengths = [4, 1, 0, 7]
    inputs = make_inputs(lengths, constant=True, dtype=dtype)
    out = run(backend, device, *inputs, 1.0, True)
    assert out.layout.lengths() == [2, 1, 0, 2]          # first row + merged row; a lone first row stays alone
    assert out.kept_index.cpu().tolist() == [0, -1, 4, 5, -1]
    check_against_oracle(out, lengths, inputs, 1.0, True)


@pytest.mark.parametrize("backend,device,dtype", GPU_BF16_PARAMS)
def test_long_sample_many_alignment_tokens(backend, device, dtype):
    # Longer than every token tile and K past every alignment-token tile of the kernels.
    lengths = [1100, 3, 0, 257]
    inputs = make_inputs(lengths, channels=130, heads=2, head_dim=16, tokens=256, seed=7, protect=0.05, dtype=dtype)
    out = run(backend, device, *inputs, 0.5, True)
    check_against_oracle(out, lengths, inputs, 0.5, True)


@pytest.mark.parametrize("backend,device,dtype", GPU_BF16_PARAMS)
def test_sharp_softmax_across_token_tiles(backend, device, dtype):
    # tau = 1e-3 turns alignment gaps of ~0.1 into exponents past fp32's range: a softmax over token tiles
    # that does not carry its running max across tiles overflows.
    lengths = [300, 5, 0, 140]
    inputs = make_inputs(lengths, channels=9, tokens=37, seed=13, protect=0.1, dtype=dtype)
    out = run(backend, device, *inputs, 1e-3, True)
    check_against_oracle(out, lengths, inputs, 1e-3, True)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_layout_in_and_out(backend, device):
    lengths = [5, 9, 2]
    x, cu, received, cls, attn_out, align, protected = make_inputs(lengths)
    layout = mk.RaggedLayout.from_cu_seqlens(cu, x.shape[0])
    assert layout.offsets == (0, 5, 14, 16) and layout.max_len == 9
    with mk.use_backend(backend):
        a = pruning.score_and_prune(x.to(device), layout.to(device), (received.to(device), cls.to(device)),
                                    attn_out.to(device), align.to(device), temperature=0.7)
    b = run(backend, device, x, cu, received, cls, attn_out, align, None, 0.7, True)
    assert a.layout.offsets == b.layout.offsets and torch.equal(a.x, b.x)
    assert a.layout.max_len == max(a.layout.lengths())


def test_gradients_match_autograd_of_the_formulas():
    # The op's backward (replayed decisions, recomputed importance) against autograd through a differentiable
    # transcription of the formulas in float64, on the decisions the op made.
    lengths = [6, 1, 0, 9]
    x, cu, received, cls, attn_out, align, _ = make_inputs(lengths, dtype=torch.float64, tokens=3, seed=3)
    x.requires_grad_(), attn_out.requires_grad_(), align.requires_grad_()
    out = pruning.score_and_prune(x, cu, (received, cls), attn_out, align, temperature=0.4)
    g = torch.randn_like(out.x)
    gx, ga, gal = torch.autograd.grad(out.x, (x, attn_out, align), g)

    def formula(x, attn_out, align):
        ys, start = [], 0
        kept = set(out.kept_index.tolist())
        for n in lengths:
            rows = list(range(start, start + n))
            start += n
            if not n:
                continue
            cand = rows[1:]
            norms = attn_out[rows[0]].norm(dim=-1)
            w = norms / norms.sum()
            terms = torch.stack([torch.stack([received[r].max(), (w * cls[r]).sum(), align[r].max()])
                                 for r in cand]) if cand else None
            ys += [x[r] for r in rows if r not in cand or r in kept]
            dropped = [i for i, r in enumerate(cand) if r not in kept]
            if dropped:
                span = terms.max(0).values - terms.min(0).values
                tis = torch.where(span > 0, (terms - terms.min(0).values) / torch.where(span > 0, span, 1), 0)
                tis = tis.sum(1) / 3
                wd = tis[dropped]
                xs = torch.stack([x[cand[i]] for i in dropped])
                ys.append((wd[:, None] * xs).sum(0) / wd.sum() if float(wd.sum()) != 0 else xs.mean(0))
        return torch.stack(ys)

    fx, fa, fal = torch.autograd.grad(formula(x, attn_out, align), (x, attn_out, align), g)
    torch.testing.assert_close(gx, fx)
    torch.testing.assert_close(ga, fa)
    torch.testing.assert_close(gal, fal)
    assert ga.abs().sum() > 0 and gal.abs().sum() > 0, "the merged row must carry gradient to the scores"


@pytest.mark.parametrize("backend,device", [p for p in PARAMS if p.id.endswith("cpu")])
def test_opcheck(backend, device):
    x, cu, received, cls, attn_out, align, protected = make_inputs([4, 0, 7, 1], protect=0.2)
    x.requires_grad_(), attn_out.requires_grad_(), align.requires_grad_()
    op = getattr(torch.ops.madtp_kernels, f"score_and_prune_{backend}")
    torch.library.opcheck(op, (x, cu, received, cls, attn_out, align, 0.5, protected, True, 7))


# ------------------------------------------------------------------ the Triton launcher's own contract

TRITON = [p for p in PARAMS if p.id.startswith("triton")]


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_many_samples_with_skew(backend, device, dtype):
    # 97 samples (one program each), one ~100x longer than the rest, real head shapes and K = 100 (two
    # alignment-token tiles), C = 130 (not a multiple of the compaction's column block).
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, 12, (97,), generator=g).tolist()
    lengths[40] = 700
    inputs = make_inputs(lengths, channels=130, heads=12, head_dim=64, tokens=100, seed=9, dtype=dtype,
                         protect=0.1)
    out = run(backend, device, *inputs, 0.3, True)
    check_against_oracle(out, lengths, inputs, 0.3, True)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("protect", [0.0, 0.3])
def test_raw_outputs_match_the_torch_backend_and_capacity_is_zeros(backend, device, protect):
    lengths = [6, 0, 9, 1, 70, 4]
    x, cu, received, cls, attn_out, align, protected = make_inputs(lengths, channels=70, protect=protect, seed=4)
    args = (x, cu, received, cls, attn_out, align, 0.5, protected, True, max(lengths))
    got = getattr(torch.ops.madtp_kernels, f"score_and_prune_{backend}")(*(
        a.to(device) if isinstance(a, torch.Tensor) else a for a in args))
    want = torch.ops.madtp_kernels.score_and_prune_torch(*args)
    for g_, w in zip(got, want, strict=True):
        assert g_.shape == w.shape and g_.dtype == w.dtype
    y, cu_new, kept, prot_new, importance, theta = (t.cpu() for t in got)
    n = int(cu_new[-1])
    assert 0 < n < x.shape[0], "the case must leave capacity rows"
    assert torch.equal(cu_new, want[1]) and torch.equal(kept[:n], want[2][:n])
    keep = kept[:n] >= 0
    assert (~keep).any(), "the case must merge"
    assert torch.equal(y[:n][keep], want[0][:n][keep])
    torch.testing.assert_close(y[:n][~keep], want[0][:n][~keep])
    torch.testing.assert_close(importance, want[4])
    torch.testing.assert_close(theta, want[5])
    # Capacity rows are not results but must not depend on the run: zeros.
    assert not y[n:].any() and not kept[n:].any()
    if protected is not None:
        assert torch.equal(prot_new[:n], want[3][:n]) and not prot_new[n:].any()


@pytest.mark.parametrize("backend,device", [p for p in TRITON if p.id.endswith("cpu")])
def test_launches_and_no_host_read(backend, device, monkeypatch):
    # The launcher's cost on a GPU: 3 Triton kernels plus the aten ops it dispatches (counted with the
    # interpreted kernels' own tensor traffic excluded), none of which reads a value back to the host.
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    from madtp_kernels.triton import pruning as triton_pruning

    launches = []

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(self.kernel.__name__)
            launch = self.kernel[grid]

            def call(*args, **kwargs):
                with _disable_current_modes():
                    return launch(*args, **kwargs)
            return call

    for name in ("_score_kernel", "_compact_kernel", "_finish_kernel"):
        monkeypatch.setattr(triton_pruning, name, Counted(getattr(triton_pruning, name)))

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x, cu, received, cls, attn_out, align, protected = make_inputs([5, 0, 9, 1], protect=0.3)
    with Ops() as mode:
        triton_pruning.score_and_prune(x, cu, received, cls, attn_out, align, 0.5, protected, True, 9)
    no_kernel = {"empty", "empty_like", "view", "slice", "detach", "alias"}
    device_ops = [op for op in mode.ops if op not in no_kernel]
    assert launches == ["_score_kernel", "_compact_kernel", "_finish_kernel"]
    assert sorted(device_ops) == ["cumsum", "zeros"], mode.ops
    assert len(launches) + len(device_ops) <= 12


# ------------------------------------------------------------------ bad input

def _args(**over):
    x, cu, received, cls, attn_out, align, protected = make_inputs([3, 2], protect=0.3)
    args = dict(x=x, layout=cu, stats=(received, cls), attn_out=attn_out, align_scores=align, temperature=1.0,
                protected=protected, merge=True)
    args.update(over)
    return args


@pytest.mark.parametrize("over,error,match", [
    (dict(x=torch.randn(4, 5)), ValueError, "layout"),
    (dict(layout=torch.tensor([0, 3, 2], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(stats=(torch.rand(5, 3, dtype=torch.float64), torch.rand(5, 3))), TypeError, "stats.received"),
    (dict(stats=(torch.rand(5, 3), torch.rand(5, 2))), ValueError, "stats.cls"),
    (dict(stats=torch.rand(5, 3)), TypeError, "stats"),
    (dict(attn_out=torch.randn(5, 2, 4)), ValueError, "attn_out"),
    (dict(align_scores=torch.randn(5, 0)), ValueError, "K >= 1"),
    (dict(align_scores=torch.randn(4, 3)), ValueError, "align_scores"),
    (dict(align_scores=torch.randn(5, 3).half()), TypeError, "align_scores"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=True), TypeError, "temperature"),
    (dict(protected=torch.zeros(5)), TypeError, "protected"),
    (dict(protected=torch.zeros(4, dtype=torch.bool)), ValueError, "protected"),
    (dict(merge=1), TypeError, "merge"),
    (dict(x=torch.randn(5, 5, dtype=torch.float64)), TypeError, "stats.received"),
])
def test_bad_input_is_named(over, error, match):
    with pytest.raises(error, match=match):
        pruning.score_and_prune(**_args(**over))


def test_layout_of_the_wrong_rows_is_refused():
    layout = mk.RaggedLayout.from_cu_seqlens(torch.tensor([0, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="layout: the layout has 4 rows, expected 5"):
        pruning.score_and_prune(**_args(layout=layout))


def test_temperature_is_used():
    inputs = make_inputs([40, 30], seed=11)
    lo = run("torch", "cpu", *inputs, 1e-3, True)
    hi = run("torch", "cpu", *inputs, 1e3, True)
    # tau -> 0: theta -> min over k of the TIS of each token's argmax row; tau -> inf: the mean TIS
    assert not torch.equal(lo.threshold, hi.threshold)
    assert math.isclose(float(hi.threshold[0]), float(hi.importance[1:40].mean()), rel_tol=1e-3)
