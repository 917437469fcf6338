"""varlen_attention on every backend against a float64 oracle: self, cross and causal attention, index gathers,
statistics, gradients, opcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch
from attention_oracle import make_inputs, oracle_attention
from backend_params import backend_dtype_params, backend_params, run_or_refused, supported_dtypes
from hypothesis import given, settings
from hypothesis import strategies as st

import madtp_kernels as mk
from madtp_kernels import _dispatch

# The kernel's error against float64 may be at most 2x plain PyTorch's error in the same dtype, plus this
# absolute slack for the dtype's rounding of the output (CONVENTIONS.md rule 6).
ROUNDING = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Every oracle test passes a scale other than the default 1/sqrt(D), so a kernel that ignores it fails.
SCALE = 1.7


@st.composite
def attention_cases(draw, max_len=24):
    batch = draw(st.integers(0, 4))
    lq = draw(st.lists(st.sampled_from([0, 1, 2, 5, 9, max_len]), min_size=batch, max_size=batch))
    cross = draw(st.booleans())
    lk = draw(st.lists(st.sampled_from([0, 1, 3, 7, max_len]), min_size=batch, max_size=batch)) if cross else lq
    if batch and draw(st.booleans()):  # skew: one sequence far longer than the rest
        b = draw(st.integers(0, batch - 1))
        lq, lk = list(lq), list(lk)
        lq[b] = lk[b] = draw(st.integers(60, 130))
    return dict(lengths_q=lq, lengths_k=lk, heads=draw(st.sampled_from([1, 3])),
                head_dim=draw(st.sampled_from([32, 40, 64, 80, 128])), causal=draw(st.booleans()),
                index_q=draw(st.booleans()), index_kv=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def check_against_oracle(backend, device, dtype, case, return_stats=True):
    case = dict(case)
    causal = case.pop("causal")
    inputs = make_inputs(**case, dtype=dtype, device=device)
    scale = SCALE * case["head_dim"] ** -0.5
    with mk.use_backend(backend):
        result = mk.varlen_attention(**inputs, scale=scale, causal=causal, return_stats=return_stats)
    out, stats = result if return_stats else (result, None)
    cpu = {name: (t.cpu() if t is not None else None) for name, t in inputs.items()}
    args = (cpu["q"], cpu["k"], cpu["v"], cpu["cu_seqlens_q"], cpu["cu_seqlens_k"])
    kw = dict(scale=scale, causal=causal, q_index=cpu["q_index"], kv_index=cpu["kv_index"])
    exact = oracle_attention(*args, **kw)
    plain = oracle_attention(*args, **kw, dtype=dtype)
    assert out.dtype == dtype and out.shape == exact[0].shape
    assert torch.isfinite(out).all()
    for got, want, base in ((out, exact[0], plain[0]),) + (
            ((stats.received, exact[1], plain[1]), (stats.cls, exact[2], plain[2])) if stats else ()):
        err = (got.cpu().double() - want).abs().max().item() if want.numel() else 0.0
        budget = 2 * ((base.double() - want).abs().max().item() if want.numel() else 0.0) + ROUNDING[dtype]
        assert err <= budget, f"error {err:.3g} > budget {budget:.3g}"
    if stats:
        assert stats.received.dtype == torch.float32 and stats.received.shape == exact[1].shape


@pytest.mark.parametrize("backend,device,dtype", backend_dtype_params("varlen_attention"))
@settings(max_examples=12, deadline=None)
@given(case=attention_cases())
def test_matches_oracle(backend, device, dtype, case):
    with run_or_refused(backend, device, "varlen_attention", dtype, head_dim=case["head_dim"]):
        check_against_oracle(backend, device, dtype, case)


@pytest.mark.parametrize("backend,device,dtype", backend_dtype_params("varlen_attention"))
@pytest.mark.parametrize("causal", [False, True])
def test_causal_cross_edges_without_stats(backend, device, dtype, causal):
    # Lk < Lq (causal: the first Lq - Lk queries see nothing), Lk > Lq, empty q and empty k sequences.
    case = dict(lengths_q=[7, 2, 0, 4, 1], lengths_k=[3, 9, 4, 0, 1], heads=2, head_dim=64, causal=causal,
                index_q=False, index_kv=True, seed=7)
    for return_stats in (False, True):
        with run_or_refused(backend, device, "varlen_attention", dtype, head_dim=64):
            check_against_oracle(backend, device, dtype, case, return_stats=return_stats)


@pytest.mark.parametrize("backend,device,dtype", backend_dtype_params("varlen_attention", (torch.float32,)))
def test_repeated_kv_rows_and_empty_batch(backend, device, dtype):
    inputs = make_inputs([4, 3], [5, 2], 2, 32, dtype, seed=3, device=device)
    inputs["kv_index"] = torch.tensor([0, 0, 1, 1, 2, 6, 6], dtype=torch.int32, device=device)
    with run_or_refused(backend, device, "varlen_attention", dtype, head_dim=32) as supported, \
            mk.use_backend(backend):
        out, stats = mk.varlen_attention(**inputs, scale=0.4, return_stats=True)
    if not supported:
        return
    # Half precision: the forward's output budget of check_against_oracle (2x plain PyTorch + rounding).
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2 * ROUNDING[dtype], rtol=ROUNDING[dtype])
    cpu = {n: t.cpu() for n, t in inputs.items() if t is not None}
    want = oracle_attention(cpu["q"], cpu["k"], cpu["v"], cpu["cu_seqlens_q"], cpu["cu_seqlens_k"],
                            scale=0.4, causal=False, kv_index=cpu["kv_index"])
    torch.testing.assert_close(out.cpu().double(), want[0], **tol)
    torch.testing.assert_close(stats.received.cpu().double(), want[1], **tol)
    empty = torch.zeros(1, dtype=torch.int32, device=device)
    with mk.use_backend(backend):
        out = mk.varlen_attention(inputs["q"][:0], inputs["k"][:0], inputs["v"][:0], empty)
    assert out.shape == (0, 2, 32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("indexed", [False, True])
def test_gradcheck_torch(causal, indexed):
    inputs = make_inputs([3, 0, 4], [2, 3, 5], 2, 5, torch.float64, seed=11, index_q=indexed, index_kv=indexed)
    q, k, v = (inputs.pop(n).requires_grad_() for n in ("q", "k", "v"))
    with mk.use_backend("torch"):
        torch.autograd.gradcheck(lambda q, k, v: mk.varlen_attention(q, k, v, **inputs, scale=0.6, causal=causal),
                                 (q, k, v))


# Gradients through the public function: the forward's backend, and the backward the dispatcher picks for it
# (the cuda backend has no attention backward: its fp32 forward refusal is asserted, its half forward is judged by
# test_backward_matches_oracle's backends).
@pytest.mark.parametrize("backend,device", backend_params("varlen_attention"))
def test_gradients_match_oracle(backend, device):
    with run_or_refused(backend, device, "varlen_attention", torch.float32, head_dim=32):
        _gradients_match_oracle(backend, device)


def _gradients_match_oracle(backend, device):
    inputs = make_inputs([6, 1, 9], [4, 5, 9], 2, 32, torch.float32, seed=5, index_kv=True, device=device)
    leaves = {n: inputs.pop(n).requires_grad_() for n in ("q", "k", "v")}
    weights = torch.randn(sum([6, 1, 9]), 2, 32, generator=torch.Generator().manual_seed(0)).to(device)
    with mk.use_backend(backend):  # the backward op is chosen like the forward: here, the same backend
        out, stats = mk.varlen_attention(**leaves, **inputs, scale=0.3, causal=True, return_stats=True)
        grads = torch.autograd.grad((out * weights).sum(), list(leaves.values()))
    assert not stats.received.requires_grad
    ref = {n: t.detach().cpu().double().requires_grad_() for n, t in leaves.items()}
    cpu = {n: t.cpu() for n, t in inputs.items() if t is not None}
    want = oracle_attention(ref["q"], ref["k"], ref["v"], cpu["cu_seqlens_q"], cpu["cu_seqlens_k"],
                            scale=0.3, causal=True, kv_index=cpu["kv_index"])[0]
    want_grads = torch.autograd.grad((want * weights.cpu().double()).sum(), list(ref.values()))
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.cpu().double(), expected, atol=1e-4, rtol=1e-4)


# Cross-attention lengths across the backward's query tiles (16 / 32 rows) and key tiles (16 / 32 / 64), with
# empty sequences, a query without keys and (causal) queries that see nothing.
BWD_Q, BWD_K = [37, 0, 70, 1, 5, 9], [40, 3, 70, 1, 0, 4]
# Every head dim from 16 to 128 the Triton backend pads (24, 40, 80, 96) or not, each under two of the eight
# (dtype, causal, indexed) combinations; together they cover every combination at least twice.
BWD_CASES = [(d, dtype, causal, indexed)
             for i, d in enumerate([16, 24, 40, 64, 80, 96, 128, 32])
             for j, (dtype, causal, indexed) in enumerate(
                 [(dt, c, x) for dt in (torch.float32, torch.float16) for c in (False, True) for x in (False, True)])
             if j in (i % 8, (i + 3) % 8)]


# bf16 on a GPU (the interpreter's bf16 tl.dot is wrong): every head dim, causal and indexed alternating.
BWD_BF16_CASES = [(d, torch.bfloat16, bool(i % 2), bool(i // 2 % 2))
                  for i, d in enumerate([16, 24, 40, 64, 80, 96, 128, 32])]


def _bwd_params():
    params = []
    for p in backend_params("varlen_attention_backward"):
        name, device = p.values
        for d, t, c, x in BWD_CASES + BWD_BF16_CASES:
            if t == torch.bfloat16 and device == "cpu":
                continue  # torch's bf16 backward on CPU is plain PyTorch: the cuda params judge the kernels
            params.append(pytest.param(name, device, d, t, c, x, marks=p.marks,
                                       id=f"{p.id}-D{d}-{str(t)[6:]}-causal{int(c)}-index{int(x)}"))
    return params


@pytest.mark.parametrize("backend,device,head_dim,dtype,causal,indexed", _bwd_params())
def test_backward_matches_oracle(backend, device, head_dim, dtype, causal, indexed):
    # The cuda backend has no attention backward (csrc/ops.cpp): backend_params gives it no param here; a cuda
    # forward's gradients run this backward (dispatcher, strict=False), so judging it judges theirs.
    inputs = make_inputs(BWD_Q, BWD_K, 2, head_dim, dtype, seed=head_dim, index_q=indexed, index_kv=indexed,
                         device=device)
    leaves = {n: inputs.pop(n).requires_grad_() for n in ("q", "k", "v")}
    weights = torch.randn(sum(BWD_Q), 2, head_dim, generator=torch.Generator().manual_seed(2))
    scale = 0.8 * head_dim ** -0.5
    with mk.use_backend(backend):
        out = mk.varlen_attention(**leaves, **inputs, scale=scale, causal=causal)
        grads = torch.autograd.grad((out * weights.to(device, dtype)).sum(), list(leaves.values()))
    cpu = {n: t.cpu() for n, t in inputs.items() if t is not None}
    kw = dict(scale=scale, causal=causal, q_index=cpu.get("q_index"), kv_index=cpu.get("kv_index"))

    def oracle_grads(precision):
        ref = [t.detach().cpu().to(precision).requires_grad_() for t in leaves.values()]
        want = oracle_attention(*ref, cpu["cu_seqlens_q"], cpu["cu_seqlens_k"], **kw, dtype=precision)[0]
        return torch.autograd.grad((want * weights.to(precision)).sum(), ref)

    # As for the forward: at most 2x plain PyTorch's error in the same dtype, plus the dtype's output rounding.
    for name, got, exact, plain in zip("qkv", grads, oracle_grads(torch.float64), oracle_grads(dtype), strict=True):
        assert got.dtype == dtype and got.shape == exact.shape
        err = (got.cpu().double() - exact).abs().max().item()
        budget = 2 * (plain.double() - exact).abs().max().item() + ROUNDING[dtype] * max(1.0, exact.abs().max().item())
        assert err <= budget, f"d{name}: error {err:.3g} > budget {budget:.3g}"


@pytest.mark.parametrize("return_stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_scores_accumulate_in_fp32_torch(dtype, return_stats):
    # The backward recomputes P = exp(s - lse) with fp32 scores, so the forward's lse must come from fp32 scores
    # too: scores rounded to the half dtype put it 6e-4 (fp16) to 4e-3 (bf16) off, the CPU flash kernel's half path
    # 3e-5. With one key per query P is then exactly 1 and dV must equal dO bit for bit, as plain PyTorch gets it.
    op = _dispatch.implementations("varlen_attention")["torch"]
    inputs = make_inputs([1] * 40 + [7, 30], [1] * 40 + [7, 30], 3, 64, dtype, seed=13)
    q, k, v, cu = inputs["q"], inputs["k"], inputs["v"], inputs["cu_seqlens_q"]
    _, _, _, lse, _ = op(q, k, v, cu, cu, 30, 30, 0.125, False, None, None, return_stats, False)
    bounds = cu.tolist()
    for b in range(len(bounds) - 1):
        qb, kb = (t[bounds[b]:bounds[b + 1]].float().transpose(0, 1) for t in (q, k))
        want = torch.logsumexp(torch.matmul(qb, kb.transpose(1, 2)) * 0.125, -1).transpose(0, 1)
        torch.testing.assert_close(lse[bounds[b]:bounds[b + 1]], want, atol=1e-5, rtol=1e-6)
    single = 40  # rows of the one-token sequences
    leaves = [t.requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    with mk.use_backend("torch"):
        result = mk.varlen_attention(*leaves, cu, return_stats=return_stats)
        out = result[0] if return_stats else result
        (dv,) = torch.autograd.grad(out, leaves[2], grad_out)
    assert torch.equal(dv[:single], grad_out[:single])


@pytest.mark.parametrize("backend,device", backend_params("varlen_attention"))
def test_opcheck(backend, device):
    # The raw op has no refusal to assert: opcheck runs in the backend's first declared dtype (cuda: fp16).
    dtype = supported_dtypes(backend, device, "varlen_attention", head_dim=32)[0]
    inputs = make_inputs([3, 0, 5], [2, 4, 5], 2, 32, dtype, seed=1, index_kv=True, device=device)
    op = _dispatch.implementations("varlen_attention")[backend]
    for causal, stats, headmax in ((False, True, False), (True, False, False), (True, True, True)):
        args = (inputs["q"], inputs["k"], inputs["v"], inputs["cu_seqlens_q"], inputs["cu_seqlens_k"], 5, 5,
                0.2, causal, None, inputs["kv_index"], stats, headmax)
        torch.library.opcheck(op, args)
    for headmax in (False, True):  # the headmax output is non-differentiable, like the other statistics
        torch.library.opcheck(op, (inputs["q"].requires_grad_(), inputs["k"].requires_grad_(), inputs["v"],
                                   inputs["cu_seqlens_q"], inputs["cu_seqlens_k"], 5, 5, 0.2, False, None,
                                   inputs["kv_index"], headmax, headmax))
    if backend not in _dispatch.implementations("varlen_attention_backward"):
        return  # declared: no backward of its own (backend_params("varlen_attention_backward") has no such param)
    backward = _dispatch.implementations("varlen_attention_backward")[backend]
    fwd_args = (inputs["q"].detach(), inputs["k"].detach(), inputs["v"], inputs["cu_seqlens_q"],
                inputs["cu_seqlens_k"], 5, 5, 0.2, True, None, inputs["kv_index"])
    out, _, _, lse, _ = op(*fwd_args, False, False)
    torch.library.opcheck(backward, (torch.randn_like(out), *fwd_args[:3], out, lse, *fwd_args[3:]))


class TinyAttention(torch.nn.Module):
    def __init__(self, heads=2, head_dim=16):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = torch.nn.Linear(heads * head_dim, 3 * heads * head_dim)

    def forward(self, x, cu_seqlens, max_seqlen: int):
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, self.head_dim).unbind(1)
        out, stats = mk.varlen_attention(q, k, v, cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                                         return_stats=True)
        return out.flatten(1), stats.received.amax(1)


def test_compiled_module_has_no_graph_breaks():
    torch.manual_seed(0)
    module = TinyAttention()
    x = torch.randn(12, 32, requires_grad=True)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    expected, got = module(x, cu, 7), compiled(x, cu, 7)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e)
    got[0].sum().backward()


# More sequences than a kernel scans per step while it looks up its tile (64), with empty sequences, a long one
# past the first chunk and different query and key lengths: every pass (forward, statistics, dq, dk/dv) finds
# its (sequence, block) tile across chunk boundaries.
MANY_Q = [(7 * i) % 11 if i % 9 else 0 for i in range(150)]
MANY_K = [(5 * i) % 13 if i % 7 else 0 for i in range(150)]
MANY_Q[100] = MANY_K[100] = 75


@pytest.mark.parametrize("backend,device", backend_params("varlen_attention"))
@pytest.mark.parametrize("causal", [False, True])
def test_many_sequences(backend, device, causal):
    case = dict(lengths_q=MANY_Q, lengths_k=MANY_K, heads=1, head_dim=32, causal=causal, index_q=False,
                index_kv=False, seed=17)
    for dtype in supported_dtypes(backend, device, "varlen_attention", (torch.float16, torch.bfloat16), head_dim=32):
        check_against_oracle(backend, device, dtype, case)
    with run_or_refused(backend, device, "varlen_attention", torch.float32, head_dim=32) as supported:
        check_against_oracle(backend, device, torch.float32, case)  # the gradients below are fp32
    if not supported:
        return
    inputs = make_inputs(MANY_Q, MANY_Q, 1, 32, torch.float32, seed=19, device=device)
    leaves = {n: inputs.pop(n).requires_grad_() for n in ("q", "k", "v")}
    weights = torch.randn(sum(MANY_Q), 1, 32, generator=torch.Generator().manual_seed(1)).to(device)
    with mk.use_backend(backend):
        out = mk.varlen_attention(**leaves, **inputs, scale=0.25, causal=causal)
        grads = torch.autograd.grad((out * weights).sum(), list(leaves.values()))
    ref = {n: t.detach().cpu().double().requires_grad_() for n, t in leaves.items()}
    cpu = {n: t.cpu() for n, t in inputs.items() if t is not None}
    want = oracle_attention(ref["q"], ref["k"], ref["v"], cpu["cu_seqlens_q"], cpu["cu_seqlens_k"],
                            scale=0.25, causal=causal)[0]
    want_grads = torch.autograd.grad((want * weights.cpu().double()).sum(), list(ref.values()))
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.cpu().double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("padded", [0, 10**12])
@pytest.mark.parametrize("return_stats", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_backend_padded_and_per_sequence_paths_agree_with_the_oracle(monkeypatch, padded, return_stats, dtype):
    # The torch backend runs many short sequences as one padded batch and others one by one: both against the
    # float64 oracle, on a batch with empty sequences, a sequence without keys and cross-attention lengths.
    from madtp_kernels.reference import attention as ref_attention
    monkeypatch.setattr(ref_attention, "_PADDED_WORK_PER_SEQUENCE", padded)
    ran = []
    original = ref_attention._padded
    monkeypatch.setattr(ref_attention, "_padded", lambda *a, **kw: (ran.append(1), original(*a, **kw))[1])
    g = torch.Generator().manual_seed(3)
    lq, lk = [5, 0, 17, 1, 9, 3], [7, 0, 17, 2, 0, 11]
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lq), 3, 16, generator=g).to(dtype)
    k, v = (torch.randn(sum(lk), 3, 16, generator=g).to(dtype) for _ in range(2))
    with mk.use_backend("torch"):
        got = mk.varlen_attention(q, k, v, cu_q, cu_k, scale=0.3, return_stats=return_stats)
    out, stats = got if return_stats else (got, None)
    # the padded path serves only the explicit path (stats, or half precision): fp32 without stats is flash
    assert bool(ran) == (padded > 0 and (return_stats or dtype != torch.float32))
    want_out, want_received, want_cls = oracle_attention(q, k, v, cu_q, cu_k, scale=0.3, causal=False)
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), want_out, **tol)
    if return_stats:
        torch.testing.assert_close(stats.received.double(), want_received, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.cls.double(), want_cls, atol=1e-5, rtol=1e-5)
