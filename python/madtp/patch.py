"""apply / remove: MADTP token pruning swapped into an existing Hugging Face model instance.

Towers (image or text encoders) are found by class from the family tables in `madtp.models`; inside each, the
layer stack's `forward` is replaced on the instance (the class is untouched) and a pre-hook on the tower reads
which tokens exist (the text attention mask) and which must survive (CLIP's EOT). The alignment tokens live in a
child module `model.madtp`, so they train, move and save with the model. `remove` deletes all of it.

Threads: one applied model may be called from several threads at once (a server). What a forward passes from a
hook to the encoder it wraps, what it leaves behind (`records`, read by `pruning_report` and `alignment_loss`) and
the `recording` mode are kept per thread (like torch's grad mode), never shared between calls; configuration
(`set_temperature`, `set_execution`) is shared, read once per tower per forward.

A tower's output is a plain padded tensor to the model's own code (BLIP builds `image_atts` of ones from its
shape), so the layout of each tower output is recorded here, keyed by the tensor itself (weakly: nothing is kept
alive): a later tower (BLIP's text layers) or a family's module patch (BLIP's decoder cross-attention) that is
handed that very tensor looks its rows up. A tensor derived from it (sliced, moved, expanded by hand) is not
recognised: there, the attention mask the caller gives is all there is. `generate`, which expands and reorders the
batch itself (num_beams, num_return_sequences), is wrapped by the family (a MethodPatch) so that the layout travels
with the states through that expansion (BLIP: see models/blip.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from madtp_kernels import unpack

from . import executor, models
from .alignment import AlignmentTokens
from .alignment import alignment_loss as _alignment_loss
from .config import EXECUTIONS, MADTPConfig, check_temperature
from .models.spec import MethodPatch, OutputLayout, TowerInputs, TowerSpec

ATTRIBUTE = "madtp"


@dataclass
class Tower:
    name: str
    module: nn.Module
    spec: TowerSpec
    encoder: nn.Module
    layers: list[nn.Module]
    layer_names: list[str]


class _PerThread(threading.local):
    """One thread's forwards of one applied model: created empty in each thread on first use."""

    def __init__(self):
        self.inputs: dict[int, TowerInputs] = {}      # encoder -> its tower's inputs, from the tower's pre-hook
        self.pending: dict[int, OutputLayout] = {}    # encoder -> layout, until its tower's output is known
        self.records: dict[str, executor.BranchRecord] = {}   # branch -> this thread's last forward's record
        self.recording = False


class MADTPState(nn.Module):
    """The alignment tokens (parameters), the configuration, and per thread what its last forward recorded."""

    def __init__(self, config: MADTPConfig, towers: list[Tower]):
        super().__init__()
        self.config = config
        widths = {t.spec.branch: _width(t) for t in towers}
        self.alignment = AlignmentTokens(config.num_alignment_tokens, widths)
        default = config.temperature if config.temperature else None
        self.temperature = {"vision": default if config.prune_vision else None,
                            "text": default if config.prune_text else None}
        self.execution = config.execution
        self.record_outputs = False   # something reads the tower outputs' layouts (BLIP's cross-attention)
        self._threads = _PerThread()
        # tower output tensor -> OutputLayout: keyed by the tensor a call made, so calls never see each other's
        self._outputs = WeakIdKeyDictionary()
        self._hooks: list[tuple[nn.Module, int]] = []   # (module, hook id) installed by apply
        self._forwards: list[nn.Module] = []             # encoders whose forward apply replaced
        self._methods: list[tuple[nn.Module, str, object]] = []   # (module, method, its instance attribute
                                                                  # before apply, or None) wrapped by apply
        self._towers = towers

    @property
    def records(self) -> dict[str, executor.BranchRecord]:
        """branch -> what the calling thread's last forward of that branch recorded."""
        return self._threads.records

    @property
    def recording(self) -> bool:
        """Whether the calling thread is inside `madtp.recording(model)`."""
        return self._threads.recording

    def output_layout(self, tensor) -> OutputLayout | None:
        """The layout recorded for a tower output of the last forwards (None for any other tensor)."""
        return self._outputs.get(tensor) if isinstance(tensor, Tensor) else None

    def record_output_layout(self, tensor: Tensor, layout: OutputLayout) -> None:
        """Record `layout` for `tensor` (a family patch's: e.g. a tower output as generate expanded it), weakly."""
        if not isinstance(tensor, Tensor) or tuple(layout.valid.shape) != tuple(tensor.shape[:2]):
            raise ValueError(f"layout: expected a valid mask of {tuple(tensor.shape[:2])} (the tensor's batch and "
                             f"rows), got {tuple(layout.valid.shape)}")
        self._outputs[tensor] = layout

    def extra_repr(self) -> str:
        return f"config={self.config}, temperature={self.temperature}"

    # What forwards left (per thread, per output tensor) is not copied (a thread-local and a weak dictionary
    # cannot be pickled): a copy (copy.deepcopy, torch.save) starts as if it had run no forward.
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_threads"], state["_outputs"]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._threads, self._outputs = _PerThread(), WeakIdKeyDictionary()


