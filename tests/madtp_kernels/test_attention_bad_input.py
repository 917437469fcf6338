"""Bad input to varlen_attention is refused before any backend runs, with the argument named."""
import pytest
import torch

import madtp_kernels as mk

I32 = torch.int32


def _args(**over):
    args = dict(q=torch.randn(6, 2, 8), k=torch.randn(5, 2, 8), v=torch.randn(5, 2, 8),
                cu_seqlens_q=torch.tensor([0, 2, 6], dtype=I32), cu_seqlens_k=torch.tensor([0, 1, 5], dtype=I32))
    args.update(over)
    return args


CASES = [
    (dict(q=torch.randn(6, 16)), ValueError, r"q: expected a 3-D \[T, H, D\]"),
    (dict(k=torch.randn(5, 2, 8, 1)), ValueError, r"k: expected a 3-D"),
    (dict(v=[1.0]), TypeError, "v: expected a torch.Tensor"),
    (dict(k=torch.randn(5, 3, 8)), ValueError, r"k: expected \[\*, 2, 8\]"),
    (dict(v=torch.randn(5, 2, 4)), ValueError, r"v: expected \[\*, 2, 8\]"),
    (dict(v=torch.randn(4, 2, 8)), ValueError, "v: expected 5 rows"),
    (dict(k=torch.randn(5, 2, 8, dtype=torch.float64)), TypeError, "k: expected dtype torch.float32"),
    (dict(q=torch.ones(6, 2, 8, dtype=torch.int64)), TypeError, "q: expected a floating-point"),
    (dict(cu_seqlens_q=torch.tensor([0, 2, 6])), TypeError, "cu_seqlens_q: expected dtype torch.int32"),
    (dict(cu_seqlens_q=torch.tensor([1, 2, 6], dtype=I32)), ValueError, r"cu_seqlens_q\[0\] == 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 2, 5], dtype=I32)), ValueError, "cu_seqlens_k: expected non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([0, 2, 5], dtype=I32)), ValueError, r"cu_seqlens_q\[-1\] == 6"),
    (dict(cu_seqlens_k=torch.tensor([0, 5], dtype=I32)), ValueError, "cu_seqlens_k: expected 2 sequences"),
    (dict(cu_seqlens_k=None), ValueError, "cu_seqlens_k: required when k has 5 logical rows and q has 6"),
    (dict(q_index=torch.tensor([0, 1, 2, 3, 4, 6], dtype=I32)), ValueError, r"q_index: expected rows in \[0, 6\)"),
    (dict(kv_index=torch.tensor([0, 1, 2, 3, -1], dtype=I32)), ValueError, r"kv_index: expected rows in \[0, 5\)"),
    (dict(kv_index=torch.tensor([0, 1, 2, 3, 4])), TypeError, "kv_index: expected dtype torch.int32"),
    (dict(kv_index=torch.tensor([[0, 1, 2, 3, 4]], dtype=I32)), ValueError, r"kv_index: expected a 1-D \[T\]"),
    (dict(kv_index=torch.tensor([0, 1, 2], dtype=I32)), ValueError, r"cu_seqlens_k: expected cu_seqlens_k\[-1\] == 3"),
    (dict(max_seqlen_q=3), ValueError, r"max_seqlen_q: expected >= the longest sequence \(4\)"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k: expected an int >= 0"),
    (dict(scale="0.1"), TypeError, "scale: expected a float"),
    (dict(causal=1), TypeError, "causal: expected a bool"),
    (dict(k=torch.randn(5, 2, 8, device="meta")), ValueError, "k: expected a tensor on cpu"),
    (dict(cu_seqlens_k=torch.tensor([0, 1, 5], dtype=I32, device="meta")), ValueError,
     "cu_seqlens_k: expected a tensor on cpu"),
]


@pytest.mark.parametrize("over,exc,msg", CASES)
def test_rejects(over, exc, msg):
    with pytest.raises(exc, match=msg):
        mk.varlen_attention(**_args(**over))


