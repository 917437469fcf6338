"""varlen_attention(..., headmax_stats=True): the official MADTP received term on every backend, against a
float64 oracle written from the formula (double125/MADTP models/vit.py Reduce_token,
`self_attn[:, :, 1:, 1:].max(1)[0].sum(dim=1)` over the softmax probabilities):

    headmax[j] = sum over the queries i of sequence(j) other than its first of max_h P_h(i -> j)

computed for every key (dropping the CLS key is the pruning op's business)."""
from __future__ import annotations

import pytest
import torch
from attention_oracle import make_inputs
from backend_params import backend_dtype_params, run_or_refused
from hypothesis import given, settings
from hypothesis import strategies as st

import madtp_kernels as mk
from madtp_kernels.reference import attention as ref_attention

# As in test_attention.py: at most 2x plain PyTorch's error in the same dtype, plus this slack for rounding.
ROUNDING = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
PARAMS = backend_dtype_params("varlen_attention", (torch.float32, torch.float16))


def oracle_headmax(q, k, cu_q, cu_k, *, scale, causal, q_index=None, kv_index=None, dtype=torch.float64):
    """The formula, one sequence at a time with its whole softmax [H, Lq, Lk] materialised, in `dtype` (float64:
    the oracle; the inputs' dtype: plain PyTorch's yardstick). A query without keys has probability 0."""
    if q_index is not None:
        q = q[q_index.long()]
    if kv_index is not None:
        k = k[kv_index.long()]
    q, k = q.to(dtype), k.to(dtype)
    result = torch.zeros(k.shape[0], dtype=torch.float64)
    for b in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        s = torch.einsum("ihd,jhd->hij", q[q0:q1], k[k0:k1]) * scale           # [H, Lq, Lk]
        if causal:  # bottom-right aligned
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)  # rows that see no key: 0, not NaN
        result[k0:k1] = p.amax(0)[1:].double().sum(0)                          # drop the first query
    return result