def _width(tower: Tower) -> int:
    return tower.module.config.hidden_size


def _state(model: nn.Module) -> MADTPState:
    state = getattr(model, ATTRIBUTE, None)
    if not isinstance(state, MADTPState):
        raise ValueError("model: madtp.apply(model, config) has not been called on this model")
    return state


def find_towers(model: nn.Module) -> list[Tower]:
    towers, inside = [], []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if any(name.startswith(p + ".") for p in inside):
            continue   # the inner half of a tower already taken (transformers 4's XModel -> XTransformer)
        parts = name.split(".") if name else []
        ancestors = [modules[".".join(parts[:i])] for i in range(len(parts))]
        spec = next((s for s in models.SPECS if s.matches(module, ancestors)), None)
        if spec is None:
            continue
        encoders = [m for m in module.modules() if isinstance(m, spec.encoder_type)]
        if len(encoders) != 1:
            raise ValueError(f"model: expected one {spec.encoder_type.__name__} in {name or 'the model'}, found "
                             f"{len(encoders)}")
        prefix = f"{name}." if name else ""
        layers = [(f"{prefix}{n}", m) for n, m in module.named_modules() if isinstance(m, spec.layer_type)]
        if not layers:
            raise ValueError(f"model: no {spec.layer_type.__name__} (attention layers) found in "
                             f"{name or 'the model'}: nothing to prune")
        towers.append(Tower(name, module, spec, encoders[0], [m for _, m in layers], [n for n, _ in layers]))
        inside.append(name)
    return towers


def apply(model: nn.Module, config: MADTPConfig | None = None) -> nn.Module:
    """Swap MADTP token pruning into `model` in place (see MADTPConfig) and return it.

    Every check runs before any module changes: a failed apply leaves the model as it was.
    """
    config = MADTPConfig() if config is None else config
    if not isinstance(config, MADTPConfig):
        raise TypeError(f"config: expected a madtp.MADTPConfig, got {type(config).__name__}")
    if not isinstance(model, models.MODELS):
        names = ", ".join(m.__name__ for m in models.MODELS)
        raise TypeError(f"model: {type(model).__name__} is not supported; supported classes: {names}")
    if isinstance(getattr(model, ATTRIBUTE, None), MADTPState):
        raise ValueError("model: madtp.apply was already called on this model (madtp.remove it first)")
    if hasattr(model, ATTRIBUTE):
        raise ValueError(f"model: already has an attribute {ATTRIBUTE!r}; MADTP needs that name")
    towers = find_towers(model)
    if not towers:
        raise ValueError(f"model: no encoder towers found in {type(model).__name__}")
    _check_prune_layers(config, model, towers)
    param = next(model.parameters())
    state = MADTPState(config, towers).to(device=param.device, dtype=param.dtype)
    for tower in towers:
        _patch(state, tower)
    for module in model.modules():
        for patch in models.PATCHES:
            if not isinstance(module, patch.module_type):
                continue
            if isinstance(patch, MethodPatch):
                _wrap_method(state, module, patch)
                state.record_outputs = True
                continue
            target = patch.target(module)
            if target is not None:
                _hook(state, target, functools.partial(patch.hook, state), pre=True, with_kwargs=True)
                state.record_outputs = True
    state.record_outputs |= any(t.spec.cross_attends for t in towers)
    model.add_module(ATTRIBUTE, state)
    return model


