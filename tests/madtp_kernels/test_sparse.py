"""2:4 sparse linear: pruning, the compressed format, every backend against float64, gradients, opcheck,
SparseLinear and its safetensors checkpoint."""
from __future__ import annotations

import pytest
import torch
from backend_params import backend_params
from hypothesis import given, settings
from hypothesis import strategies as st

import madtp_kernels as mk
from madtp_kernels import _dispatch
from madtp_kernels.reference import sparse as ref

ROUNDING = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def random_2to4(out_features, in_features, dtype=torch.float32, seed=0, sparser=True):
    """A random 2:4 weight; with `sparser`, some groups keep fewer than 2 non-zeros (and some are all zero)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    w = w * ref.prune_2to4(w)
    if sparser:
        w = torch.where(torch.rand(w.shape, generator=g) < 0.2, 0.0, w)
    return w.to(dtype)


def test_prune_2to4_keeps_the_two_largest_magnitudes_per_group():
    w = torch.randn(7, 32, dtype=torch.float64)
    mask = mk.prune_2to4(w)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    groups, kept = w.abs().reshape(7, 8, 4), mask.reshape(7, 8, 4)
    assert (kept.sum(-1) == 2).all()
    smallest_kept = torch.where(kept, groups, float("inf")).amin(-1)
    largest_dropped = torch.where(kept, -1.0, groups).amax(-1)
    assert (smallest_kept >= largest_dropped).all()
    assert mk.prune_2to4(torch.zeros(1, 8)).reshape(2, 4).tolist() == [[True, True, False, False]] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compress_roundtrip_and_format(dtype):
    w = random_2to4(12, 40, dtype)
    sparse = mk.compress_2to4(w)
    assert sparse.values.shape == (12, 20) and sparse.meta.shape == (12, 5) and sparse.meta.dtype == torch.uint8
    assert torch.equal(sparse.to_dense(), w)
    # The documented layout, decoded by hand for one byte: groups 0 and 1 of row 0.
    byte = int(sparse.meta[0, 0])
    for group, nibble in ((0, byte & 0xF), (1, byte >> 4)):
        first, second = nibble & 3, nibble >> 2
        assert first < second
        assert sparse.values[0, 2 * group] == w[0, 4 * group + first]
        assert sparse.values[0, 2 * group + 1] == w[0, 4 * group + second]
        assert torch.count_nonzero(w[0, 4 * group:4 * group + 4]) <= 2


def test_compressed_fp16_is_at_most_057_of_dense_bytes():
    w = random_2to4(3072, 768, torch.float16)
    assert mk.compress_2to4(w).nbytes <= 0.57 * w.nbytes


def check_linear(backend, device, dtype, rows_shape, out_features, in_features, with_bias, seed):
    w = random_2to4(out_features, in_features, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*rows_shape, in_features, generator=g).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype) if with_bias else None
    weight = mk.compress_2to4(w).to(device)
    with mk.use_backend(backend):
        y = mk.sparse_linear(x.to(device), weight, None if bias is None else bias.to(device))
    assert y.shape == (*rows_shape, out_features) and y.dtype == dtype
    exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
    plain = torch.nn.functional.linear(x, w, bias).double()
    err = (y.cpu().double() - exact).abs().max().item() if y.numel() else 0.0
    budget = 2 * ((plain - exact).abs().max().item() if y.numel() else 0.0) + ROUNDING[dtype] * (
        1 + exact.abs().max().item() if y.numel() else 1)
    assert err <= budget, f"error {err:.3g} > budget {budget:.3g}"


@pytest.mark.parametrize("backend,device", backend_params("sparse_linear"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@settings(max_examples=12, deadline=None)
@given(rows_shape=st.sampled_from([(0,), (1,), (5,), (33,), (2, 3, 4)]),
       features=st.sampled_from([(8, 8), (24, 40), (64, 128), (96, 200), (7, 16)]), with_bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_matches_float64(backend, device, dtype, rows_shape, features, with_bias, seed):
    check_linear(backend, device, dtype, rows_shape, *features, with_bias, seed)


def test_gradcheck_torch():
    w = random_2to4(6, 16, torch.float64)
    sparse = mk.compress_2to4(w)
    values = sparse.values.clone().requires_grad_()
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    with mk.use_backend("torch"):
        torch.autograd.gradcheck(lambda x, v, b: mk.sparse_linear(x, mk.SparseWeight(v, sparse.meta), b),
                                 (x, values, bias))


@pytest.mark.parametrize("backend,device", backend_params("sparse_linear"))
def test_gradients_match_dense(backend, device):
    w = random_2to4(24, 40)
    linear = torch.nn.Linear(40, 24).to(device)
    with torch.no_grad():
        linear.weight.copy_(w)
    sparse = mk.SparseLinear.from_dense(linear)
    x = torch.randn(3, 5, 40, device=device, requires_grad=True)
    with mk.use_backend(backend):
        sparse(x).square().sum().backward()
    grad_sparse, x.grad = x.grad, None
    linear(x).square().sum().backward()
    torch.testing.assert_close(grad_sparse, x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sparse.bias.grad, linear.bias.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend,device", backend_params("sparse_linear"))
def test_opcheck(backend, device):
    sparse = mk.compress_2to4(random_2to4(24, 40)).to(device)
    op = _dispatch.implementations("sparse_linear")[backend]
    x = torch.randn(5, 40, device=device)
    bias = torch.randn(24, device=device)
    torch.library.opcheck(op, (x, sparse.values, sparse.meta, bias))
    torch.library.opcheck(op, (x.requires_grad_(), sparse.values, sparse.meta, None))


def test_sparse_linear_module_roundtrips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    module = mk.SparseLinear.from_dense(torch.nn.Linear(64, 32).half())
    path = tmp_path / "sparse.safetensors"
    save_file(module.state_dict(), str(path))
    state = load_file(str(path))
    assert set(state) == {"values", "meta", "bias"} and state["meta"].dtype == torch.uint8
    loaded = mk.SparseLinear(64, 32, dtype=torch.float16)
    loaded.load_state_dict(state)
    x = torch.randn(7, 64, dtype=torch.float16)
    assert torch.equal(loaded(x), module(x))
    dense = loaded.to_dense()
    assert isinstance(dense, torch.nn.Linear) and torch.equal(dense.weight, module.weight.to_dense())


def test_from_dense_with_a_given_mask_and_without_bias():
    linear = torch.nn.Linear(16, 4, bias=False)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, 0::4] = True
    module = mk.SparseLinear.from_dense(linear, mask)
    assert module.bias is None
    assert torch.equal(module.weight.to_dense(), linear.weight.detach() * mask)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = mk.SparseLinear.from_dense(torch.nn.Linear(32, 64))
        self.fc2 = mk.SparseLinear.from_dense(torch.nn.Linear(64, 32))

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def test_compiled_module_has_no_graph_breaks():
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(2, 9, 32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x))
    compiled(x).sum().backward()
    assert x.grad is not None


def test_torch_backend_derives_the_dense_weight_once_and_follows_in_place_changes():
    import gc

    from madtp_kernels import sparse as sparse_module

    weight = mk.compress_2to4(random_2to4(16, 32))
    x = torch.randn(3, 32)
    before = len(sparse_module._dense_weight)
    with mk.use_backend("torch"):
        for _ in range(3):
            mk.sparse_linear(x, weight)
        assert len(sparse_module._dense_weight) == before + 1
        weight.values.mul_(2)  # an in-place change must not be served from the cache
        torch.testing.assert_close(mk.sparse_linear(x, weight), x @ weight.to_dense().T)
    del weight
    gc.collect()
    assert len(sparse_module._dense_weight) == before


def test_inference_tensor_weights_are_never_served_stale():
    x = torch.randn(3, 32)
    with torch.inference_mode():
        weight = mk.compress_2to4(random_2to4(16, 32))
        mk.sparse_linear(x, weight)
        weight.values.mul_(3)  # inference tensors keep no version counter: no cache may hide this
        torch.testing.assert_close(mk.sparse_linear(x, weight), x @ weight.to_dense().T)
