"""Triton kernels, one module per op family.

Importing this package imports no kernel module: the `@triton.jit` decorator reads TRITON_INTERPRET when it
runs, so callers choose interpreted or compiled kernels by setting the flag before importing a module here.

Launched kernels are named `*_kernel`; other `@triton.jit` functions are device functions they inline.
Each kernel module exports `AOT_SPECS`, the specialisations its launchers actually use; the ahead-of-time
compiler (`python -m madtp_kernels.tools.aot`) discovers and compiles them for every target architecture.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AotSpec:
    """One compiled specialisation of a Triton kernel, as a launcher launches it."""

    kernel: Any  # a triton.JITFunction
    signature: Mapping[str, str]  # every non-constexpr argument -> Triton type: "*fp16", "*i32", "i32", "fp32"
    constexprs: Mapping[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    # Arguments that are 16-aligned pointers / multiples of 16 in practice: the JIT specialises on this and
    # vectorises accordingly, so the AOT build must assume it too to report the same registers.
    divisible_by_16: tuple[str, ...] = ()
    label: str = ""  # the specialisation as printed in the report, e.g. "fp16 merge"

    @property
    def name(self) -> str:
        return self.kernel.__name__
