"""Hypothesis strategies and the invariant of the attack suite (test_attack.py).

Inputs are fresh each run (derandomize=False): ragged layouts valid and not, indices, dtypes, memory layouts
(slices, stride-2 views, transposes, expands), empty dims, non-finite values, meta-device tensors, odd scalars.
The invariant: every backend that runs here gives the float64 oracle's answer, or every one raises the same
ValueError/TypeError whose message starts with the name of an argument. Anything else fails the example.
"""
from __future__ import annotations

import math
import re

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from madtp_kernels import _dispatch

settings.register_profile(
    "madtp-attack", deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
PROFILE = settings.get_profile("madtp-attack")

NONFINITE = (float("nan"), float("inf"), float("-inf"))
I32 = torch.int32


def here(op: str) -> list[tuple[str, str]]:
    """(backend, device) pairs that run `op` in this process (Triton on CPU only under the interpreter)."""
    pairs = []
    for name in _dispatch.implementations(op):
        backend = _dispatch.BACKENDS[name]
        if not backend.is_available():
            continue
        for device in ("cpu", "cuda"):
            if device in backend.devices and (device == "cpu" or torch.cuda.is_available()):
                pairs.append((name, device))
    return pairs


# ------------------------------------------------------------------ values and memory layouts

@st.composite
def values(draw, shape, dtype, *, nonfinite=False, positive=False):
    """A fresh tensor of `shape`: seeded normals (|.| if positive), with a few NaN/inf entries if nonfinite."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if positive:
        t = t.abs()
    t = t.to(dtype)
    if nonfinite and t.numel():
        for _ in range(draw(st.integers(1, 3))):
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(NONFINITE))
    return t


@st.composite
def restrided(draw, t, *, allow_expand=True):
    """`t`'s values in a random memory layout: contiguous, a slice of a larger buffer, a stride-2 view, a
    transposed copy seen through its transpose, or (where `t` is constant along a dim) an expand."""
    kinds = ["contiguous"]
    if t.dim() >= 1 and t.numel():
        kinds += ["slice", "stride2"]
    if t.dim() >= 2:
        kinds.append("transpose")
    if allow_expand and t.dim() >= 1:
        kinds.append("expand")
    kind = draw(st.sampled_from(kinds))
    if kind == "contiguous":
        return t.contiguous()
    d = draw(st.integers(0, t.dim() - 1))
    if kind == "slice":
        before, after = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        shape = list(t.shape)
        shape[d] += before + after
        buf = torch.full(shape, 7777, dtype=t.dtype) if t.is_floating_point() else torch.zeros(shape, dtype=t.dtype)
        buf.narrow(d, before, t.shape[d]).copy_(t)
        return buf.narrow(d, before, t.shape[d])
    if kind == "stride2":
        shape = list(t.shape)
        shape[d] *= 2
        buf = torch.zeros(shape, dtype=t.dtype)
        idx = [slice(None)] * t.dim()
        idx[d] = slice(0, None, 2)
        view = buf[tuple(idx)]
        view.copy_(t)
        return view
    if kind == "transpose":
        e = draw(st.integers(0, t.dim() - 1).filter(lambda e: e != d))
        return t.transpose(d, e).contiguous().transpose(d, e)
    # expand: every slice along d becomes the first one (the caller's oracle reads the returned tensor)
    return t.narrow(d, 0, 1).expand(t.shape) if t.shape[d] else t


# ------------------------------------------------------------------ ragged layouts

@st.composite
def lengths(draw, max_batch=5, short=(0, 1, 2, 3, 5, 8), long=(17, 40)):
    """Per-sample lengths: empty batches, empty samples, length 1, and sometimes one sample far longer."""
    batch = draw(st.integers(0, max_batch))
    out = draw(st.lists(st.sampled_from(short), min_size=batch, max_size=batch))
    if batch and draw(st.integers(0, 3)) == 0:
        out[draw(st.integers(0, batch - 1))] = draw(st.sampled_from(long))
    return out


def cu_of(lens) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=I32)


def bad_cu(draw, cu: torch.Tensor):
    """A broken cu_seqlens for `cu`: (value, why)."""
    kinds = ["int64", "float", "2-D", "list", "empty", "first", "past_end", "short_end", "meta"]
    if cu.numel() >= 3:
        kinds.append("non_monotonic")
    kind = draw(st.sampled_from(kinds))
    if kind == "int64":
        return cu.long(), kind
    if kind == "float":
        return cu.float(), kind
    if kind == "2-D":
        return cu[None], kind
    if kind == "list":
        return cu.tolist(), kind
    if kind == "empty":
        return cu[:0], kind
    if kind == "meta":
        return cu.to("meta"), kind
    bad = cu.clone()
    if kind == "first":
        bad[0] = draw(st.sampled_from([1, -1]))
    elif kind == "past_end":
        bad[-1] += draw(st.integers(1, 2**20))
    elif kind == "short_end":
        bad[-1] -= 1
    else:
        b = draw(st.integers(1, cu.numel() - 2))
        bad[b] = bad[b + 1] + draw(st.integers(1, 5))
    return bad, kind


def bad_index(draw, index: torch.Tensor, rows: int):
    """A broken row index for a buffer of `rows` rows: (value, why)."""
    kind = draw(st.sampled_from(["high", "negative", "int64", "float", "list", "2-D", "meta"]))
    if kind in ("high", "negative") and index.numel() == 0:
        kind = "2-D"
    if kind == "high":
        bad = index.clone()
        bad[draw(st.integers(0, index.numel() - 1))] = rows + draw(st.integers(0, 2**20))
        return bad, kind
    if kind == "negative":
        bad = index.clone()
        bad[draw(st.integers(0, index.numel() - 1))] = -draw(st.integers(1, 2**20))
        return bad, kind
    return {"int64": lambda: index.long(), "float": lambda: index.float(), "list": lambda: index.tolist(),
            "2-D": lambda: index[None], "meta": lambda: index.to("meta")}[kind](), kind


def bad_tensor(draw, t: torch.Tensor, *, floating=True,
               kinds=("list", "int", "dtype", "unsqueeze", "flatten", "grow", "meta")):
    """A broken dense argument: wrong type, dtype, ndim, one row too many, or on the meta device: (value, why)."""
    kind = draw(st.sampled_from(kinds))
    if kind == "flatten" and t.dim() < 2:
        kind = "unsqueeze"
    if kind == "list":
        return t.tolist(), kind
    if kind == "int":
        return 3, kind
    if kind == "dtype":
        if floating:
            return t.to(draw(st.sampled_from([torch.int32, torch.int64, torch.bool]))), kind
        return t.float(), kind
    if kind == "unsqueeze":
        return t[None], kind
    if kind == "flatten":
        return t.reshape(-1), kind
    if kind == "grow":
        if t.dim() == 0:
            return t[None], kind
        return torch.cat([t, t.new_zeros((1, *t.shape[1:]))]), kind
    return t.to("meta"), kind


BAD_INTS = (-1, -(2**31), 2**31, 2**63, 1.5, True, "3", None)
BAD_FLOATS = (float("nan"), float("inf"), float("-inf"), "0.1", True, None, 0, -1.0, 1e-30, 1e30)


# ------------------------------------------------------------------ the invariant

class Named(Exception):
    """Every backend refused the input with the same named error."""


def outcomes(op: str, call, names: tuple[str, ...]):
    """Run `call(backend, device)` on every backend that runs `op` here. Returns {pair: result} when all
    return, raises Named(message) when all raise the same ValueError/TypeError naming one of `names` (or the
    op, for a backend's own capability refusal), and fails on anything else: another exception type, an
    unnamed error, or backends that disagree on whether the input is valid."""
    results, errors = {}, {}
    alternatives = "|".join(re.escape(n) for n in names)
    pattern = re.compile(rf"^(?:{alternatives})\b")
    for pair in here(op):
        try:
            results[pair] = call(*pair)
        except (ValueError, TypeError) as exc:
            message = str(exc)
            capability = message.startswith(f"{op}: ") and "backend" in message
            if not capability and not pattern.match(message):
                raise AssertionError(f"{pair}: {type(exc).__name__} that names no argument of {op} "
                                     f"(expected one of {names}): {message!r}") from exc
            if capability:
                continue   # this backend does not take these inputs (e.g. float64 on Triton): not an answer
            errors[pair] = (type(exc), message)
        except Exception as exc:   # noqa: BLE001 - any other type is the failure this suite looks for
            raise AssertionError(f"{pair}: {type(exc).__name__} (expected the oracle's answer or a named "
                                 f"ValueError/TypeError): {exc}") from exc
    if errors and results:
        raise AssertionError(f"backends disagree on {op}: {sorted(results)} returned, {errors} raised")
    if errors:
        kinds = {kind for kind, _ in errors.values()}
        if len(kinds) > 1:
            raise AssertionError(f"backends raise different error types for {op}: {errors}")
        raise Named(next(iter(errors.values()))[1])
    return results


def expect_named(op, call, names):
    """The input is invalid: every backend must refuse it with a named ValueError/TypeError."""
    try:
        results = outcomes(op, call, names)
    except Named as named:
        return str(named)
    if results:
        raise AssertionError(f"{op} accepted invalid input on {sorted(results)} (expected a ValueError/TypeError "
                             f"naming one of {names})")
    return None


# ------------------------------------------------------------------ comparisons

def assert_same_nonfinite(got: torch.Tensor, want: torch.Tensor, what: str) -> torch.Tensor:
    """NaN where the oracle has NaN, the same infinity where it has one; returns the mask of finite entries."""
    got, want = got.cpu().double(), want.cpu().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, oracle {tuple(want.shape)}"
    bad = torch.isnan(got) != torch.isnan(want)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: NaN pattern differs from the oracle at {i}: got {got[tuple(i)].item()}, "
                             f"oracle {want[tuple(i)].item()} ({int(bad.sum())} entries)")
    inf = torch.isinf(want) | torch.isinf(got)
    if inf.any() and not torch.equal(got[inf], want[inf]):
        i = (inf & (got != want)).nonzero()[0].tolist()
        raise AssertionError(f"{what}: infinities differ from the oracle at {i}: got {got[tuple(i)].item()}, "
                             f"oracle {want[tuple(i)].item()}")
    return torch.isfinite(want)


def assert_within(got, want, bound, what):
    """|got - want| <= bound entrywise where the oracle is finite (non-finite entries must match exactly)."""
    finite = assert_same_nonfinite(got, want, what)
    err = (got.cpu().double() - want.double()).abs()
    over = finite & ~(err <= bound)
    if over.any():
        i = over.nonzero()[0].tolist()
        b = bound[tuple(i)] if torch.is_tensor(bound) and bound.dim() else bound
        raise AssertionError(f"{what}: error {err[tuple(i)].item():.3g} > bound {float(b):.3g} at {i} "
                             f"(got {got[tuple(i)].item()}, oracle {want[tuple(i)].item()})")


def eps(dtype) -> float:
    return torch.finfo(dtype).eps


def is_finite_everywhere(*ts) -> bool:
    return all(not torch.is_tensor(t) or not t.is_floating_point() or bool(torch.isfinite(t).all()) for t in ts)


def prod(xs) -> int:
    return math.prod(xs)
