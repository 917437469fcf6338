"""cuSPARSELt 2:4 linear (csrc/sparse_gemm.cpp) on a GPU: torch.ops.madtp_kernels.cusparselt_compress /
cusparselt_linear against F.linear with the dense (pruned) weight, the plan cache, and refused input.

Tolerances follow the project rule: the kernel's error against a float64 oracle stays within 2x the error of
F.linear in the same dtype, plus a per-dtype (atol, rtol) of about one output ulp for the bias add and the
different summation order.
"""
import pytest
import torch
import torch.nn.functional as F

import madtp_kernels  # noqa: F401  (loads madtp_kernels._C, which registers the ops)

_HAS_OPS = hasattr(torch.ops.madtp_kernels, "cusparselt_linear")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _HAS_OPS, reason="madtp_kernels._C (cuSPARSELt ops) not built"),
]

DTYPES = [torch.float16, torch.bfloat16]
TOKENS = [1, 7, 64, 4096]
SHAPES = [(768, 3072), (3072, 768), (1024, 4096), (64, 128)]  # (out_features N, in_features K)
# dtype -> (atol, rtol) on top of 2x F.linear's own error: about one ulp of an O(1) output.
TOLERANCES = {torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


def _ops():
    return torch.ops.madtp_kernels


def _prune_2to4(weight: torch.Tensor) -> torch.Tensor:
    """Zero the two smallest |w| of every 4 consecutive input features."""
    n, k = weight.shape
    groups = weight.reshape(n, k // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(n, k)


def _problem(m, n, k, dtype, with_bias, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", dtype=torch.float32, generator=gen).to(dtype)
    # Scaled so that outputs are O(1) whatever K: the tolerances above are then in output ulps.
    w = (torch.randn(n, k, device="cuda", dtype=torch.float32, generator=gen) * (2.0 / k) ** 0.5).to(dtype)
    w = _prune_2to4(w).contiguous()
    bias = torch.randn(n, device="cuda", dtype=torch.float32, generator=gen).to(dtype) if with_bias else None
    return x, w, bias


def _assert_close_to_oracle(y, x, w, bias):
    y64 = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    y_torch = F.linear(x, w, bias)
    atol, rtol = TOLERANCES[x.dtype]
    torch_err = (y_torch.double() - y64).abs().max().item()
    err = (y.double() - y64).abs()
    bound = 2 * torch_err + atol + rtol * y64.abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"max |y - y64| = {err.max().item():.3g} (F.linear in {x.dtype}: {torch_err:.3g}); worst element "
        f"{worst.item()}: err {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g}"
    )


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}xK{s[1]}")
@pytest.mark.parametrize("m", TOKENS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_dense_linear(dtype, m, shape, with_bias):
    n, k = shape
    x, w, bias = _problem(m, n, k, dtype, with_bias)
    compressed = _ops().cusparselt_compress(w)
    assert compressed.dtype == torch.uint8 and compressed.is_cuda and compressed.dim() == 1
    y = _ops().cusparselt_linear(x, compressed, n, k, bias)
    assert y.shape == (m, n) and y.dtype == dtype and y.device == x.device
    assert y.is_contiguous()
    _assert_close_to_oracle(y, x, w, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_compressed_weight_serves_every_token_count(dtype):
    n, k = 768, 3072
    _, w, bias = _problem(1, n, k, dtype, with_bias=True)
    compressed = _ops().cusparselt_compress(w)
    for m in (1, 7, 8, 9, 64, 333, 4096):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        _assert_close_to_oracle(_ops().cusparselt_linear(x, compressed, n, k, bias), x, w, bias)


def test_compressed_weight_is_smaller_than_dense():
    _, w, _ = _problem(1, 1024, 4096, torch.float16, with_bias=False)
    compressed = _ops().cusparselt_compress(w)
    # Half the values plus 2-bit indices per kept value: ~0.56x of the dense bytes, padding aside.
    assert compressed.numel() <= 0.6 * w.numel() * w.element_size()


def test_plan_cache_reused():
    n, k = 64, 128
    x, w, bias = _problem(7, n, k, torch.float16, with_bias=True)
    compressed = _ops().cusparselt_compress(w)
    first = _ops().cusparselt_linear(x, compressed, n, k, bias)
    size = _ops().cusparselt_plan_cache_size()
    assert size >= 1
    # Same shape, dtype and bias: no new plan, and the same result.
    again = _ops().cusparselt_linear(x.clone(), compressed, n, k, bias)
    assert _ops().cusparselt_plan_cache_size() == size
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    # M = 5 pads to the same 8 tokens as M = 7: same plan.
    _ops().cusparselt_linear(x[:5].contiguous(), compressed, n, k, bias)
    assert _ops().cusparselt_plan_cache_size() == size
    # A new token bucket is a new problem, cached in turn.
    x16 = torch.randn(16, k, device="cuda", dtype=torch.float16)
    _ops().cusparselt_linear(x16, compressed, n, k, bias)
    grown = _ops().cusparselt_plan_cache_size()
    assert grown == size + 1
    _ops().cusparselt_linear(x16, compressed, n, k, bias)
    assert _ops().cusparselt_plan_cache_size() == grown


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ragged_token_counts_share_bucketed_plans(dtype):
    # After pruning every batch has a new token count: 100 of them between 200 and 299 fall in 6 buckets
    # (csrc/include/madtp/sparse_math.h token_bucket: 208, 224, 240, 256 then 288, 320), each planned once, and
    # the padded rows change no result.
    n, k = 64, 128
    x, w, bias = _problem(299, n, k, dtype, with_bias=True, seed=3)
    compressed = _ops().cusparselt_compress(w)
    before = _ops().cusparselt_plan_cache_size()
    for m in range(200, 300):
        y = _ops().cusparselt_linear(x[:m], compressed, n, k, bias)
        assert y.shape == (m, n)
        _assert_close_to_oracle(y, x[:m], w, bias)
    assert _ops().cusparselt_plan_cache_size() - before == 6


def test_plans_of_one_shape_keep_their_own_bias():
    # Two layers of one shape, called alternately: each result carries its own bias.
    n, k = 64, 128
    x, w, bias_a = _problem(64, n, k, torch.float16, with_bias=True, seed=1)
    bias_b = torch.randn_like(bias_a)
    compressed = _ops().cusparselt_compress(w)
    for _ in range(2):
        for bias in (bias_a, bias_b, None):
            _assert_close_to_oracle(_ops().cusparselt_linear(x, compressed, n, k, bias), x, w, bias)


def test_misaligned_input_view():
    # A view 2 bytes into its storage: cuSPARSELt needs 16-byte aligned operands, so the op copies it.
    n, k, m = 64, 128, 64
    _, w, bias = _problem(m, n, k, torch.float16, with_bias=True)
    flat = torch.randn(m * k + 1, device="cuda", dtype=torch.float16)
    x = flat[1:].view(m, k)
    assert x.data_ptr() % 16 != 0 and x.is_contiguous()
    compressed = _ops().cusparselt_compress(w)
    _assert_close_to_oracle(_ops().cusparselt_linear(x, compressed, n, k, bias), x, w, bias)


def test_zero_tokens():
    n, k = 64, 128
    _, w, bias = _problem(1, n, k, torch.float16, with_bias=True)
    y = _ops().cusparselt_linear(torch.empty(0, k, device="cuda", dtype=torch.float16),
                                 _ops().cusparselt_compress(w), n, k, bias)
    assert y.shape == (0, n) and y.dtype == torch.float16


def test_cpu_tensors_refused():
    n, k = 64, 128
    x, w, bias = _problem(8, n, k, torch.float16, with_bias=True)
    compressed = _ops().cusparselt_compress(w)
    # All-CPU arguments reach no implementation; mixed devices are refused by the CUDA one.
    with pytest.raises((NotImplementedError, RuntimeError)):
        _ops().cusparselt_compress(w.cpu())
    with pytest.raises((NotImplementedError, RuntimeError)):
        _ops().cusparselt_linear(x.cpu(), compressed.cpu(), n, k, bias.cpu())
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        _ops().cusparselt_linear(x.cpu(), compressed, n, k, bias)
    with pytest.raises(RuntimeError, match="bias must be a CUDA tensor"):
        _ops().cusparselt_linear(x, compressed, n, k, bias.cpu())


def test_bad_input_refused():
    n, k = 64, 128
    x, w, bias = _problem(8, n, k, torch.float16, with_bias=True)
    compressed = _ops().cusparselt_compress(w)
    dense = torch.randn(n, k, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="not 2:4"):
        _ops().cusparselt_compress(dense)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        _ops().cusparselt_compress(w.float())
    with pytest.raises(ValueError, match="multiples of 16"):
        _ops().cusparselt_compress(_prune_2to4(torch.randn(n, 132, device="cuda", dtype=torch.float16)))
    with pytest.raises(ValueError, match="in_features"):
        _ops().cusparselt_linear(x[:, :64].contiguous(), compressed, n, k, bias)
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        _ops().cusparselt_linear(x, compressed, n, k, bias.bfloat16())
    with pytest.raises(ValueError, match="bias must be"):
        _ops().cusparselt_linear(x, compressed, n, k, bias[:32])
    # A buffer compressed for another shape is caught by its size, not read out of bounds.
    other = _ops().cusparselt_compress(_prune_2to4(torch.randn(2 * n, k, device="cuda", dtype=torch.float16)))
    with pytest.raises(ValueError, match="compressed has"):
        _ops().cusparselt_linear(x, other, n, k, bias)
