"""What a model family tells the patcher about one of its towers (an image or text encoder stack)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from torch import Tensor


@dataclass
class TowerInputs:
    """Read from the tower's own call: which tokens exist and which must survive pruning."""
    valid: Tensor | None = None       # bool [B, N]: tokens that exist (None: all)
    protected: Tensor | None = None   # bool [B, N]: tokens never dropped (besides each sample's first)
    memory: Tensor | None = None      # [B, M, Cm]: states the layers cross-attend to (None: no cross-attention)
    memory_valid: Tensor | None = None   # bool [B, M]: the memory rows that exist, as the caller says (None: all)


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
    not_inside: tuple = ()            # a tower_types module inside one of these (the model itself included) is
                                      # not this tower and stays as it is
    encoder_output: type | None = None   # what the replaced encoder forward returns (None: BaseModelOutput)
    cross_attends: bool = False       # its layers may read another tower's recorded output (BLIP's text)
    merge: bool = True                # whether its pruning appends the merged row (and the config's merge_pruned)

    def matches(self, module, ancestors=()) -> bool:
        """`ancestors`: the modules that contain `module`, the model first."""
        return isinstance(module, tuple(t for t in self.tower_types if t is not None)) \
            and not any(isinstance(a, self.not_inside) for a in ancestors)


@dataclass
class OutputLayout:
    """Which rows of a tower's output [B, L, C] are tokens, recorded for the modules that consume that output
    (a cross-attention to the pruned image) although the model's own code sees a plain padded tensor."""
    valid: Tensor                     # bool [B, L]: the rows that are tokens (kept or merged)

    @cached_property
    def padded(self) -> bool:
        """Whether any row is not a token (one host sync, once)."""
        return not bool(self.valid.all())


@dataclass(frozen=True)
class ModulePatch:
    """A pre-hook on modules outside the pruned towers, found by isinstance (e.g. a decoder's cross-attention to
    a pruned image). target(module) -> the submodule to hook, or None; hook(outputs, module, args, kwargs) is
    registered with_kwargs, where outputs.output_layout(tensor) -> the OutputLayout recorded for a tower output
    (or None) and outputs.record_output_layout(tensor, layout) records one."""
    module_type: type
    target: Callable
    hook: Callable


@dataclass(frozen=True)
class MethodPatch:
    """A wrapper of a method that no hook reaches (a decoder's `generate`, which expands the batch before any
    forward), installed as an instance attribute on modules found by isinstance:
    module.<method>(*a, **k) runs wrap(outputs, module, call, *a, **k), where call is the method it replaces and
    outputs is as for ModulePatch."""
    module_type: type
    method: str
    wrap: Callable
