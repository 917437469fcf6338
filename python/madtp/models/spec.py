"""What a model family tells the patcher about one of its towers (an image or text encoder stack)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass
class TowerInputs:
    """Read from the tower's own call: which tokens exist and which must survive pruning."""
    valid: Tensor | None = None       # bool [B, N]: tokens that exist (None: all)
    protected: Tensor | None = None   # bool [B, N]: tokens never dropped (besides each sample's first)


@dataclass(frozen=True)
class TowerSpec:
    branch: str                       # "vision" or "text"
    tower_types: tuple                # the module classes that are this tower (None entries: absent in this
                                      # transformers version)
    encoder_type: type                # the layer stack inside the tower whose forward is replaced
    layer_type: type
    layer_fn: Callable                # layer_fn(layer, x, ctx) -> x, see madtp.executor
    inputs: Callable                  # inputs(tower, bound_call_arguments) -> TowerInputs
    output: str                       # "compact": [B, L', C] kept rows (+ merged) from position 0, zero padded;
                                      # "positions": [B, N, C] kept rows at their input positions, zeros elsewhere
    causal: bool = False

    def matches(self, module) -> bool:
        return isinstance(module, tuple(t for t in self.tower_types if t is not None))
