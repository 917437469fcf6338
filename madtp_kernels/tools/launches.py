"""Count what a GPU pays besides FLOPs: kernel launches and host syncs of a piece of eager PyTorch.

A CPU cannot time a GPU, but it can count exactly what a run would launch there. `LaunchCounter` is a
TorchDispatchMode that counts
- launches: every aten op that does work on a device (views, metadata and bare allocations left out), every
  Triton kernel launch (compiled or under TRITON_INTERPRET) and, inside a madtp_kernels custom op, everything
  that op runs: a custom op hides nothing (its Python body is re-entered under the counter);
- host syncs: every read of a tensor's values on the host: `.item()`, `bool()`, `int()` (aten
  `_local_scalar_dense`), `.tolist()`, and ops whose output size depends on values (`nonzero`, and the boolean
  indexing that runs it).

    with LaunchCounter() as c:
        model(**inputs)
    c.launches, c.syncs, c.by_op.most_common(10)
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that launch nothing: allocations and metadata
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
         "alias", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "resize_", "set_",
         "_local_scalar_dense", "is_nonzero"}
# value-dependent output sizes: the op must read back before it can allocate
_SYNCING = {"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "nonzero_static"}


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches = 0
        self.syncs = 0
        self.by_op: Counter[str] = Counter()
        self.syncs_by: Counter[str] = Counter()
        self._patches: contextlib.ExitStack | None = None
        self.by_custom_op: Counter[str] = Counter()   # launches made inside each madtp_kernels op
        self._inside: list[str] = []
        self._depth = 0     # the mode re-enters itself inside custom ops
        self._paused = 0    # inside a Triton launch: the interpreter's own tensor traffic is not the kernel's

    # ---------------------------------------------------------------- counting
    def _launch(self, name: str) -> None:
        self.launches += 1
        self.by_op[name] += 1
        if self._inside:
            self.by_custom_op[self._inside[-1]] += 1

    def _sync(self, name: str) -> None:
        self.syncs += 1
        self.syncs_by[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        namespace = func.namespace
        name = func.__name__.split(".")[0]
        if namespace == "madtp_kernels":
            # Count the inside: run the op's Python body with this mode pushed again. A C++ op (the cuda
            # backend) counts once: its own kernels are counted where they run.
            opdef = _maybe_get_opdef(func)
            if opdef is None:
                self._launch(name)
                return func(*args, **kwargs)
            self._inside.append(name)
            try:
                with self:
                    return opdef._init_fn(*args, **kwargs)
            finally:
                self._inside.pop()
        if name == "_local_scalar_dense" or name == "is_nonzero":
            self._sync(name)
        elif name in _SYNCING:
            self._sync(name)
            self._launch(name)
        elif not (func.is_view or name in _FREE):
            self._launch(name)
        return func(*args, **kwargs)

    # ---------------------------------------------------------------- what dispatch does not see
    def __enter__(self):
        self._depth += 1
        if self._depth > 1:   # re-entered inside a custom op: the patches are in place already
            return super().__enter__()
        stack = contextlib.ExitStack()
        counter = self
        original_tolist = torch.Tensor.tolist

        def tolist(t, *a, **k):
            counter._sync("tolist")
            return original_tolist(t, *a, **k)

        stack.enter_context(_patched(torch.Tensor, "tolist", tolist))
        for cls in _triton_kernel_classes():
            original_run = cls.run

            def run(fn, *a, _original=original_run, **k):
                counter._launch(f"triton:{getattr(getattr(fn, 'fn', fn), '__name__', '?')}")
                counter._paused += 1
                try:
                    return _original(fn, *a, **k)
                finally:
                    counter._paused -= 1

            stack.enter_context(_patched(cls, "run", run))
        self._patches = stack
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._depth -= 1
        if self._depth == 0 and self._patches is not None:
            self._patches.close()
            self._patches = None
        return out

    def summary(self) -> dict:
        return {"launches": self.launches, "syncs": self.syncs, "by_op": dict(self.by_op.most_common()),
                "syncs_by": dict(self.syncs_by), "by_custom_op": dict(self.by_custom_op)}


@contextlib.contextmanager
def _patched(owner, name, value):
    original = owner.__dict__[name] if name in owner.__dict__ else getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _triton_kernel_classes() -> list:
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return []
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes
