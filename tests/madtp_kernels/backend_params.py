"""Which backends a test runs, as pytest params, and what each backend declares it takes.

A backend is tested on exactly what it declares (`madtp_kernels._dispatch.BACKENDS`: dtypes, head dims, feature
sizes, ops, GPU archs). A case it declares it refuses is not run as if supported: `run_or_refused` asserts that
the public function raises `UnsupportedInputs` with the declared reason before any kernel runs. cuda params carry
the `cuda` mark (benchmarks/gpu.sh runs `-m cuda`) and skip without a GPU.

    @pytest.mark.parametrize("backend,device", backend_params("varlen_attention"))
    def test_x(backend, device):
        with run_or_refused(backend, device, "varlen_attention", dtype, head_dim=d) as supported:
            ...  # calls mk.varlen_attention under mk.use_backend(backend), then judges it if `supported`

`backend_dtype_params(op)` gives (backend, device, dtype) triples with bf16 always among them.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

import pytest
import torch

from madtp_kernels import _dispatch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Ops whose Triton kernels use tl.dot, which Triton's interpreter gets wrong in bf16: on CPU they are compiled
# for bf16 ahead of time instead (tests/madtp_kernels/test_aot.py), and run in bf16 only on a GPU.
INTERPRETER_BF16_DOT = frozenset({"varlen_attention", "varlen_attention_backward", "sparse_linear"})


def implements(backend: str, op: str) -> bool:
    """Whether `backend` has `op`: registered here, or declared (cuda, when `_C` is not built in this process)."""
    if backend in _dispatch.implementations(op):
        return True
    declared = _dispatch.BACKENDS[backend].ops
    return declared is not None and op in declared


def refusal(backend: str, op: str, *dtypes: torch.dtype, device: str | torch.device = "cpu",
            head_dim: int | None = None, features: tuple[int, ...] = ()) -> str | None:
    """The reason `backend` declares it does not take this case, or None where it declares support. Availability
    (built, importable, a GPU present) is not a refusal: those params skip instead."""
    b = _dispatch.BACKENDS[backend]
    if not implements(backend, op):
        return f"backend {backend!r} does not implement {op}"
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and b.is_available():
        reason = b.device_refusal(device)
        if reason is not None:
            return reason
    return _dispatch._beyond_limits(b, op, dtypes, head_dim, features)


def supports(backend: str, op: str, *dtypes: torch.dtype, **case) -> bool:
    return refusal(backend, op, *dtypes, **case) is None


def supported_dtypes(backend: str, device: str, op: str, candidates: Iterable[torch.dtype] = FLOAT_DTYPES,
                     **case) -> list[torch.dtype]:
    """The candidates `backend` declares for `op` and that run on `device` here (for tests that call an op's
    raw implementation, e.g. opcheck, which has no refusal to assert)."""
    return [d for d in candidates
            if supports(backend, op, d, device=device, **case) and runs_here(backend, device, op, d)]


def runs_here(backend: str, device: str, op: str, dtype: torch.dtype) -> bool:
    """False only for bf16 tl.dot kernels under Triton's interpreter (wrong results there, see above)."""
    return not (backend == "triton" and device == "cpu" and dtype == torch.bfloat16 and op in INTERPRETER_BF16_DOT)


@contextlib.contextmanager
def run_or_refused(backend: str, device: str, op: str, *dtypes: torch.dtype, head_dim: int | None = None,
                   features: tuple[int, ...] = ()) -> Iterator[bool]:
    """Around one call of the public function on `backend`: yields True where the backend declares support (the
    body runs and judges the kernel); where it declares a refusal, yields False and asserts that the body raises
    `UnsupportedInputs` with that reason (a body that runs, or fails otherwise, fails the test)."""
    reason = refusal(backend, op, *dtypes, device=device, head_dim=head_dim, features=features)
    if reason is None:
        yield True
        return
    with pytest.raises(_dispatch.UnsupportedInputs, match=re.escape(reason)):
        yield False


def _marks(name: str, device: str, op: str) -> list:
    marks = [pytest.mark.cuda] if device == "cuda" else []
    if device == "cuda" and not torch.cuda.is_available():
        marks.append(pytest.mark.skip(reason="needs a CUDA GPU"))
    elif name not in _dispatch.implementations(op) or not _dispatch.BACKENDS[name].is_available():
        marks.append(pytest.mark.skip(reason=f"backend {name} not available here"))
    return marks


def _backends(op: str) -> list[str]:
    # Declared implementers too, so that the cuda params exist (and skip) where _C is not built.
    return [name for name in _dispatch.BACKENDS if implements(name, op)]


def backend_params(op: str):
    """(backend, device) pairs for `op`: every backend that implements it (or declares it does) on every device
    it takes."""
    params = []
    for name in _backends(op):
        for device in ("cpu", "cuda"):
            if device in _dispatch.BACKENDS[name].devices:
                params.append(pytest.param(name, device, marks=_marks(name, device, op), id=f"{name}-{device}"))
    return params


def backend_dtype_params(op: str, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES, *, cpu_bf16: bool = True):
    """(backend, device, dtype) triples for `op`, bf16 always included on cuda (and on cpu unless `cpu_bf16` is
    False: for slow interpreter cases whose bf16 adds nothing on CPU). A dtype the backend refuses stays in, so
    that the test asserts the refusal with `run_or_refused`; bf16 tl.dot kernels under the interpreter skip."""
    asked = list(dtypes)
    dtypes = list(dict.fromkeys([*asked, torch.bfloat16]))
    params = []
    for p in backend_params(op):
        name, device = p.values
        for dtype in dtypes:
            if dtype == torch.bfloat16 and device == "cpu" and not cpu_bf16 and dtype not in asked:
                continue
            marks = list(p.marks)
            if not runs_here(name, device, op, dtype):
                marks.append(pytest.mark.skip(reason="bf16 tl.dot is wrong in Triton's interpreter (AOT-compiled "
                                                     "in test_aot.py; runs on a GPU)"))
            params.append(pytest.param(name, device, dtype, marks=marks, id=f"{p.id}-{str(dtype)[6:]}"))
    return params
