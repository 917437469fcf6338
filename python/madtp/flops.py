"""count_flops: GFLOPs per sample per branch, from torch.utils.flop_counter over the execution that ran.

The counter sees every aten op and the madtp_kernels ops (whose formulas count ragged attention pairs and 2:4
GEMMs at half), so a pruned model is charged for the tokens it really processed, not the padded batch.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# registers the kernels' and the dense SDPA ops' formulas, before any counter copies the registry
import madtp_kernels.flops  # noqa: F401

from .patch import find_towers


def _batch(inputs: dict, names: tuple[str, ...]) -> int | None:
    for name in names:
        t = inputs.get(name)
        if isinstance(t, torch.Tensor):
            return t.shape[0]
    return None


def count_flops(model: nn.Module, **inputs) -> dict[str, float]:
    """Run `model(**inputs)` under the FLOP counter; GFLOPs per sample: "vision", "text" (each per sample of
    its own input) and "total" (everything the call did, per sample of the batch)."""
    if not inputs:
        raise ValueError("inputs: expected the model's keyword inputs (e.g. pixel_values=..., input_ids=...)")
    towers = find_towers(model)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    result = {"vision": 0.0, "text": 0.0}
    for tower in towers:
        key = f"{root}.{tower.name}" if tower.name else root
        result[tower.spec.branch] += sum(counts.get(key, {}).values())
    images = _batch(inputs, ("pixel_values",))
    texts = _batch(inputs, ("input_ids", "inputs_embeds"))
    batch = images or texts or 1
    total = counter.get_total_flops()
    result["vision"] = result["vision"] / images / 1e9 if images else 0.0
    result["text"] = result["text"] / texts / 1e9 if texts else 0.0
    result["total"] = total / batch / 1e9
    return result
