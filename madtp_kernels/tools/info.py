"""`python -m madtp_kernels.tools.info`: what this install can run (versions, backends, _C, cuSPARSELt, GPU)."""
from __future__ import annotations

import importlib.metadata
import json
import platform
import sys

import torch

from madtp_kernels import __version__, _dispatch


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    import madtp_kernels.tokens  # noqa: F401  (registers the ops, so the table below is complete)

    info = {
        "madtp_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cuda_extension_built": _dispatch.BACKENDS["cuda"].is_available(),
        "cusparselt": None,
        "triton_interpret": _dispatch.triton_interpret(),
        "gpus": [],
        "backends": {},
    }
    if info["cuda_extension_built"]:
        raw = torch.ops.madtp_kernels.cusparselt_version()  # CUSPARSELT_VERSION: MAJOR*1000 + MINOR*100 + PATCH
        info["cusparselt"] = f"{raw // 1000}.{raw % 1000 // 100}.{raw % 100}"
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        info["gpus"].append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                             "memory_gib": round(props.total_memory / 2**30, 1)})
    for name, backend in _dispatch.BACKENDS.items():
        info["backends"][name] = {
            "available": backend.is_available(),
            "devices": sorted(backend.devices),
            "dtypes": sorted(str(d).removeprefix("torch.") for d in backend.dtypes),
            "ops": [op for op in _dispatch.ops() if name in _dispatch.implementations(op)],
        }
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = collect()
    if "--json" in argv:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "backends":
            continue
        print(f"{key:22s} {value if value not in (None, []) else '-'}")
    print("\nbackend  available  devices      dtypes                                ops")
    for name, b in info["backends"].items():
        print(f"{name:8s} {str(b['available']):10s} {','.join(b['devices']):12s} {','.join(b['dtypes']):37s} "
              f"{','.join(b['ops'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