def _check_prune_layers(config: MADTPConfig, model: nn.Module, towers: list[Tower]) -> None:
    """A layer index no tower has would prune nothing, silently. One index set serves every tower, so an index
    that only the deeper tower has is fine (CLIP's vision tower is often deeper than its text tower)."""
    if config.prune_layers is None:
        return
    depth = max(len(t.layers) for t in towers)
    bad = [i for i in config.prune_layers if i >= depth]
    if bad:
        depths = ", ".join(f"{t.name or t.spec.branch}: {len(t.layers)}" for t in towers)
        raise ValueError(f"prune_layers: expected 0-based layer indices below {depth} ({type(model).__name__} "
                         f"has {depth} layers in its deepest tower; {depths}), got {config.prune_layers}; "
                         f"out of range: {tuple(bad)}")


# Everything installed on the model is a functools.partial over (state, tower): copy.deepcopy of an applied
# model copies those arguments with the model (one memo), so the copy's forwards and hooks are its own.

def _read_inputs(state: MADTPState, tower: Tower, module, args, kwargs):
    bound = _signature(tower.module).bind_partial(*args, **kwargs).arguments
    state._threads.inputs[id(tower.encoder)] = tower.spec.inputs(module, bound)


def _record_output(state: MADTPState, tower: Tower, module, args, output):
    layout = state._threads.pending.pop(id(tower.encoder), None)
    if not state.record_outputs:   # nothing would read it (CLIP): no weak-dict traffic, nothing for compile
        return
    hidden = output[0] if isinstance(output, (tuple, ModelOutput)) else None
    if layout is not None and isinstance(hidden, Tensor) and hidden.shape[:2] == layout.valid.shape:
        state._outputs[hidden] = layout


def _encoder_forward(state: MADTPState, tower: Tower, *args, **kwargs):
    first = next(iter(_signature(tower.encoder).parameters))
    hidden = args[0] if args else kwargs[first]
    output_type = tower.spec.encoder_output or BaseModelOutput
    return output_type(last_hidden_state=_run(state, tower, hidden))


def _signature(module: nn.Module) -> inspect.Signature:
    # the class's forward (an instance attribute may already replace it)
    return inspect.signature(type(module).forward.__get__(module))


def _hook(state: MADTPState, module: nn.Module, hook, *, pre: bool, with_kwargs: bool = False) -> None:
    handle = (module.register_forward_pre_hook(hook, with_kwargs=with_kwargs) if pre
              else module.register_forward_hook(hook))
    state._hooks.append((module, handle.id))


def _patch(state: MADTPState, tower: Tower) -> None:
    _hook(state, tower.module, functools.partial(_read_inputs, state, tower), pre=True, with_kwargs=True)
    _hook(state, tower.module, functools.partial(_record_output, state, tower), pre=False)
    tower.encoder.forward = functools.partial(_encoder_forward, state, tower)
    state._forwards.append(tower.encoder)


def _wrap_method(state: MADTPState, module: nn.Module, patch: MethodPatch) -> None:
    previous = vars(module).get(patch.method)   # someone's instance attribute: wrapped, and put back by remove
    call = previous if previous is not None else functools.partial(getattr(type(module), patch.method), module)
    setattr(module, patch.method, functools.partial(patch.wrap, state, module, call))
    state._methods.append((module, patch.method, previous))


def _unhook(module: nn.Module, hook_id: int) -> None:
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        hooks.pop(hook_id, None)
    module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    module._forward_hooks_with_kwargs.pop(hook_id, None)


def _run(state: MADTPState, tower: Tower, hidden: Tensor) -> Tensor:
    spec = tower.spec
    calls = state._threads   # this thread's: another thread's forward of this model never sees it
    inputs = calls.inputs.pop(id(tower.encoder), None) or TowerInputs()
    batch, n = hidden.shape[:2]
    memory = None
    if inputs.memory is not None:
        memory = _memory(state, inputs, batch)
    plan = executor.BranchPlan(name=spec.branch, temperature=state.temperature.get(spec.branch),
                               prune_layers=(frozenset(state.config.prune_layers)
                                             if state.config.prune_layers is not None else None),
                               merge=state.config.merge_pruned and spec.merge, alignment=state.alignment,
                               layer_names=tower.layer_names, causal=spec.causal,
                               training=calls.recording or torch.is_grad_enabled(),
                               importance=state.config.importance)
    valid = inputs.valid.to(hidden.device).bool() if inputs.valid is not None else None
    rows, layout, record = executor.run_layers(tower.layers, spec.layer_fn, hidden, valid, inputs.protected, plan,
                                               state.execution, memory)
    calls.records[spec.branch] = record
    device = hidden.device
    if spec.output == "compact":
        calls.pending[id(tower.encoder)] = OutputLayout(layout.valid_mask())
        return unpack(rows, layout.ragged)
    # Rows back at their input positions; merged rows (position -1) land in a column past the end, cut off.
    positions = layout.positions()
    positions = torch.where(positions >= 0, positions, n)
    sample = layout.sample_ids()
    out = rows.new_zeros(batch, n + 1, rows.shape[-1]).index_put((sample, positions), rows)[:, :n]
    valid = torch.zeros(batch, n + 1, dtype=torch.bool, device=device).index_put(
        (sample, positions), torch.ones((), dtype=torch.bool, device=device))[:, :n]
    calls.pending[id(tower.encoder)] = OutputLayout(valid)
    return out


