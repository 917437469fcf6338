"""Test session set-up.

Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. The interpreter flag is read when
a kernel is decorated, so it is set here, before any test module imports madtp_kernels.triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    # Tests import the installed package (no tests/__init__.py, so the checkout is not put on sys.path).
    import madtp_kernels
    from madtp_kernels import _dispatch

    return (f"madtp_kernels from {madtp_kernels.__file__}; backends available: {_dispatch.available_backends()}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")


def pytest_collection_modifyitems(config, items):
    # Every test that runs on a CUDA device carries the `cuda` mark, so `pytest -m cuda` (benchmarks/gpu.sh) runs
    # all of them: params made by hand with a "cuda" device, not only those from backend_params.
    import pytest

    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(v, str | torch.device) and str(v).startswith("cuda") and k in ("device", "dev")
               for k, v in params.items()):
            item.add_marker(pytest.mark.cuda)