def test_unsupported_head_dim_on_a_forced_backend_names_the_backends_that_can():
    q = torch.randn(4, 1, 160)
    cu = torch.tensor([0, 4], dtype=I32)
    with mk.use_backend("triton"), pytest.raises(TypeError, match=r"head dims up to 128, got 160.*'torch'"):
        mk.varlen_attention(q, q, q, cu)
    assert mk.varlen_attention(q, q, q, cu).shape == q.shape  # automatic choice: the torch backend takes it


# Issue 18: what an op refuses, it refuses on every backend, before any of them runs.
BACKENDS = ["torch", "triton"]
NAN, INF = float("nan"), float("inf")

ISSUE_18_CASES = [
    (dict(q=torch.randn(6, 2, 0), k=torch.randn(5, 2, 0), v=torch.randn(5, 2, 0)), ValueError,
     r"q: expected head dim >= 1 \(dim 2\), got shape \(6, 2, 0\)"),
    (dict(q=torch.randn(6, 0, 8), k=torch.randn(5, 0, 8), v=torch.randn(5, 0, 8)), ValueError,
     r"q: expected heads >= 1 \(dim 1\), got shape \(6, 0, 8\)"),
    (dict(scale=NAN), ValueError, "scale: expected a finite float, got nan"),
    (dict(scale=INF), ValueError, "scale: expected a finite float, got inf"),
    (dict(scale=-INF), ValueError, "scale: expected a finite float, got -inf"),
    (dict(q_index=[0, 1, 2, 3, 4, 5]), TypeError, "q_index: expected a torch.Tensor, got list"),
    (dict(kv_index=(0, 1, 2, 3, 4)), TypeError, "kv_index: expected a torch.Tensor, got tuple"),
    (dict(q=torch.randn(6, 2, 8, device="meta"), k=torch.randn(5, 2, 8, device="meta"),
          v=torch.randn(5, 2, 8, device="meta"), cu_seqlens_q=torch.tensor([0, 2, 6], dtype=I32, device="meta"),
          cu_seqlens_k=torch.tensor([0, 1, 5], dtype=I32, device="meta")), ValueError,
     "q: expected a tensor with data .* meta device"),
    (dict(max_seqlen_q=2**31), ValueError, "max_seqlen_q: expected an int <= 2147483647, got 2147483648"),
    (dict(max_seqlen_k=2**40), ValueError, "max_seqlen_k: expected an int <= 2147483647"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("over,exc,msg", ISSUE_18_CASES)
def test_rejects_on_every_backend(backend, over, exc, msg):
    with mk.use_backend(backend), pytest.raises(exc, match=msg):
        mk.varlen_attention(**_args(**over))


def test_zero_heads_is_an_error_not_a_crash():
    # Was SIGFPE in the CPU SDPA kernel: run in a child so that a crash fails this test, not the session.
    import subprocess
    import sys
    code = ("import torch, madtp_kernels as mk\nq = torch.randn(8, 0, 16)\n"
            "try:\n    mk.varlen_attention(q, q, q, torch.tensor([0, 3, 8], dtype=torch.int32))\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "refused: q: expected heads >= 1" in run.stdout, (run.returncode, run.stderr)


def test_a_meta_layout_is_refused_when_made():
    with pytest.raises(ValueError, match="cu_seqlens: expected a tensor with data .* meta device"):
        mk.RaggedLayout.from_cu_seqlens(torch.tensor([0, 2, 6], dtype=I32, device="meta"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [-0.7, 0.0, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_any_finite_scale_is_the_formula(backend, scale, causal):
    # Zero and negative scales are a softmax like any other (uniform, reversed): the float64 oracle's answer.
    from attention_oracle import oracle_attention

    g = torch.Generator().manual_seed(int(1000 * abs(scale)) + 7)
    q, k, v = (torch.randn(9, 2, 16, generator=g) for _ in range(3))
    cu = torch.tensor([0, 4, 9], dtype=I32)
    with mk.use_backend(backend):
        out = mk.varlen_attention(q, k, v, cu, scale=scale, causal=causal)
    want, _, _ = oracle_attention(q, k, v, cu, cu, scale=float(scale), causal=causal)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
