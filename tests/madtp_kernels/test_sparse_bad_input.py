"""Bad input to the 2:4 sparse ops is refused with the argument named."""
import pytest
import torch

import madtp_kernels as mk

WEIGHT = mk.compress_2to4(torch.randn(6, 16) * mk.prune_2to4(torch.randn(6, 16)))
NOT_2TO4 = torch.ones(4, 16)

LINEAR_CASES = [
    (dict(x=torch.randn(3, 12)), ValueError, r"x: expected \[\.\.\., 16\] \(in_features of weight\)"),
    (dict(x=torch.tensor(1.0)), ValueError, r"x: expected \[\.\.\., 16\]"),
    (dict(x=torch.randn(3, 16, dtype=torch.float64)), TypeError, "x: expected dtype torch.float32"),
    (dict(weight=torch.randn(6, 16)), TypeError, "weight: expected a SparseWeight"),
    (dict(bias=torch.randn(5)), ValueError, r"bias: expected shape \(6,\)"),
    (dict(bias=torch.randn(6, dtype=torch.float16)), TypeError, "bias: expected dtype torch.float32"),
    (dict(bias=torch.randn(6, device="meta")), ValueError, "bias: expected a tensor on cpu"),
    (dict(x=torch.randn(3, 16, device="meta")), ValueError, "x: expected a tensor with data .* meta device"),
    (dict(x="rows"), TypeError, "x: expected a torch.Tensor"),
]


@pytest.mark.parametrize("over,exc,msg", LINEAR_CASES)
def test_sparse_linear_rejects(over, exc, msg):
    args = dict(x=torch.randn(3, 16), weight=WEIGHT, bias=None)
    args.update(over)
    with pytest.raises(exc, match=msg):
        mk.sparse_linear(**args)


WEIGHT_CASES = [
    (lambda: mk.compress_2to4(torch.randn(16)), ValueError, "weight: expected a 2-D"),
    (lambda: mk.compress_2to4(torch.randn(4, 12)), ValueError, "weight: expected in_features .* multiple of 8"),
    (lambda: mk.compress_2to4(NOT_2TO4), ValueError, r"at most 2 non-zeros .* got 4 in row 0, columns 0..3"),
    (lambda: mk.compress_2to4(torch.ones(4, 16, dtype=torch.int32)), TypeError, "weight: expected a floating"),
    (lambda: mk.prune_2to4(torch.randn(4, 10)), ValueError, "multiple of 8"),
    (lambda: mk.SparseWeight(torch.randn(4, 8), torch.zeros(4, 3, dtype=torch.uint8)), ValueError,
     r"meta: expected shape \(4, 2\)"),
    (lambda: mk.SparseWeight(torch.randn(4, 8), torch.zeros(4, 2)), TypeError, "meta: expected dtype torch.uint8"),
    (lambda: mk.SparseLinear(12, 4), ValueError, "in_features: expected a multiple of 8"),
    (lambda: mk.SparseLinear.from_dense(torch.nn.Conv1d(8, 8, 1)), TypeError, "linear: expected an nn.Linear"),
    (lambda: mk.SparseLinear.from_dense(torch.nn.Linear(16, 4), torch.ones(4, 8, dtype=torch.bool)), ValueError,
     r"mask: expected a bool tensor of shape \(4, 16\)"),
]


@pytest.mark.parametrize("call,exc,msg", WEIGHT_CASES)
def test_weight_ops_reject(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()
