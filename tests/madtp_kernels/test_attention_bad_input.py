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
