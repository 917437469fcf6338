"""Backends declared as data, and the choice of one per call.

Every op has up to three implementations with one semantics, registered as separate `torch.library` ops
(`madtp_kernels::<op>_<backend>`). The public function validates its inputs, then asks `select` which backend
runs them: an explicit `use_backend(...)` or `MADTP_KERNELS_BACKEND` wins (and is checked against the table,
never silently ignored); otherwise CUDA tensors go to `cuda` if built, then `triton`, and CPU tensors to `torch`.
A backend that cannot take the inputs is refused with `UnsupportedInputs` (a TypeError) naming the reason.
The `cuda` backend is picked only on GPUs its binary holds code for (`cuda_archs`): SASS for sm_80 and sm_90a
and, from builds that embed it, compute_90 PTX that the driver compiles for newer GPUs.
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


class UnsupportedInputs(TypeError):
    """A backend refuses these inputs (dtype, head dim, feature sizes, device, GPU arch, or an op it lacks)."""


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


# What `_C` holds code for when it cannot say (built before it exported `cuda_archs`): SASS only.
_LEGACY_CUDA_ARCHS = ("sm_80", "sm_90a")


@functools.cache
def cuda_archs() -> tuple[str, ...]:
    """The archs `madtp_kernels._C` holds code for: `sm_XY[a]` SASS and `compute_XY` PTX (setup.py's -gencode)."""
    if not _cuda_extension_built():
        return ()
    op = getattr(torch.ops.madtp_kernels, "cuda_archs", None)
    return tuple(a.strip() for a in op().split(",")) if op is not None else _LEGACY_CUDA_ARCHS


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code built for `arch` runs on a GPU of `capability`: SASS sm_XY on major X with minor >= Y,
    sm_XYa (arch-specific features) on X.Y only, PTX compute_XY on any capability >= X.Y (JIT-compiled)."""
    kind, _, version = arch.partition("_")
    specific = version.endswith("a")
    major, minor = int(version.rstrip("a")[:-1]), int(version.rstrip("a")[-1])
    if kind == "compute":
        return capability >= (major, minor) and (not specific or capability == (major, minor))
    if specific:
        return capability == (major, minor)
    return capability[0] == major and capability[1] >= minor


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
    ops: frozenset[str] | None = None   # the ops it implements, declared (None: whatever registers)
    archs: Callable[[], tuple[str, ...]] | None = None   # CUDA archs its binary holds code for (None: any)

    def supports_device(self, device: torch.device) -> bool:
        return self.device_refusal(device) is None

    def device_refusal(self, device: torch.device) -> str | None:
        """Why this backend cannot run on `device` (of a type it takes), or None."""
        if device.type not in self.devices:
            return f"backend {self.name!r} takes tensors on {sorted(self.devices)}, got tensors on {device.type}"
        if device.type != "cuda":
            return None
        capability = torch.cuda.get_device_capability(device)
        if self.min_capability is not None and capability < self.min_capability:
            return f"backend {self.name!r} needs compute capability >= {self.min_capability} on {device}"
        if self.archs is not None:
            archs = self.archs()
            if not any(arch_runs_on(a, capability) for a in archs):
                return (f"backend {self.name!r} holds no code for compute capability {capability} of {device}: "
                        f"built for {list(archs)} (rebuild with its arch in setup.py's -gencode flags)")
        return None


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
                                         feature_multiple=16)},
                # csrc/ops.cpp's TORCH_LIBRARY: no attention backward in C++ (autograd takes another backend's).
                ops=frozenset({"pack", "unpack", "prune_tokens", "score_and_prune", "varlen_attention",
                               "sparse_linear"}),
                archs=cuda_archs),
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
    reason = backend.device_refusal(device)
    if reason is not None:
        return reason
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
            raise UnsupportedInputs(f"{op}: {reason}; backends that can run these inputs: {able}")
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
    raise UnsupportedInputs(f"{op}: no backend takes {given} tensors on {device}: " + "; ".join(reasons or ["none"]))


def implementations(op: str) -> dict[str, Callable]:
    """Every registered implementation of `op`, available or not (tests and benchmarks iterate these)."""
    return dict(_REGISTRY.get(op, {}))


def ops() -> list[str]:
    """Names of every registered op."""
    return sorted(_REGISTRY)
