"""Backends declared as data, and the choice of one per call.

Every op has up to three implementations with one semantics, registered as separate `torch.library` ops
(`madtp_kernels::<op>_<backend>`). The public function validates its inputs, then asks `select` which backend
runs them: an explicit `use_backend(...)` or `MADTP_KERNELS_BACKEND` wins (and is checked against the table,
never silently ignored); otherwise CUDA tensors go to `cuda` if built, then `triton`, and CPU tensors to `torch`.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

BACKEND_ENV = "MADTP_KERNELS_BACKEND"
_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


def triton_interpret() -> bool:
    """The Triton interpreter runs kernels on CPU tensors; it is read once, when kernels are decorated."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _cuda_extension_built() -> bool:
    try:
        import madtp_kernels._C  # noqa: F401  (registers the cuda ops)
    except ImportError:
        return False
    return True


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class Limits:
    """What one op of a backend takes, where it is narrower than the backend as a whole."""
    dtypes: frozenset[torch.dtype] | None = None   # None: the backend's dtypes
    head_dims: frozenset[int] | None = None        # attention head dims it compiles (None: any)
    max_head_dim: int | None = None
    # Automatic choice only: below this many rows (tokens) another backend is faster (a forced choice still runs).
    auto_min_rows: int | None = None
    feature_multiple: int | None = None            # GEMMs: out_features and in_features must be multiples of it


@dataclass(frozen=True)
class Backend:
    name: str
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    min_capability: tuple[int, int] | None
    is_available: Callable[[], bool]
    description: str
    limits: Mapping[str, Limits] = field(default_factory=dict)   # op name -> narrower limits

    def supports_device(self, device: torch.device) -> bool:
        if device.type not in self.devices:
            return False
        if device.type == "cuda" and self.min_capability is not None:
            return torch.cuda.get_device_capability(device) >= self.min_capability
        return True


def _triton_devices() -> frozenset[str]:
    return frozenset({"cuda", "cpu"}) if triton_interpret() else frozenset({"cuda"})


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("cuda", frozenset({"cuda"}), _FLOAT_DTYPES, (8, 0), _cuda_extension_built,
                "compiled C++/CUDA kernels (madtp_kernels._C), sm_80 and sm_90a",
                {"varlen_attention": Limits(frozenset({torch.float16, torch.bfloat16}), frozenset({32, 64, 128})),
                 # cuSPARSELt is compute-bound tuned: at few tokens the Triton kernel, which reads ~56% of the
                 # dense weight bytes, wins (pytorch#111339: cuSPARSELt 0.11x of dense at one row).
                 # cuSPARSELt's structured operand needs rows and columns in multiples of 16 (16-bit types).
                 "sparse_linear": Limits(frozenset({torch.float16, torch.bfloat16}), auto_min_rows=128,
                                         feature_multiple=16)}),
        Backend("triton", _triton_devices(), _FLOAT_DTYPES, (8, 0), _triton_importable,
                "Triton kernels; on CPU only under TRITON_INTERPRET=1",
                {op: Limits(max_head_dim=128) for op in ("varlen_attention", "varlen_attention_backward")}),
        Backend("torch", frozenset({"cpu", "cuda"}), _FLOAT_DTYPES | {torch.float64}, None, lambda: True,
                "pure PyTorch (madtp_kernels.reference): the CPU path and the test oracle"),
    )
}
# Automatic choice, per device type, in order of preference.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("torch",)}

# op name -> backend name -> callable (a torch.library op), filled by the op modules at import.
_REGISTRY: dict[str, dict[str, Callable]] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("madtp_kernels_backend", default=None)


def register(op: str, backend: str, fn: Callable) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} for op {op!r}; known: {sorted(BACKENDS)}")
    _REGISTRY.setdefault(op, {})[backend] = fn


