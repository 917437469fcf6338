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
    swaps = [(parent, name, child) for parent, name, fqn, child in encoder_linears(model, filter_fn)
             if prunable(child, fqn, filter_fn)]
    for parent, child_name, child in swaps:
        setattr(parent, child_name, SparseLinear.from_dense(child))
    return model


def encoder_linears(model: nn.Module, filter_fn=None) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, child name, fqn, child) for every nn.Linear (or subclass) inside the model's encoder towers: the
    layers weight pruning may touch (heads and projections outside the towers stay dense)."""
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
    towers = find_towers(model)
    if not towers:
        raise ValueError(f"model: no encoder towers found in {type(model).__name__}")
    found = []
    for tower in towers:
        prefix = f"{tower.name}." if tower.name else ""
        for name, module in tower.module.named_modules():
            for child_name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    fqn = f"{prefix}{name}.{child_name}" if name else f"{prefix}{child_name}"
                    found.append((module, child_name, fqn, child))
    return found


def prunable(child: nn.Module, fqn: str, filter_fn=None, multiple: int = GROUP) -> bool:
    """A plain nn.Linear whose in_features the packed format (and the N:M group) divides, that filter_fn keeps."""
    return (type(child) is nn.Linear and child.in_features % multiple == 0
            and (filter_fn is None or filter_fn(child, fqn)))