def _memory(state: MADTPState, inputs: TowerInputs, batch: int) -> executor.Memory:
    """What the tower's layers cross-attend to: the rows recorded for a tower output (BLIP's pruned image),
    else the rows the caller's mask names (which is all HF's BLIP ever says: `image_atts` are ones)."""
    x = inputs.memory
    if x.dim() != 3 or x.shape[0] != batch:
        raise ValueError(f"encoder_hidden_states: expected [{batch}, M, C] (the text batch), got {tuple(x.shape)}")
    valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    given = inputs.memory_valid
    if given is not None:
        if given.shape != x.shape[:2]:
            raise ValueError(f"encoder_attention_mask: expected {tuple(x.shape[:2])} (encoder_hidden_states' "
                             f"batch and rows), got {tuple(given.shape)}")
        valid = valid & given.to(x.device).bool()
    layout = state.output_layout(x)
    if layout is not None:
        valid = valid & layout.valid
    return executor.Memory(x, valid)


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: the original modules and forwards, and no `model.madtp`."""
    state = _state(model)
    for module, hook_id in state._hooks:
        _unhook(module, hook_id)
    for encoder in state._forwards:
        del encoder.forward   # the instance attribute: the class's forward shows through again
    for module, method, previous in reversed(state._methods):
        if previous is None:
            delattr(module, method)
        else:
            setattr(module, method, previous)
    delattr(model, ATTRIBUTE)
    return model


def set_temperature(model: nn.Module, *, vision: float | None = ..., text: float | None = ...) -> None:
    """Change a branch's pruning temperature (None: no pruning in that branch) without re-applying."""
    state = _state(model)
    for branch, value in (("vision", vision), ("text", text)):
        if value is ...:
            continue
        state.temperature[branch] = check_temperature(branch, value)  # the one rule MADTPConfig applies


@contextlib.contextmanager
def recording(model: nn.Module):
    """Forwards in this context record what the losses read (the pooled alignment features for
    `alignment_loss`, the per-layer summaries for distillation) even without autograd. A forward with autograd
    on records them anyway; one without (inference) skips that work. Like torch.no_grad, it holds in the thread
    that enters it."""
    calls = _state(model)._threads
    before, calls.recording = calls.recording, True
    try:
        yield model
    finally:
        calls.recording = before


def set_execution(model: nn.Module, execution: str) -> None:
    """Switch execution: "ragged" or "padded" (same decisions, same outputs, different time), or "published" (the
    published code's batch policy: other kept tokens, padded)."""
    state = _state(model)
    if execution not in EXECUTIONS:
        raise ValueError(f"execution: expected one of {EXECUTIONS}, got {execution!r}")
    state.execution = execution


def pruning_report(model: nn.Module) -> dict[str, Tensor]:
    """After a forward: layer name -> rows per sample (kept + merged) after that layer's pruning, int [B]
    (of the calling thread's last forward)."""
    state = _state(model)
    report = {}
    for record in state.records.values():   # host ints the layouts carried: no device read here
        report.update({name: torch.tensor(kept, dtype=torch.int64) for name, kept in record.kept.items()})
    return report


def alignment_loss(model: nn.Module) -> Tensor:
    """MAG's loss for the calling thread's last forward that ran both branches: 1 - cos(image, text pooled
    features)."""
    records = _state(model).records
    missing = [b for b in ("vision", "text") if b not in records or records[b].pooled is None]
    if missing:
        raise ValueError(f"model: the last forward did not record the {' and '.join(missing)} branch; "
                         "alignment_loss needs a forward over image-text pairs with autograd on or inside "
                         "madtp.recording(model)")
    return _alignment_loss(records["vision"].pooled, records["text"].pooled)


def config_of(model: nn.Module) -> MADTPConfig:
    return dataclasses.replace(_state(model).config)