@st.composite
def headmax_cases(draw):
    batch = draw(st.integers(0, 4))
    lq = draw(st.lists(st.sampled_from([0, 1, 2, 5, 17, 33]), min_size=batch, max_size=batch))
    cross = draw(st.booleans())
    lk = draw(st.lists(st.sampled_from([0, 1, 3, 7, 33]), min_size=batch, max_size=batch)) if cross else lq
    heads = draw(st.sampled_from([1, 3, 12]))
    if batch and draw(st.booleans()):  # skew: one sequence past the kernels' tiles (32 or 64 rows)
        b = draw(st.integers(0, batch - 1))
        lq, lk = list(lq), list(lk)
        # 12 heads at 257 tokens take minutes under Triton's interpreter: FIXED holds that size at 2 heads
        lq[b] = draw(st.sampled_from([65, 129] if heads == 12 else [65, 129, 257]))
        lk[b] = lq[b] if not cross else draw(st.sampled_from([40, 129]))
    return dict(lengths_q=lq, lengths_k=lk, heads=heads,
                head_dim=draw(st.sampled_from([32, 40, 64, 80])), causal=draw(st.booleans()),
                index_q=draw(st.booleans()), index_kv=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def check_headmax(backend, device, dtype, case, *, compare_plain=False):
    case = dict(case)
    causal = case.pop("causal")
    inputs = make_inputs(**case, dtype=dtype, device=device)
    scale = 1.3 * case["head_dim"] ** -0.5  # not the default, so that a kernel ignoring scale fails
    with mk.use_backend(backend):
        out, stats = mk.varlen_attention(**inputs, scale=scale, causal=causal, return_stats=True,
                                         headmax_stats=True)
        if compare_plain:  # asking for headmax changes nothing else
            plain_out, plain_stats = mk.varlen_attention(**inputs, scale=scale, causal=causal, return_stats=True)
            assert torch.equal(out, plain_out)
            assert torch.equal(stats.received, plain_stats.received) and torch.equal(stats.cls, plain_stats.cls)
            assert plain_stats.headmax is None
    cpu = {name: (t.cpu() if t is not None else None) for name, t in inputs.items()}
    args = (cpu["q"], cpu["k"], cpu["cu_seqlens_q"], cpu["cu_seqlens_k"])
    kw = dict(scale=scale, causal=causal, q_index=cpu["q_index"], kv_index=cpu["kv_index"])
    want = oracle_headmax(*args, **kw)
    plain = oracle_headmax(*args, **kw, dtype=dtype)
    got = stats.headmax
    assert got.dtype == ref_attention.stats_dtype(dtype) and got.shape == want.shape and got.device == out.device
    err = (got.cpu().double() - want).abs().max().item() if want.numel() else 0.0
    budget = 2 * ((plain - want).abs().max().item() if want.numel() else 0.0) + ROUNDING[dtype]
    assert err <= budget, f"headmax error {err:.3g} > budget {budget:.3g}"
    return inputs, stats


@pytest.mark.parametrize("backend,device,dtype", PARAMS)
@settings(max_examples=8, deadline=None)
@given(case=headmax_cases())
def test_matches_oracle(backend, device, dtype, case):
    with run_or_refused(backend, device, "varlen_attention", dtype, head_dim=case["head_dim"]):
        check_headmax(backend, device, dtype, case)


# Fixed cases that every run covers: past the Triton tiles, 12 heads, causal and gathered, cross attention with
# Lk < Lq (causal: the first queries see nothing) and Lk > Lq, empty and length-1 sequences.
FIXED = [
    dict(lengths_q=[257, 1, 0, 129], lengths_k=[257, 1, 0, 129], heads=2, head_dim=64, causal=False,
         index_q=False, index_kv=False, seed=1),
    dict(lengths_q=[70, 3, 1], lengths_k=[70, 3, 1], heads=12, head_dim=40, causal=True, index_q=True,
         index_kv=True, seed=2),
    dict(lengths_q=[7, 2, 0, 4, 1, 70], lengths_k=[3, 9, 4, 0, 5, 131], heads=1, head_dim=32, causal=True,
         index_q=False, index_kv=True, seed=3),
    dict(lengths_q=[7, 2, 0, 4, 1, 70], lengths_k=[3, 9, 4, 0, 5, 131], heads=3, head_dim=80, causal=False,
         index_q=True, index_kv=False, seed=4),
]


@pytest.mark.parametrize("backend,device,dtype", PARAMS)
@pytest.mark.parametrize("case", FIXED, ids=[f"fixed{i}" for i in range(len(FIXED))])
def test_fixed_cases(backend, device, dtype, case):
    with run_or_refused(backend, device, "varlen_attention", dtype, head_dim=case["head_dim"]):
        check_headmax(backend, device, dtype, case)


@pytest.mark.parametrize("backend,device,dtype", PARAMS)
def test_short_sequences_give_zero(backend, device, dtype):
    # Lengths 1 and 0: no query other than the first exists, so every key gets exactly 0; a cross-attention
    # sequence with one query and five keys likewise. The longer sequence's keys get a positive sum.
    case = dict(lengths_q=[1, 0, 1, 6], lengths_k=[1, 2, 5, 6], heads=3, head_dim=32, causal=False,
                index_q=False, index_kv=False, seed=5)
    with run_or_refused(backend, device, "varlen_attention", dtype, head_dim=32) as supported:
        _, stats = check_headmax(backend, device, dtype, case, compare_plain=True)
    if supported:
        assert torch.equal(stats.headmax[:8].cpu(), torch.zeros(8, dtype=stats.headmax.dtype))
        assert (stats.headmax[8:] > 0).all()


@pytest.mark.parametrize("backend,device,dtype", PARAMS)
def test_max_over_heads_without_the_first_query(backend, device, dtype):
    # Large one-hot logits make every probability ~0 or ~1. Query 0 looks at key 1 in both heads; query 1 at key
    # 0 in both; query 2 at key 0 in head 0 and key 1 in head 1. The max over heads gives [2, 1]; a sum over heads
    # [3, 1], a mean [1.5, 0.5], and counting query 0 [2, 2].
    big = 30.0
    q = torch.zeros(3, 2, 16)
    k = torch.zeros(2, 2, 16)
    k[0, :, 0] = 1.0
    k[1, :, 1] = 1.0
    q[0, :, 1] = big
    q[1, :, 0] = big
    q[2, 0, 0] = big
    q[2, 1, 1] = big
    cu_q = torch.tensor([0, 3], dtype=torch.int32)
    cu_k = torch.tensor([0, 2], dtype=torch.int32)
    with run_or_refused(backend, device, "varlen_attention", dtype, head_dim=16) as supported, \
            mk.use_backend(backend):
        _, stats = mk.varlen_attention(*(t.to(device, dtype) for t in (q, k, k)), cu_q.to(device), cu_k.to(device),
                                       scale=1.0, return_stats=True, headmax_stats=True)
    if supported:
        torch.testing.assert_close(stats.headmax.cpu().double(), torch.tensor([2.0, 1.0], dtype=torch.float64),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("padded", [0, 10**12], ids=["per-sequence", "padded"])
@pytest.mark.parametrize("finite", [True, False])
def test_torch_paths(monkeypatch, padded, finite):
    # The torch backend's two stats paths (per-sequence blocks, one padded batch) and its non-finite path.
    monkeypatch.setattr(ref_attention, "_PADDED_WORK_PER_SEQUENCE", padded)
    monkeypatch.setattr(ref_attention, "_BLOCK_BYTES", 1)  # several query blocks per sequence: the first skip
    case = dict(lengths_q=[9, 1, 0, 70], lengths_k=[9, 1, 0, 70], heads=3, head_dim=32, causal=False,
                index_q=False, index_kv=False, seed=6)
    if finite:
        check_headmax("torch", "cpu", torch.float32, case, compare_plain=True)
        return
    inputs = make_inputs(**{n: v for n, v in case.items() if n != "causal"}, dtype=torch.float32)
    inputs["v"][3] = float("nan")  # a v row never reaches the statistics
    inputs["q"][0] = float("inf")  # the first query of sequence 0 is left out of headmax
    with mk.use_backend("torch"):
        _, stats = mk.varlen_attention(**inputs, scale=0.2, return_stats=True, headmax_stats=True)
    want = oracle_headmax(inputs["q"], inputs["k"], inputs["cu_seqlens_q"], inputs["cu_seqlens_k"], scale=0.2,
                          causal=False)
    torch.testing.assert_close(stats.headmax.double(), want, atol=1e-5, rtol=1e-5)
    inputs["q"][1, 2] = float("nan")  # a NaN in a counted query reaches every key of its sequence
    with mk.use_backend("torch"):
        _, stats = mk.varlen_attention(**inputs, scale=0.2, return_stats=True, headmax_stats=True)
    assert stats.headmax[:9].isnan().all() and not stats.headmax[9:].isnan().any()


def test_float64_torch():
    case = dict(lengths_q=[5, 0, 33], lengths_k=[4, 2, 33], heads=2, head_dim=8, causal=True, index_q=True,
                index_kv=False, seed=8)
    inputs = make_inputs(**{n: v for n, v in case.items() if n != "causal"}, dtype=torch.float64)
    with mk.use_backend("torch"):
        _, stats = mk.varlen_attention(**inputs, scale=0.7, causal=True, return_stats=True, headmax_stats=True)
    want = oracle_headmax(inputs["q"], inputs["k"], inputs["cu_seqlens_q"], inputs["cu_seqlens_k"], scale=0.7,
                          causal=True, q_index=inputs["q_index"])
    assert stats.headmax.dtype == torch.float64
    torch.testing.assert_close(stats.headmax, want, atol=1e-12, rtol=1e-12)


def test_argument_checks():
    inputs = make_inputs([3, 2], [3, 2], 2, 16, torch.float32, seed=9)
    with pytest.raises(ValueError, match="headmax_stats"):
        mk.varlen_attention(**inputs, headmax_stats=True)
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match="headmax_stats"):
            mk.varlen_attention(**inputs, return_stats=True, headmax_stats=bad)
    out, stats = mk.varlen_attention(**inputs, return_stats=True)
    assert stats.headmax is None
    assert isinstance(mk.varlen_attention(**inputs, headmax_stats=False), torch.Tensor)