def available_backends() -> list[str]:
    """Backends usable in this process (built / importable), in the order of `BACKENDS`."""
    return [name for name, b in BACKENDS.items() if b.is_available()]


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {sorted(BACKENDS)}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every madtp_kernels op in this context on backend `name` (errors if it cannot take the inputs)."""
    token = _forced.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    name = _forced.get()
    if name is None:
        env = os.environ.get(BACKEND_ENV, "").strip()
        name = _check_name(env, BACKEND_ENV) if env and env != "auto" else None
    return name


def _why_not(backend: Backend, op: str, device: torch.device, dtypes: tuple[torch.dtype, ...],
             head_dim: int | None = None, features: tuple[int, ...] = ()) -> str | None:
    if backend.name not in _REGISTRY.get(op, {}):
        return f"backend {backend.name!r} does not implement {op}"
    if not backend.is_available():
        return f"backend {backend.name!r} is not available in this process ({backend.description})"
    if device.type not in backend.devices:
        return (f"backend {backend.name!r} takes tensors on {sorted(backend.devices)}, got tensors on "
                f"{device.type}" + (" (set TRITON_INTERPRET=1 to run Triton on CPU)"
                                    if backend.name == "triton" and device.type == "cpu" else ""))
    if not backend.supports_device(device):
        return f"backend {backend.name!r} needs compute capability >= {backend.min_capability} on {device}"
    return _beyond_limits(backend, op, dtypes, head_dim, features)


def _beyond_limits(backend: Backend, op: str, dtypes: tuple[torch.dtype, ...], head_dim: int | None,
                   features: tuple[int, ...] = ()) -> str | None:
    limits = backend.limits.get(op, Limits())
    allowed = limits.dtypes if limits.dtypes is not None else backend.dtypes
    for dtype in dtypes:
        if dtype not in allowed:
            return f"backend {backend.name!r} runs {op} on dtypes {sorted(map(str, allowed))}, got {dtype}"
    if head_dim is not None:
        if limits.head_dims is not None and head_dim not in limits.head_dims:
            return f"backend {backend.name!r} runs {op} on head dims {sorted(limits.head_dims)}, got {head_dim}"
        if limits.max_head_dim is not None and head_dim > limits.max_head_dim:
            return f"backend {backend.name!r} runs {op} on head dims up to {limits.max_head_dim}, got {head_dim}"
    if limits.feature_multiple and any(f % limits.feature_multiple for f in features):
        return (f"backend {backend.name!r} runs {op} on feature sizes that are multiples of "
                f"{limits.feature_multiple}, got {features}")
    return None


def select(op: str, device: torch.device, *dtypes: torch.dtype, head_dim: int | None = None,
           rows: int | None = None, features: tuple[int, ...] = (), strict: bool = True) -> Callable:
    """The implementation of `op` for inputs on `device` whose floating-point tensors have `dtypes` (for
    attention, whose head dim is `head_dim`; for GEMMs, with `rows` tokens and weight `features`).
    strict=False lets a forced backend that cannot run the op fall back to the automatic choice (a backward
    op the forced backend lacks)."""
    forced = forced_backend()
    if forced is not None:
        reason = _why_not(BACKENDS[forced], op, device, dtypes, head_dim, features)
        if reason is None:
            return _REGISTRY[op][forced]
        if strict:
            able = [n for n in BACKENDS if _why_not(BACKENDS[n], op, device, dtypes, head_dim, features) is None]
            raise TypeError(f"{op}: {reason}; backends that can run these inputs: {able}")
    reasons = []
    for name in AUTO_ORDER.get(device.type, ()):
        reason = _why_not(BACKENDS[name], op, device, dtypes, head_dim, features)
        floor = BACKENDS[name].limits.get(op, Limits()).auto_min_rows
        if reason is None and rows is not None and floor is not None and rows < floor:
            reason = f"backend {BACKENDS[name].name!r} is slower than the next below {floor} rows for {op}"
        if reason is None:
            return _REGISTRY[op][name]
        reasons.append(reason)
    given = "/".join(map(str, dtypes))
    raise TypeError(f"{op}: no backend takes {given} tensors on {device}: " + "; ".join(reasons or ["none"]))


def implementations(op: str) -> dict[str, Callable]:
    """Every registered implementation of `op`, available or not (tests and benchmarks iterate these)."""
    return dict(_REGISTRY.get(op, {}))


def ops() -> list[str]:
    """Names of every registered op."""
    return sorted(_REGISTRY)
