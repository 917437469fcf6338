"""Which backends a test can run here, as pytest params (cuda ones are marked and skip without a GPU)."""
import pytest
import torch

from madtp_kernels import _dispatch


def backend_params(op: str):
    """(backend, device) pairs for `op`: every implementation on every device its backend takes."""
    params = []
    for name in _dispatch.implementations(op) | {"cuda": None}:
        backend = _dispatch.BACKENDS[name]
        for device in ("cpu", "cuda"):
            if device not in backend.devices:
                continue
            marks = [pytest.mark.cuda] if device == "cuda" else []
            if device == "cuda" and not torch.cuda.is_available():
                marks.append(pytest.mark.skip(reason="needs a CUDA GPU"))
            elif name not in _dispatch.implementations(op) or not backend.is_available():
                marks.append(pytest.mark.skip(reason=f"backend {name} not available here"))
            params.append(pytest.param(name, device, marks=marks, id=f"{name}-{device}"))
    return params
