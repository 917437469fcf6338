"""One place that turns an op family into `torch.library` ops, one per backend, with one schema.

`madtp_kernels::<op>_torch` and `madtp_kernels::<op>_triton` are defined here from the schema string; the
`_cuda` twin is defined in C++ (csrc/ops.cpp) with the same string (a test compares them). All of them get the
same fake implementation (so torch.compile traces them) and the same autograd formula, written once in torch.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from . import _dispatch

NAMESPACE = "madtp_kernels"


def qualname(op: str, backend: str) -> str:
    return f"{NAMESPACE}::{op}_{backend}"


def define(op: str, schema: str, impls: dict[str, Callable], *, fake: Callable,
           backward: Callable | None = None, setup_context: Callable | None = None) -> None:
    """Register `op` for every backend in `impls` (Python), plus the C++ `cuda` op if the extension is built."""
    handles: dict[str, Callable] = {}
    for backend, fn in impls.items():
        handles[backend] = torch.library.custom_op(qualname(op, backend), _as_given(fn), mutates_args=(),
                                                   schema=schema)
    if _dispatch.BACKENDS["cuda"].is_available() and hasattr(torch.ops.madtp_kernels, f"{op}_cuda"):
        handles["cuda"] = getattr(torch.ops.madtp_kernels, f"{op}_cuda").default
    for backend, handle in handles.items():
        name = qualname(op, backend)
        torch.library.register_fake(name)(fake)
        if backward is not None:
            torch.library.register_autograd(name, _as_given(backward), setup_context=setup_context)
        _dispatch.register(op, backend, handle)


def _as_given(fn: Callable) -> Callable:
    """fn with autocast off: an op computes in the dtypes it is given and accumulates as it says (fp32 statistics,
    fp32 scores); an autocast region around the caller would otherwise recast the products inside it."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return run
