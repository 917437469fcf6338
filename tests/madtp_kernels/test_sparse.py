"""2:4 sparse linear: pruning, the compressed format, every backend against float64, gradients, opcheck,
SparseLinear and its safetensors checkpoint."""
from __future__ import annotations

import pytest
import torch
from backend_params import backend_dtype_params, backend_params, run_or_refused, runs_here, supported_dtypes
from hypothesis import given, settings
from hypothesis import strategies as st

import madtp_kernels as mk
from madtp_kernels import _dispatch
from madtp_kernels.reference import sparse as ref


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


# Accumulation is fp32 on every backend; tensor cores may truncate rather than round each add (Fasi et al.,
# "Numerical behavior of NVIDIA tensor cores", 2021), so a unit roundoff of 2**-23 per add, not 2**-24.
ACCUMULATION_UNIT_ROUNDOFF = 2.0**-23


def error_bound(x, w, bias, dtype):
    """Per-element bound on |y - x W^T - b| for inputs exact in `dtype`, from the formula, not from any kernel:
    products of fp16/bf16/fp32 values are exact or rounded once in fp32, the K + 1 adds (bias included) each round
    at the accumulation's unit roundoff (Higham's gamma_n bound on sum |x_k w_k| + |b|), and y is rounded once to
    `dtype` (its unit roundoff times |y|, or half its subnormal spacing near 0)."""
    n = x.shape[-1] + 1
    u_acc = ACCUMULATION_UNIT_ROUNDOFF
    gamma = n * u_acc / (1 - n * u_acc)
    magnitude = torch.nn.functional.linear(x.double().abs(), w.double().abs(),
                                           None if bias is None else bias.double().abs())
    exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
    finfo = torch.finfo(dtype)
    u_out = finfo.eps / 2
    return exact, u_out * (exact.abs() + gamma * magnitude) + gamma * magnitude + finfo.smallest_normal * u_out


def check_linear(backend, device, dtype, rows_shape, out_features, in_features, with_bias, seed):
    w = random_2to4(out_features, in_features, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*rows_shape, in_features, generator=g).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype) if with_bias else None
    weight = mk.compress_2to4(w).to(device)
    with mk.use_backend(backend):
        y = mk.sparse_linear(x.to(device), weight, None if bias is None else bias.to(device))
    assert y.shape == (*rows_shape, out_features) and y.dtype == dtype
    assert_within_bound(y.cpu(), x, w, bias, dtype)


def assert_within_bound(y, x, w, bias, dtype):
    exact, bound = error_bound(x, w, bias, dtype)
    excess = ((y.double() - exact).abs() - bound).clamp_min(0)
    assert excess.numel() == 0 or excess.max() == 0, (
        f"{int((excess > 0).sum())} of {excess.numel()} elements beyond the rounding bound, worst by "
        f"{excess.max().item():.3g}")


def fp16_accumulating_linear(x, w, bias):
    """What a kernel that keeps its accumulator in fp16 computes: every partial sum rounded to fp16."""
    acc = torch.zeros(*x.shape[:-1], w.shape[0], dtype=torch.float16)
    for k in range(x.shape[-1]):
        acc = (acc.float() + x[..., k, None].float() * w[:, k].float()).half()
    return acc if bias is None else (acc.float() + bias.float()).half()


