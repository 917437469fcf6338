"""Bad input to the token ops is refused before any backend runs, with the argument named."""
import pytest
import torch

import madtp_kernels as mk

I32 = torch.int32


def _prune_args(**over):
    args = dict(x=torch.randn(6, 4), cu_seqlens=torch.tensor([0, 2, 6], dtype=I32), scores=torch.rand(6),
                threshold=torch.rand(2))
    args.update(over)
    return args


PRUNE_CASES = [
    (dict(x=[[1.0]]), TypeError, "x: expected a torch.Tensor"),
    (dict(x=torch.randn(6)), ValueError, "x: expected a 2-D"),
    (dict(cu_seqlens=torch.tensor([0, 2, 6])), TypeError, "cu_seqlens: expected dtype torch.int32"),
    (dict(cu_seqlens=torch.tensor([[0, 2, 6]], dtype=I32)), ValueError, "cu_seqlens: expected a 1-D"),
    (dict(cu_seqlens=torch.tensor([1, 2, 6], dtype=I32)), ValueError, r"cu_seqlens\[0\] == 0"),
    (dict(cu_seqlens=torch.tensor([0, 4, 3, 6], dtype=I32), threshold=torch.rand(3)), ValueError,
     "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 2, 5], dtype=I32)), ValueError, r"cu_seqlens\[-1\] == 6"),
    (dict(cu_seqlens=torch.tensor([], dtype=I32)), ValueError, "cu_seqlens: expected at least one entry"),
    (dict(scores=torch.rand(5)), ValueError, r"scores: expected shape \(6,\)"),
    (dict(scores=torch.ones(6, dtype=torch.int64)), TypeError, "scores: expected a floating-point"),
    (dict(threshold=torch.rand(3)), ValueError, r"threshold: expected shape \(2,\)"),
    (dict(threshold=torch.rand(2, dtype=torch.float64)), TypeError, "threshold: expected dtype torch.float32"),
    (dict(keep_first=-1), ValueError, "keep_first: expected an int >= 0"),
    (dict(keep_first=1.5), TypeError, "keep_first: expected an int"),
    (dict(merge=1), TypeError, "merge: expected a bool"),
    (dict(scores=torch.rand(6, device="meta")), ValueError, "scores: expected a tensor on cpu"),
]


@pytest.mark.parametrize("over,exc,msg", PRUNE_CASES)
def test_prune_tokens_rejects(over, exc, msg):
    with pytest.raises(exc, match=msg):
        mk.prune_tokens(**_prune_args(**over))


PACK_CASES = [
    (dict(x=torch.randn(4)), ValueError, r"x: expected a \[B, N, \.\.\.\] tensor"),
    (dict(), TypeError, "exactly one of lengths"),
    (dict(lengths=torch.tensor([1, 2]), mask=torch.ones(2, 5, dtype=torch.bool)), TypeError, "got both"),
    (dict(lengths=torch.tensor([1.0, 2.0])), TypeError, "lengths: expected dtype torch.int32 or torch.int64"),
    (dict(lengths=torch.tensor([1, 2, 3])), ValueError, r"lengths: expected shape \(2,\)"),
    (dict(lengths=torch.tensor([1, 6])), ValueError, r"lengths: expected values in \[0, 5\]"),
    (dict(lengths=torch.tensor([-1, 2])), ValueError, r"lengths: expected values in \[0, 5\]"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"mask: expected shape \(2, 5\)"),
    (dict(mask=torch.ones(2, 5, dtype=torch.int32)), TypeError, "mask: expected dtype torch.bool"),
    (dict(mask=torch.ones(2, 5, dtype=torch.bool, device="meta")), ValueError, "mask: expected a tensor on cpu"),
    (dict(lengths=[1, 2]), TypeError, "lengths: expected a torch.Tensor"),
    (dict(x=torch.ones(2, 5, 3, dtype=torch.int64), lengths=torch.tensor([1, 2])), TypeError,
     "pack: no backend takes torch.int64"),
]


@pytest.mark.parametrize("over,exc,msg", PACK_CASES)
def test_pack_rejects(over, exc, msg):
    args = dict(x=torch.randn(2, 5, 3))
    args.update(over)
    with pytest.raises(exc, match=msg):
        mk.pack(**args)


UNPACK_CASES = [
    (dict(packed=torch.tensor(3.0)), ValueError, r"packed: expected a \[T, \.\.\.\] tensor"),
    (dict(packed="rows"), TypeError, "packed: expected a torch.Tensor"),
    (dict(cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int64)), TypeError, "cu_seqlens: expected dtype"),
    (dict(cu_seqlens=torch.tensor([0, 7, 6], dtype=I32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([2, 6], dtype=I32)), ValueError, r"cu_seqlens\[0\] == 0"),
    (dict(cu_seqlens=torch.tensor([0, 2, 7], dtype=I32)), ValueError, r"cu_seqlens\[-1\] == 6"),
    (dict(max_len=3), ValueError, r"max_len: expected >= the longest sample \(4 rows\)"),
    (dict(max_len=-1), ValueError, "max_len: expected an int >= 0"),
    (dict(max_len=4.0), TypeError, "max_len: expected an int"),
    (dict(pad_value="0"), TypeError, "pad_value: expected a float"),
    (dict(cu_seqlens=torch.tensor([0, 2, 6], dtype=I32, device="meta")), ValueError,
     "cu_seqlens: expected a tensor on cpu"),
    (dict(packed=torch.ones(6, 3, dtype=torch.int64)), TypeError, "unpack: no backend takes torch.int64"),
]


@pytest.mark.parametrize("over,exc,msg", UNPACK_CASES)
def test_unpack_rejects(over, exc, msg):
    args = dict(packed=torch.randn(6, 3), cu_seqlens=torch.tensor([0, 2, 6], dtype=I32))
    args.update(over)
    with pytest.raises(exc, match=msg):
        mk.unpack(**args)


def test_forced_backend_that_cannot_take_the_inputs_says_which_can():
    x = torch.randn(4, 3)
    cu = torch.tensor([0, 4], dtype=I32)
    with mk.use_backend("cuda"), pytest.raises(TypeError, match=r"prune_tokens: backend 'cuda'.*can run.*'torch'"):
        mk.prune_tokens(x, cu, torch.rand(4), torch.rand(1))


# ------------------------------------------------------------------ issue 18: on every backend, before any runs
BACKENDS = ["torch", "triton"]
META = dict(device="meta")

ISSUE_18_CASES = [
    (lambda: mk.pack(torch.randn(2, 5, 0), torch.tensor([2, 3])), ValueError,
     r"x: expected feature dims >= 1 \(dim 2\), got shape \(2, 5, 0\)"),
    (lambda: mk.pack(torch.randn(2, 5, 3, 0), mask=torch.ones(2, 5, dtype=torch.bool)), ValueError,
     r"x: expected feature dims >= 1 \(dim 3\)"),
    (lambda: mk.pack(torch.randn(2, 5, 3, **META), torch.tensor([2, 3], **META)), ValueError,
     "x: expected a tensor with data .* meta device"),
    (lambda: mk.unpack(torch.randn(6, 0), torch.tensor([0, 2, 6], dtype=I32)), ValueError,
     r"packed: expected feature dims >= 1 \(dim 1\), got shape \(6, 0\)"),
    (lambda: mk.unpack(torch.randn(6, 3, **META), torch.tensor([0, 2, 6], dtype=I32, **META)), ValueError,
     "packed: expected a tensor with data .* meta device"),
    (lambda: mk.unpack(torch.randn(6, 3), torch.tensor([0, 2, 6], dtype=I32), max_len=2**31), ValueError,
     "max_len: expected an int <= 2147483647, got 2147483648"),
    (lambda: mk.unpack(torch.randn(6, 3), mk.RaggedLayout.from_cu_seqlens(torch.tensor([0, 2, 6], dtype=I32)),
                       max_len=2**62), ValueError, "max_len: expected an int <= 2147483647"),
    (lambda: mk.prune_tokens(**_prune_args(x=torch.randn(6, 0))), ValueError,
     r"x: expected channels >= 1 \(dim 1\), got shape \(6, 0\)"),
    (lambda: mk.prune_tokens(torch.randn(6, 4, **META), torch.tensor([0, 2, 6], dtype=I32, **META),
                             torch.rand(6, **META), torch.rand(2, **META)), ValueError,
     "x: expected a tensor with data .* meta device"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,exc,msg", ISSUE_18_CASES)
def test_issue_18_rejects_on_every_backend(backend, call, exc, msg):
    with mk.use_backend(backend), pytest.raises(exc, match=msg):
        call()
