"""Bad input to the 2:4 sparse ops is refused with the argument named."""
import zlib

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


# ------------------------------------------------------------------ issue 18
BACKENDS = ["torch", "triton"]


def _random_2to4(n, k, generator):
    """A float64 weight [n, k] with exactly two random non-zeros per group of 4 input features."""
    w = torch.randn(n, k, generator=generator, dtype=torch.float64)
    keep = torch.rand(n, k // 4, 4, generator=generator).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    return w * mask.reshape(n, k)


def _dense_from(values, meta):
    """The format's definition, loop by loop: group g of row n holds values[n, 2g] at position meta nibble
    bits 0-1 and values[n, 2g + 1] at bits 2-3 (nibble g % 2 of byte g // 2)."""
    n, half = values.shape
    w = torch.zeros(n, 2 * half, dtype=torch.float64)
    for r in range(n):
        for g in range(half // 2):
            nibble = (int(meta[r, g // 2]) >> (4 * (g % 2))) & 0xF
            w[r, 4 * g + (nibble & 3)] = float(values[r, 2 * g])
            w[r, 4 * g + (nibble >> 2)] = float(values[r, 2 * g + 1])
    return w


def _view(t, kind):
    """The same values as `t` (2-D, or 1-D for bias), held by a non-contiguous (or offset) view."""
    if kind == "contiguous":
        return t
    if kind == "slice":       # a column slice of a wider buffer: row stride > row length
        buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype)
        buf[..., 3:3 + t.shape[-1]] = t
        return buf[..., 3:3 + t.shape[-1]]
    if kind == "stride2":
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        buf[..., 1::2] = t
        return buf[..., 1::2]
    if kind == "transpose":   # column-major
        return t.t().contiguous().t()
    raise AssertionError(kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("values_view,meta_view,bias_view,x_view", [
    ("slice", "contiguous", "contiguous", "contiguous"),
    ("stride2", "contiguous", None, "contiguous"),
    ("transpose", "contiguous", "contiguous", "contiguous"),
    ("contiguous", "slice", "contiguous", "contiguous"),
    ("contiguous", "transpose", None, "contiguous"),
    ("contiguous", "stride2", "contiguous", "contiguous"),
    ("contiguous", "contiguous", "stride2", "contiguous"),
    ("contiguous", "contiguous", "expand", "contiguous"),
    ("contiguous", "contiguous", "slice", "contiguous"),
    ("contiguous", "contiguous", "contiguous", "transpose"),
    ("contiguous", "contiguous", "contiguous", "stride2"),
    ("transpose", "stride2", "expand", "transpose"),
])
def test_sparse_linear_takes_views_on_every_backend(backend, values_view, meta_view, bias_view, x_view):
    g = torch.Generator().manual_seed(zlib.crc32(f"{values_view}{meta_view}{bias_view}{x_view}".encode()))
    n, k, m = 24, 64, 5
    w = _random_2to4(n, k, g)
    dense = mk.compress_2to4(w.float())
    values, meta = _view(dense.values, values_view), _view(dense.meta, meta_view)
    x = _view(torch.randn(m, k, generator=g), x_view)
    if bias_view == "expand":
        bias = torch.randn(1, generator=g).expand(n)
    elif bias_view is not None:
        bias = _view(torch.randn(n, generator=g), bias_view)
    else:
        bias = None
    assert torch.equal(values, dense.values) and torch.equal(meta, dense.meta)
    with mk.use_backend(backend):
        y = mk.sparse_linear(x, mk.SparseWeight(values, meta), bias)
    want = x.double() @ _dense_from(values, meta).T + (0 if bias is None else bias.double())
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-5)


def _linear_pair(seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        linear = torch.nn.Linear(16, 8)
        with torch.no_grad():
            linear.weight.copy_(_random_2to4(8, 16, g).float())
            linear.bias.copy_(torch.randn(8, generator=g))
        out.append(mk.SparseLinear.from_dense(linear))
    return out


@pytest.mark.parametrize("swap", ["meta", "values"])
def test_swapping_a_buffer_for_one_of_the_same_version_rebuilds_the_cached_weight(swap):
    a, b = _linear_pair(3)
    x = torch.randn(4, 16)
    with mk.use_backend("torch"):
        a(x)   # builds and caches a's dense weight
        assert getattr(a, swap)._version == getattr(b, swap)._version   # the case a version key cannot see
        setattr(a, swap, getattr(b, swap))
        y = a(x)
    want = x.double() @ _dense_from(a.values, a.meta).T + a.bias.double()
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)


def _byte_is_valid(byte):
    return all((nibble & 3) < (nibble >> 2) for nibble in (byte & 0xF, byte >> 4))


def test_metadata_codes_accepted_are_exactly_the_increasing_position_pairs():
    values = torch.randn(256, 4)
    accepted = []
    for byte in range(256):
        try:
            mk.SparseWeight(values[byte:byte + 1], torch.tensor([[byte]], dtype=torch.uint8))
            accepted.append(byte)
        except ValueError as e:
            assert f"got byte 0x{byte:02X} at meta[0, 0]" in str(e)
    assert accepted == [b for b in range(256) if _byte_is_valid(b)]
    assert len(accepted) == 36   # 6 valid nibbles, two per byte


@pytest.mark.parametrize("code,group", [(0x00, 4), (0xFF, 4), (0x77, 4), (0x41, 4), (0x1E, 5)])
def test_invalid_metadata_is_named(code, group):
    meta = torch.full((4, 3), 0x84, dtype=torch.uint8)
    meta[1, 2] = code
    with pytest.raises(ValueError, match=rf"meta: expected 2:4 metadata.*got byte 0x{code:02X} at meta\[1, 2\] "
                                         rf"\(group {group} of row 1\)"):
        mk.SparseWeight(torch.randn(4, 12), meta)


def test_a_state_dict_with_invalid_metadata_is_refused_and_leaves_the_module_as_it_was():
    a, _ = _linear_pair(5)
    model = torch.nn.Sequential(a)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = model.state_dict()
    state["0.meta"] = state["0.meta"].clone()
    state["0.meta"][2, 1] = 0x77
    with pytest.raises(ValueError, match=r"0\.meta: expected 2:4 metadata.*0x77 at 0\.meta\[2, 1\]"):
        model.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    state["0.meta"] = before["0.meta"].float()   # copy_ would cast it silently
    with pytest.raises(TypeError, match="0.meta: expected dtype torch.uint8, got torch.float32"):
        model.load_state_dict(state)


def test_metadata_written_in_place_after_a_forward_is_checked_again():
    a, _ = _linear_pair(6)
    x = torch.randn(2, 16)
    a(x)
    a.meta[0, 0] = 0xFF
    with pytest.raises(ValueError, match=r"meta: expected 2:4 metadata.*0xFF at meta\[0, 0\]"):
        a(x)


def test_a_fresh_module_holds_valid_metadata_and_computes_its_bias():
    fresh = mk.SparseLinear(16, 4)
    fresh.load_state_dict(mk.SparseLinear(16, 4).state_dict())   # the 0x00 the module once held is refused
    with torch.no_grad():
        fresh.bias.copy_(torch.randn(4))
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), fresh.bias.expand(3, 4))


ISSUE_18_WEIGHT_CASES = [
    (lambda: mk.SparseLinear(16, -1), ValueError, "out_features: expected an int >= 1, got -1"),
    (lambda: mk.SparseLinear(16, 0), ValueError, "out_features: expected an int >= 1, got 0"),
    (lambda: mk.SparseLinear(16, 2.0), TypeError, "out_features: expected an int, got float"),
    (lambda: mk.SparseLinear(16, 4, bias="yes"), TypeError, "bias: expected a bool, got str"),
    (lambda: mk.SparseLinear(16, 4, dtype=torch.int32), TypeError, "dtype: expected a floating-point"),
    (lambda: mk.SparseWeight(torch.randn(0, 8), torch.zeros(0, 2, dtype=torch.uint8)), ValueError,
     r"values: expected \[out_features >= 1, in_features / 2 >= 4\], got shape \(0, 8\)"),
    (lambda: mk.SparseWeight(torch.randn(4, 0), torch.zeros(4, 0, dtype=torch.uint8)), ValueError,
     r"values: expected \[out_features >= 1"),
    (lambda: mk.compress_2to4(torch.randn(0, 16)), ValueError, r"weight: expected out_features and in_features "
                                                                r">= 1 \(dim 0\), got shape \(0, 16\)"),
    (lambda: mk.compress_2to4(torch.randn(4, 0)), ValueError, r"weight: expected out_features and in_features"),
    (lambda: mk.compress_2to4(torch.randn(4, 16, device="meta")), ValueError,
     "weight: expected a tensor with data .* meta device"),
    (lambda: mk.SparseLinear.from_dense(torch.nn.Linear(16, 0)), ValueError, "linear.weight: expected out_features"),
    (lambda: mk.sparse_linear(torch.randn(2, 16, device="meta"),
                              mk.SparseWeight(torch.randn(4, 8, device="meta"),
                                              torch.zeros(4, 2, dtype=torch.uint8, device="meta"))),
     ValueError, "x: expected a tensor with data .* meta device"),
]


@pytest.mark.parametrize("call,exc,msg", ISSUE_18_WEIGHT_CASES)
def test_issue_18_weight_arguments_are_named(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()