def test_fp16_tolerance_rejects_fp16_accumulation():
    # The bound must tell an fp32-accumulating kernel (plain PyTorch in fp32, rounded once) from an
    # fp16-accumulating one on the shapes the tests use.
    w = random_2to4(96, 200, torch.float16, seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(33, 200, generator=g).half()
    bias = torch.randn(96, generator=g).half()
    assert_within_bound(torch.nn.functional.linear(x.float(), w.float(), bias.float()).half(), x, w, bias,
                        torch.float16)
    with pytest.raises(AssertionError, match="beyond the rounding bound"):
        assert_within_bound(fp16_accumulating_linear(x, w, bias), x, w, bias, torch.float16)


@pytest.mark.parametrize("backend,device,dtype", backend_dtype_params("sparse_linear"))
@settings(max_examples=12, deadline=None)
# (64, 128), (16, 16) and (48, 96) are the shapes the cuda backend takes (multiples of 16); it must refuse the rest.
@given(rows_shape=st.sampled_from([(0,), (1,), (5,), (33,), (2, 3, 4)]),
       features=st.sampled_from([(8, 8), (24, 40), (64, 128), (96, 200), (7, 16), (16, 16), (48, 96)]),
       with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_float64(backend, device, dtype, rows_shape, features, with_bias, seed):
    with run_or_refused(backend, device, "sparse_linear", dtype, features=features):
        check_linear(backend, device, dtype, rows_shape, *features, with_bias, seed)


TRITON_PARAMS = [p for p in backend_params("sparse_linear") if p.values[0] == "triton"]


# Shapes that take the Triton kernel's other paths: split-K with its reduce kernel (few rows, long K; the last
# split partial, M * N past one reduce block), and the 128 x 128 tile (half, M > 64; M and N past one tile).
SPLIT_AND_TILE = [(torch.float16, 5, 300, 1032, "split"), (torch.float32, 6, 200, 520, "split"),
                  (torch.float16, 16, 72, 2048, "split"),
                  (torch.float16, 130, 136, 200, "128x128"), (torch.float16, 65, 24, 72, "128x128")]
# bf16 on a GPU only (the interpreter's bf16 tl.dot is wrong): the same half-precision paths.
SPLIT_AND_TILE_BF16 = [(torch.bfloat16, *case[1:]) for case in SPLIT_AND_TILE if case[0] == torch.float16]


def _split_and_tile_params():
    return [pytest.param(*p.values, *case, marks=p.marks, id=f"{p.id}-{str(case[0])[6:]}-{case[1]}x{case[3]}-{case[4]}")
            for p in TRITON_PARAMS for case in SPLIT_AND_TILE + SPLIT_AND_TILE_BF16
            if runs_here(*p.values, "sparse_linear", case[0])]


@pytest.mark.parametrize("backend,device,dtype,rows,out_features,in_features,path", _split_and_tile_params())
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_split_k_and_large_tile(backend, device, dtype, rows, out_features, in_features, path, with_bias):
    from madtp_kernels.triton import sparse as triton_sparse

    tile, splits, k_per_split = triton_sparse._plan(rows, out_features, in_features, dtype, torch.device(device))
    if path == "split":
        assert splits > 1 and rows * out_features > triton_sparse._REDUCE_BLOCK, "the case must take split-K"
    else:
        assert splits == 1 and (tile.block_m, tile.block_n) == (128, 128), "the case must take the 128 x 128 tile"
    check_linear(backend, device, dtype, (rows,), out_features, in_features, with_bias, seed=rows)


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
def test_gradients_match_float64_formula(backend, device):
    with run_or_refused(backend, device, "sparse_linear", torch.float32, features=(24, 40)):
        _gradients_match_float64_formula(backend, device)


def _gradients_match_float64_formula(backend, device):
    # Every backend shares one backward; check it against autograd of y = x W^T + b in float64. Every group of
    # this weight keeps exactly 2 non-zeros, so the gradient of `values` is dW at W's non-zeros, row by row.
    w = random_2to4(24, 40, sparser=False)
    assert torch.equal(ref.nonzeros_per_group(w), torch.full((24, 10), 2))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 40, generator=g)
    bias = torch.randn(24, generator=g)
    weights = torch.randn(3, 5, 24, generator=g)
    sparse = mk.compress_2to4(w).to(device)
    values = sparse.values.clone().requires_grad_()
    xi, bi = x.to(device).requires_grad_(), bias.to(device).requires_grad_()
    with mk.use_backend(backend):
        y = mk.sparse_linear(xi, mk.SparseWeight(values, sparse.meta), bi)
        got = torch.autograd.grad((y * weights.to(device)).sum(), (xi, values, bi))
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, bias))
    dx, dw, db = torch.autograd.grad((torch.nn.functional.linear(x64, w64, b64) * weights.double()).sum(),
                                     (x64, w64, b64))
    want = (dx, dw[w != 0].reshape(24, 20), db)
    for name, g_, w_ in zip(("x", "values", "bias"), got, want, strict=True):
        torch.testing.assert_close(g_.cpu().double(), w_, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("backend,device", backend_params("sparse_linear"))
def test_opcheck(backend, device):
    # The raw op has no refusal to assert: a shape and dtype every backend declares (cuda: fp16, multiples of 16).
    dtype = supported_dtypes(backend, device, "sparse_linear", features=(32, 64))[0]
    sparse = mk.compress_2to4(random_2to4(32, 64, dtype)).to(device)
    op = _dispatch.implementations("sparse_linear")[backend]
    x = torch.randn(5, 64, device=device, dtype=dtype)
    bias = torch.randn(32, device=device, dtype=dtype)
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
