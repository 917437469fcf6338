"""madtp: MADTP++ (alignment-guided token pruning + 2:4 weight pruning) on Hugging Face CLIP and BLIP.

Built on madtp_kernels: `apply` swaps token pruning into a model instance (executed on packed, ragged token sets),
`remove` undoes it; see shared/DESIGN.md (Model-layer contract).

Names load on first use: `import madtp.data` or `madtp.train` (and the torchrun workers that import them) do not
pay for importing transformers.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "IntegrityError": "integrity",
    "MADTPConfig": "config",
    "alignment_loss": "patch",
    "apply": "patch",
    "count_flops": "flops",
    "pruning_report": "patch",
    "recording": "patch",
    "remove": "patch",
    "set_execution": "patch",
    "set_temperature": "patch",
    "sparsify": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'madtp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
