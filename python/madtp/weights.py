"""HWP at inference: the encoders' nn.Linear layers become 2:4 madtp_kernels.SparseLinear (magnitude masks).

Learning the masks (SR-STE) belongs to the compression pipeline; this is the one-shot swap, as apex's ASP does.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from madtp_kernels import SparseLinear

from .patch import find_towers

PATTERNS = ("2:4",)
GROUP = 8   # SparseLinear packs 4-bit positions two groups a byte: in_features must be a multiple of 8


def sparsify(model: nn.Module, pattern: str = "2:4",
             filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Replace every nn.Linear inside the model's encoder towers (for which filter_fn(module, fqn) is true)
    by a 2:4 SparseLinear keeping the 2 largest |w| of each 4 input features. In place; returns the model.

    Layers whose in_features is not a multiple of 8 stay dense (the packed format needs it)."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern: expected one of {PATTERNS} (what Sparse Tensor Cores run), got {pattern!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
    towers = find_towers(model)
    if not towers:
        raise ValueError(f"model: no encoder towers found in {type(model).__name__}")
    swaps = []
    for tower in towers:
        prefix = f"{tower.name}." if tower.name else ""
        for name, module in tower.module.named_modules():
            for child_name, child in module.named_children():
                fqn = f"{prefix}{name}.{child_name}" if name else f"{prefix}{child_name}"
                if type(child) is nn.Linear and child.in_features % GROUP == 0 \
                        and (filter_fn is None or filter_fn(child, fqn)):
                    swaps.append((module, child_name, child))
    for parent, child_name, child in swaps:
        setattr(parent, child_name, SparseLinear.from_dense(child))
    return model
