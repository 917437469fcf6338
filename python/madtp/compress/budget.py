"""Cooperative optimisation of token pruning and weight pruning under one GFLOPs budget.

1. `measure_sensitivity`: on calibration batches, for each branch and temperature of a grid, the GFLOPs that the
   execution ran (counted as madtp.count_flops counts: torch's FLOP counter over the model call, per encoder
   tower, per sample) and the loss, with only that branch pruned. The same forwards fit the cost model (3.).
2. `split_budget`: one temperature per branch that meets a GFLOPs reduction with the smallest summed loss
   increase; with 2:4 weight sparsity the encoders' prunable Linear layers count at half, and the token pruning
   only has to deliver the rest. Branch effects are taken as additive, except for the Linear work one branch's
   pruning saves in another (`cross_saving`: BLIP's text cross-attends to the kept image rows, and its keys and
   values are projected from them, whatever the text keeps); the rest of that interaction (the cross-attention
   products, which also shrink with the text) is left out, so an estimate never promises more than is saved.
3. `TemperatureController`: a Trainer callback holding each branch's GFLOPs at its target while training moves
   the weights (and with them how many tokens a temperature keeps): PI control on log temperature.

All GFLOPs here are dense-weight-equivalent (a SparseLinear is counted as the dense Linear it replaces): the 2:4
credit is applied once, in split_budget.

Which passes count: the table, the cost model and the controller count the model's forwards except those run
inside `madtp.tasks.auxiliary_pass` (training-only work: hard negatives), so that they measure what the budget's
reference and the report count (`task.cost_inputs`: the passes of the task's inference). With `batch_size`
given to measure_sensitivity, GFLOPs are per pair of the batch, summed over its counted passes (BLIP retrieval:
ITC + ITM); the cost model then knows each branch's tower passes per pair (`CostModel.passes`), and the
controller scales its per-tower-forward estimate by it.

The cost model (how the controller knows the GFLOPs of a forward without counting it). A tower's work is a
linear function of row statistics that the pruned forward knows anyway (the branch record's kept rows per layer,
and the tower's input lengths, read by hooks), in two parts:
- Linear layers, exactly: each Linear (the alignment map included) costs 2 * in * out per row it runs on, and it
  runs on one of: the rows entering its layer (attention projections), the rows after that layer's pruning (the
  MLP; BLIP's cross-attention queries), the memory rows (BLIP's cross-attention keys and values), the rows after
  pruning of the samples that cross-attend (BLIP's cross-attention queries when the calibration mixes ITC's
  unimodal text passes with ITM's image-grounded ones), or, outside the
  layers, the rows scored for alignment (the map) or one row per sample. Which, is read off the calibration
  forwards: the counter's per-module FLOPs / (2 * in * out) equal exactly one of these row counts.
- the rest (attention, the alignment products, the patch embedding), small next to the Linear layers, fitted by
  least squares to the counted FLOPs of the calibration forwards, over
      [samples, rows scored, B * longest rows (the padded pooling product), (query, key) pairs in pruning layers
       (which also pay the statistics pass), pairs in other layers, cross-attention pairs]
  summed over layers (pairs: n^2, causal n(n+1)/2; in the padded execution every sample counts the batch's
  longest). The calibration must pin these down: batches of a few different sizes and lengths (a warning says
  when they do not). `CostModel.residual` is the largest relative error on the calibration forwards.
"""
from __future__ import annotations

import inspect
import itertools
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from madtp_kernels import SparseLinear

from ..config import check_temperature
from ..patch import _state, find_towers, set_temperature
from ..tasks.retrieval import in_auxiliary_pass
from ..train.engine import Callback
from .hwp import GROUP, _sparse_layers

__all__ = ["SensitivityEntry", "SensitivityTable", "CostModel", "measure_sensitivity", "split_budget",
           "TemperatureController"]

BRANCHES = ("vision", "text")
REST = ("samples", "rows_scored", "pool", "pairs_pruning", "pairs_other", "cross")
# rows a Linear inside a layer runs on (columns of _Rows.layers); "cross": "out" of the samples that cross-attend
LAYER_CLASSES = ("in", "out", "memory", "cross")
TOWER_CLASSES = ("scored", "samples")      # rows a Linear outside the layers runs on
WEIGHT_SPARSITY = {None: 1.0, "2:4": 0.5}


# ------------------------------------------------------------------ row statistics of each tower forward

@dataclass
class _Rows:
    """Row statistics of one tower forward, summed over its samples."""
    samples: int
    layers: Tensor   # [L, 4] float64: rows into each layer's Linear layers before and after its pruning, memory
                     # rows, rows after its pruning of the samples with memory
    rest: Tensor     # [len(REST)] float64

    def __add__(self, other: _Rows) -> _Rows:
        return _Rows(self.samples + other.samples, self.layers + other.layers, self.rest + other.rest)

    def of(self, cls: str, layer: int) -> float:
        if cls in LAYER_CLASSES:
            return float(self.layers[layer, LAYER_CLASSES.index(cls)])
        return float(self.samples) if cls == "samples" else float(self.rest[REST.index("rows_scored")])


class _Watcher:
    """Hooks on the towers of a madtp-applied model: after each tower forward, its row statistics (_Rows), from
    the tower's inputs and the branch record. `when(tower module)` says which forwards count; forwards inside
    `madtp.tasks.auxiliary_pass(model)` never do."""

    def __init__(self, model: nn.Module, when: Callable[[nn.Module], bool] = lambda m: True):
        self.model = model
        self.state = _state(model)
        self.towers = find_towers(model)
        self.when = when
        self.observations: list[tuple[str, _Rows]] = []
        self._inputs: dict[int, tuple] = {}
        self._handles = []
        for tower in self.towers:
            self._hook(tower)

    def _hook(self, tower):
        signature = inspect.signature(tower.module.forward)
        first = list(inspect.signature(type(tower.encoder).forward).parameters)[1]
        key = id(tower.module)

        def read_inputs(module, args, kwargs):
            if self.when(module) and not in_auxiliary_pass(self.model):
                bound = signature.bind_partial(*args, **kwargs).arguments
                self._inputs[key] = (tower.spec.inputs(module, bound), None)

        def read_hidden(module, args, kwargs):   # the encoder's input: [B, N, C]
            if key in self._inputs:
                hidden = args[0] if args else kwargs[first]
                self._inputs[key] = (self._inputs[key][0], hidden.shape[:2])

        def record(module, args, output):
            inputs, shape = self._inputs.pop(key, (None, None))
            if shape is not None:
                self.observations.append((tower.spec.branch, self._rows(tower, inputs, shape)))

        self._handles += [tower.module.register_forward_pre_hook(read_inputs, with_kwargs=True),
                          tower.encoder.register_forward_pre_hook(read_hidden, with_kwargs=True),
                          tower.module.register_forward_hook(record)]

    def _memory_rows(self, inputs, batch: int) -> Tensor:
        """[B] the rows each sample cross-attends to (as madtp.patch finds them)."""
        x = inputs.memory
        if x is None:
            return torch.zeros(batch, dtype=torch.float64)
        if self.state.execution in ("padded", "published"):   # both run padded layers
            return torch.full((batch,), float(x.shape[1]), dtype=torch.float64)
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if inputs.memory_valid is not None:
            valid = valid & inputs.memory_valid.to(x.device).bool()
        layout = self.state.output_layout(x)
        if layout is not None:
            valid = valid & layout.valid.to(x.device)
        return valid.sum(1).double().cpu()

    def _rows(self, tower, inputs, shape) -> _Rows:
        batch, n = int(shape[0]), int(shape[1])
        valid = inputs.valid
        rows = valid.sum(1).double().cpu() if valid is not None else \
            torch.full((batch,), float(n), dtype=torch.float64)
        record = self.state.records.get(tower.spec.branch)
        kept = record.kept if record is not None else {}
        padded = self.state.execution in ("padded", "published")
        training = self.state.recording or torch.is_grad_enabled()
        memory = self._memory_rows(inputs, batch)
        top = lambda t: torch.full_like(t, float(t.max()) if t.numel() else 0.0)  # noqa: E731
        layers = torch.zeros(len(tower.layer_names), len(LAYER_CLASSES), dtype=torch.float64)
        rest = dict.fromkeys(REST, 0.0)
        rest["samples"] = float(batch)
        for i, name in enumerate(tower.layer_names):
            out = torch.tensor(kept[name], dtype=torch.float64) if name in kept else rows
            lin_in, lin_out = (top(rows), top(out)) if padded else (rows, out)
            pairs = lin_in * lin_in if padded or not tower.spec.causal else rows * (rows + 1) / 2
            layers[i] = torch.stack([lin_in.sum(), lin_out.sum(), memory.sum(), (lin_out * (memory > 0)).sum()])
            # Alignment scores run in pruning layers, and in every layer of a forward that records (training);
            # the pooled features only there (madtp.executor).
            if name in kept or training:
                rest["rows_scored"] += float(rows.sum())
            if training:
                rest["pool"] += float(top(rows).sum())
            rest["pairs_pruning" if name in kept else "pairs_other"] += float(pairs.sum())
            rest["cross"] += float((lin_out * memory).sum())
            rows = out
        return _Rows(batch, layers, torch.tensor([rest[k] for k in REST], dtype=torch.float64))

    def take(self) -> list[tuple[str, _Rows]]:
        out, self.observations = self.observations, []
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _linears(model: nn.Module, towers) -> dict[str, dict[str, tuple[int, int, bool]]]:
    """branch -> {fqn: (layer index or -1, dense FLOPs per row 2 * in * out, is a SparseLinear)} of the Linear
    layers that run in the branch's tower forward (the branch's alignment map included)."""
    state = _state(model)
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, dict[str, tuple[int, int, bool]]] = {}
    for tower in towers:
        found = out.setdefault(tower.spec.branch, {})
        modules = list(tower.module.named_modules(prefix=tower.name))
        maps = state.alignment.maps
        if tower.spec.branch in maps:
            modules.append((names[id(maps[tower.spec.branch])], maps[tower.spec.branch]))
        for fqn, m in modules:
            if isinstance(m, (nn.Linear, SparseLinear)):
                layer = next((i for i, n in enumerate(tower.layer_names) if fqn.startswith(n + ".")), -1)
                found[fqn] = (layer, 2 * m.in_features * m.out_features, isinstance(m, SparseLinear))
    return out


@dataclass
class CostModel:
    """FLOPs of a tower forward from its row statistics (see the module docstring). Dense-weight-equivalent."""
    linear: dict[str, list[tuple[str, int, float]]]   # branch -> (row class, layer, FLOPs per row) per Linear
    coef: dict[str, list[float]]                      # branch -> coefficients of the rest over REST
    execution: str
    residual: dict[str, float] = field(default_factory=dict)
    # branch -> the branch's counted tower forwards per sample (measure_sensitivity with batch_size: BLIP
    # retrieval runs each tower in ITC and ITM, 2); the controller's GFLOPs per sample are its per-forward
    # estimate times this (absent: 1)
    passes: dict[str, float] = field(default_factory=dict)

    def flops(self, branch: str, rows: _Rows) -> float:
        linear = sum(per_row * rows.of(cls, layer) for cls, layer, per_row in self.linear[branch])
        return linear + float(rows.rest @ torch.tensor(self.coef[branch], dtype=torch.float64))

    def estimate(self, branch: str, rows: _Rows) -> float:
        """GFLOPs per sample of the tower forward(s) `rows` describes."""
        return self.flops(branch, rows) / max(rows.samples, 1) / 1e9

    @staticmethod
    def fit(data: dict[str, list[tuple[_Rows, float, dict[str, float]]]],
            linears: dict[str, dict[str, tuple[int, int, bool]]], execution: str) -> CostModel:
        """data: branch -> [(row statistics, counted tower FLOPs, counted FLOPs per Linear fqn)] per forward."""
        model = CostModel({}, {}, execution)
        for branch, rows in data.items():
            classified = []
            for fqn, (layer, per_row, _) in linears.get(branch, {}).items():
                counted = [r[2].get(fqn, 0.0) for r in rows]
                if not any(counted):
                    continue   # never ran
                classes = LAYER_CLASSES if layer >= 0 else TOWER_CLASSES
                fits = [c for c in classes if all(abs(f / per_row - r[0].of(c, layer)) <= 0.5
                                                  for f, r in zip(counted, rows, strict=True))]
                if fits:       # else it stays in the fitted rest
                    classified.append((fits[0], layer, float(per_row)))
            model.linear[branch] = classified
            x = torch.stack([r[0].rest for r in rows])
            y = torch.tensor([r[1] for r in rows], dtype=torch.float64)
            linear = torch.tensor([sum(p * r[0].of(c, i) for c, i, p in classified) for r in rows],
                                  dtype=torch.float64)
            scale = x.abs().amax(0).clamp_min(1.0)
            used = x.abs().amax(0) > 0
            rank = int(torch.linalg.matrix_rank(x[:, used] / scale[used])) if bool(used.any()) else 0
            if rank < int(used.sum()):
                terms = int(used.sum())
                warnings.warn(f"cost model ({branch}): the calibration forwards pin down {rank} of the {terms}"
                              " terms of the non-Linear part; estimates for other batch shapes may be off. Calibrate "
                              "on batches of different sizes and lengths (and several temperatures)", stacklevel=3)
            coef = torch.linalg.lstsq(x / scale, (y - linear)[:, None], driver="gelsd").solution[:, 0] / scale
            model.coef[branch] = coef.tolist()
            model.residual[branch] = float(((linear + x @ coef - y).abs() / y.abs().clamp_min(1.0)).max())
        return model


# ------------------------------------------------------------------ counting

def _eligible(model: nn.Module, towers) -> dict[str, set[str]]:
    """branch -> fqns of the Linear layers 2:4 applies to: the N:M ones if the model has any, else those
    madtp.weights.sparsify would replace."""
    sparse = {fqn for _, _, fqn, _, _ in _sparse_layers(model)}
    out: dict[str, set[str]] = {}
    for tower in towers:
        names = out.setdefault(tower.spec.branch, set())
        for fqn, module in tower.module.named_modules(prefix=tower.name):
            if isinstance(module, SparseLinear) or fqn in sparse or (
                    not sparse and type(module) is nn.Linear and module.in_features % GROUP == 0):
                names.add(fqn)
    return out


@dataclass
class _Count:
    tower: dict[str, float]     # branch -> FLOPs (dense-weight-equivalent), whole batch
    linear: dict[str, float]    # branch -> FLOPs of the 2:4-eligible Linear layers (dense-equivalent)
    other: float                # FLOPs of the model call outside the towers
    modules: dict[str, float]   # Linear fqn -> FLOPs (dense-equivalent)
    rows: dict[str, _Rows]      # branch -> row statistics of the call


class _Uncounted:
    """Hooks on the model and its towers: the FLOPs the counter saw during forwards inside
    `madtp.tasks.auxiliary_pass` (model calls and direct tower calls alike), to be taken off its counts."""

    def __init__(self, model: nn.Module, towers, counter: FlopCounterMode):
        self.model, self.counter = model, counter
        self.depth, self.before = 0, None
        self.flops: dict[str, dict] = {}
        self._handles = []
        for m in [model, *(t.module for t in towers)]:
            self._handles += [m.register_forward_pre_hook(self._enter), m.register_forward_hook(self._leave)]

    def _enter(self, module, args):
        if self.depth or in_auxiliary_pass(self.model):
            if not self.depth:
                self.before = self.counter.get_flop_counts()
            self.depth += 1

    def _leave(self, module, args, output):
        if not self.depth:
            return
        self.depth -= 1
        if not self.depth:
            for key, ops in self.counter.get_flop_counts().items():
                seen = self.flops.setdefault(key, {})
                for op, n in ops.items():
                    seen[op] = seen.get(op, 0) + n - self.before.get(key, {}).get(op, 0)

    def remove_from(self, counts: dict[str, dict]) -> dict[str, dict]:
        return {key: {op: n - self.flops.get(key, {}).get(op, 0) for op, n in ops.items()}
                for key, ops in counts.items()}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _counted(model: nn.Module, towers, eligible, linears, fn) -> tuple[object, _Count]:
    """Run fn() under the FLOP counter, attributed as madtp.count_flops does (per tower module); forwards inside
    `madtp.tasks.auxiliary_pass` are left out (of the FLOPs and of the row statistics)."""
    counter = FlopCounterMode(display=False)
    # Name every module from the root now: the counter names a module when it first runs, so a direct tower call
    # before the model call (CLIP's hard negatives) would file the tower's layers under the tower's own name.
    name_from = getattr(getattr(counter, "mod_tracker", None), "_get_mod_name", None)
    if callable(name_from):
        name_from(model)
    watcher = _Watcher(model)
    uncounted = _Uncounted(model, towers, counter)
    try:
        with counter:
            result = fn()
    finally:
        watcher.close()
        uncounted.close()
    counts = uncounted.remove_from(counter.get_flop_counts())
    root = type(model).__name__
    flops = lambda fqn: float(sum(counts.get(f"{root}.{fqn}" if fqn else root, {}).values()))  # noqa: E731
    modules = {}
    for found in linears.values():
        for fqn, (_, _, sparse) in found.items():
            modules[fqn] = flops(fqn) * (2 if sparse else 1)   # a SparseLinear is counted at half
    tower, linear = dict.fromkeys(BRANCHES, 0.0), dict.fromkeys(BRANCHES, 0.0)
    for t in towers:
        tower[t.spec.branch] += flops(t.name)
    for branch, found in linears.items():
        tower[branch] += sum(modules[f] / 2 for f, (_, _, sparse) in found.items() if sparse)
        linear[branch] = sum(modules.get(f, flops(f)) for f in eligible.get(branch, ()))
    rows: dict[str, _Rows] = {}
    for branch, r in watcher.take():
        rows[branch] = rows[branch] + r if branch in rows else r
    other = flops("") - sum(flops(t.name) for t in towers)
    return result, _Count(tower, linear, other, modules, rows)


# ------------------------------------------------------------------ sensitivity table

@dataclass
class SensitivityEntry:
    temperature: float | None
    loss: float
    gflops: dict[str, float]    # per sample: "vision", "text" (towers), "other" (the rest of the call), "total"
    linear: dict[str, float]    # per sample: GFLOPs of each branch's 2:4-eligible Linear layers


@dataclass
class SensitivityTable:
    temperatures: list[float]
    dense: SensitivityEntry                    # no token pruning
    entries: dict[str, list[SensitivityEntry]]  # branch -> one per temperature, only that branch pruned
    cost_model: CostModel
    execution: str

    @property
    def branches(self) -> list[str]:
        return list(self.entries)

    def entry(self, branch: str, temperature: float | None) -> SensitivityEntry:
        if temperature is None:
            return self.dense
        for e in self.entries[branch]:
            if math.isclose(e.temperature, temperature, rel_tol=1e-9):
                return e
        raise ValueError(f"temperature: {temperature} is not in the table's grid {self.temperatures}")


@torch.no_grad()
def measure_sensitivity(model: nn.Module, calib_batches: Iterable, temperatures: Iterable[float],
                        loss_fn: Callable[[nn.Module, object], Tensor],
                        batch_size: Callable[[object], int] | None = None) -> SensitivityTable:
    """For each branch and temperature: GFLOPs and loss(model, batch), averaged over calib_batches, with only that
    branch pruned (model in eval mode, no grad; temperatures and mode restored after). Also fits the cost model
    the TemperatureController uses (table.cost_model).

    GFLOPs count loss_fn's forwards except those inside `madtp.tasks.auxiliary_pass`. batch_size(batch): the
    batch's samples (pairs); given, GFLOPs are per sample summed over every counted pass (what
    madtp.compress.pipeline.count_gflops counts over task.cost_inputs) and table.cost_model.passes says how many
    tower forwards per sample each branch ran; None: per sample of each tower forward (one pass per sample)."""
    state = _state(model)
    temperatures = [check_temperature("temperatures", t) for t in temperatures]
    if not temperatures or None in temperatures:
        raise ValueError(f"temperatures: expected a non-empty grid of finite numbers > 0, got {temperatures}")
    temperatures = sorted(temperatures)
    batches = list(calib_batches)
    if not batches:
        raise ValueError("calib_batches: expected at least one batch")
    towers = find_towers(model)
    branches = [b for b in BRANCHES if any(t.spec.branch == b for t in towers)]
    eligible, linears = _eligible(model, towers), _linears(model, towers)
    saved, was_training = dict(state.temperature), model.training
    fit: dict[str, list[tuple[_Rows, float, dict[str, float]]]] = {b: [] for b in branches}
    passes: dict[str, float] = {}

    def run(temperature: float | None, branch: str | None) -> SensitivityEntry:
        set_temperature(model, **{b: (temperature if b == branch else None) for b in BRANCHES})
        loss, other, pairs = 0.0, 0.0, 0
        flops, linear, samples = (dict.fromkeys(BRANCHES, 0.0) for _ in range(3))
        for batch in batches:
            value, count = _counted(model, towers, eligible, linears, lambda b=batch: loss_fn(model, b))
            loss += float(value)
            other += count.other
            pairs += _samples(batch_size, batch) if batch_size is not None else 0
            for b, rows in count.rows.items():
                flops[b] += count.tower[b]
                linear[b] += count.linear[b]
                samples[b] += rows.samples
                fit[b].append((rows, count.tower[b], count.modules))
        # per pair over all counted passes, or (no batch_size) per sample of each tower forward
        per_sample = {b: pairs if batch_size is not None else samples[b] for b in BRANCHES}
        per = {b: flops[b] / per_sample[b] / 1e9 if per_sample[b] else 0.0 for b in BRANCHES}
        lin = {b: linear[b] / per_sample[b] / 1e9 if per_sample[b] else 0.0 for b in BRANCHES}
        per["other"] = other / (pairs or samples["vision"] or samples["text"] or 1) / 1e9
        per["total"] = per["vision"] + per["text"] + per["other"]
        passes.update({b: samples[b] / pairs for b in BRANCHES if samples[b] and pairs})
        return SensitivityEntry(temperature, loss / len(batches), per, lin)

    try:
        model.eval()
        dense = run(None, None)
        entries = {b: [run(t, b) for t in temperatures] for b in branches}
    finally:
        state.temperature.update(saved)
        model.train(was_training)
    cost_model = CostModel.fit(fit, linears, state.execution)
    cost_model.passes = passes if batch_size is not None else {}
    return SensitivityTable(temperatures, dense, entries, cost_model, state.execution)


def _samples(batch_size: Callable[[object], int], batch) -> int:
    n = batch_size(batch)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"batch_size: expected an int >= 1 for every calibration batch, got {n!r}")
    return n


# ------------------------------------------------------------------ the split

def cross_saving(table: SensitivityTable, entry_by_branch: dict[str, SensitivityEntry], branch: str) -> float:
    """GFLOPs per sample of `branch`'s eligible Linear layers that the other branches' pruning saves in it (their
    entries ran `branch` unpruned: BLIP's text projects fewer image rows to keys and values). That saving does not
    depend on what `branch` itself keeps; Linear layers outside the 2:4 set are not seen (never over-counted)."""
    return sum(max(0.0, table.dense.linear[branch] - e.linear[branch])
               for other, e in entry_by_branch.items() if other != branch)


def _gflops(entry_by_branch: dict[str, SensitivityEntry], table: SensitivityTable, factor: float) -> float:
    """Total GFLOPs per sample of a choice (one entry per branch), the eligible Linear work times factor."""
    total = table.dense.gflops["other"]
    for branch in table.branches:
        e = entry_by_branch[branch]
        cross = cross_saving(table, entry_by_branch, branch)
        total += e.gflops[branch] - cross - (1.0 - factor) * (e.linear[branch] - cross)
    return total


def split_budget(table: SensitivityTable, target_gflops_reduction: float, dense_gflops: float | None = None,
                 weight_sparsity: str | None = "2:4", unreachable: str = "error") -> dict[str, float | None]:
    """{"vision": t_v, "text": t_t} (None: that branch unpruned) from the table's grid whose GFLOPs are at most
    (1 - target_gflops_reduction) * dense_gflops with the smallest summed loss increase (ties: the cheaper).

    dense_gflops: the reference (default: the table's dense model, dense weights). weight_sparsity "2:4": the
    eligible Linear layers run 2:4 and count at half, so the token pruning only delivers the rest.
    unreachable: "error" (ValueError naming the best reachable reduction) or "closest" (the grid's cheapest
    choice: the deepest reduction the grid reaches)."""
    if unreachable not in ("error", "closest"):
        raise ValueError(f"unreachable: expected 'error' or 'closest', got {unreachable!r}")
    if weight_sparsity not in WEIGHT_SPARSITY:
        raise ValueError(f"weight_sparsity: expected '2:4' or None, got {weight_sparsity!r}")
    if isinstance(target_gflops_reduction, bool) or not isinstance(target_gflops_reduction, (int, float)) \
            or not target_gflops_reduction >= 0:
        raise ValueError(f"target_gflops_reduction: expected a fraction in [0, 1), got {target_gflops_reduction!r}")
    reference = table.dense.gflops["total"] if dense_gflops is None else float(dense_gflops)
    if not reference > 0:
        raise ValueError(f"dense_gflops: expected a number > 0, got {dense_gflops!r}")
    factor = WEIGHT_SPARSITY[weight_sparsity]
    budget = (1.0 - target_gflops_reduction) * reference
    options = {b: [table.dense] + table.entries[b] for b in table.branches}
    best, cheapest = None, None
    for combo in itertools.product(*options.values()):
        choice = dict(zip(table.branches, combo, strict=True))
        gflops = _gflops(choice, table, factor)
        if cheapest is None or gflops < cheapest[0]:
            cheapest = (gflops, choice)
        if gflops > budget * (1 + 1e-12):
            continue
        key = (sum(e.loss - table.dense.loss for e in combo), gflops)
        if best is None or key < best[0]:
            best = (key, choice)
    if best is None and unreachable == "closest" and cheapest is not None:
        best = (None, cheapest[1])
    if target_gflops_reduction >= 1 or best is None:
        best_reduction = 1.0 - cheapest[0] / reference
        raise ValueError(f"target_gflops_reduction: {target_gflops_reduction} cannot be met; the best reachable "
                         f"with this grid is {best_reduction:.4f} (weight_sparsity={weight_sparsity!r}, "
                         f"temperatures {table.temperatures})")
    result = {b: None for b in BRANCHES}
    result.update({b: e.temperature for b, e in best[1].items()})
    return result


# ------------------------------------------------------------------ the controller

class TemperatureController(Callback):
    """Holds each branch's GFLOPs per sample at its target by PI control of log temperature.

    After every optimizer step it reads the GFLOPs the step's training forwards ran (cost-model estimate from the
    kept rows, averaged over the step's micro-batches and, under DDP, over ranks, so every rank sets the same
    temperatures), and sets

        e = (gflops - target) / target;   I += e;   log T = log T0 - (kp * e + ki * I) / slope

    slope = d(gflops / target) / d(log T) near the operating point (from the sensitivity table; negative, since
    a higher temperature prunes more), clamped to [min_temperature, max_temperature], the integral frozen while
    the output is clamped (no wind-up). Only forwards in training mode are counted (evaluation
    passes are not), and of those not the ones inside `madtp.tasks.auxiliary_pass` (hard negatives: the table
    leaves them out too). GFLOPs are per sample over the sample's passes, as the table counts them (the cost
    model's per-forward estimate times `cost_model.passes`). state_dict holds T0, the integral and the
    temperatures: a resume continues exactly.
    """

    def __init__(self, model: nn.Module, cost_model: CostModel, targets: dict[str, float],
                 temperatures: dict[str, float], slopes: dict[str, float], *, kp: float = 0.2, ki: float = 0.3,
                 min_temperature: float = 1e-3, max_temperature: float = 1e3):
        self.model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) \
            else model
        state = _state(self.model)
        if state.execution != cost_model.execution:
            raise ValueError(f"cost_model: fitted on the {cost_model.execution!r} execution, the model runs "
                             f"{state.execution!r}; measure it on this one")
        if not 0 < min_temperature < max_temperature:
            raise ValueError(f"min_temperature, max_temperature: expected 0 < min < max, got {min_temperature}, "
                             f"{max_temperature}")
        branches = [b for b in BRANCHES if targets.get(b) is not None]
        for b in branches:
            if b not in cost_model.coef:
                raise ValueError(f"targets: the cost model has no {b!r} branch")
            if not targets[b] > 0:
                raise ValueError(f"targets[{b!r}]: expected GFLOPs > 0, got {targets[b]!r}")
            if temperatures.get(b) is None or not temperatures[b] > 0:
                raise ValueError(f"temperatures[{b!r}]: expected the starting temperature > 0, got "
                                 f"{temperatures.get(b)!r}")
            if not slopes.get(b):
                raise ValueError(f"slopes[{b!r}]: expected a non-zero d(gflops/target)/d(log T), got "
                                 f"{slopes.get(b)!r}")
        self.cost_model, self.branches = cost_model, branches
        self.targets = {b: float(targets[b]) for b in branches}
        self.slopes = {b: float(slopes[b]) for b in branches}
        self.kp, self.ki = float(kp), float(ki)
        self.bounds = (math.log(min_temperature), math.log(max_temperature))
        self.log_t0 = {b: self._clamp(math.log(temperatures[b])) for b in branches}
        self.integral = dict.fromkeys(branches, 0.0)
        self.temperature = {b: math.exp(self.log_t0[b]) for b in branches}
        self.last: dict[str, float] = {}
        self._watcher = _Watcher(self.model, when=lambda module: module.training)
        self.apply()

    @classmethod
    def from_table(cls, model: nn.Module, table: SensitivityTable, temperatures: dict[str, float | None],
                   **kwargs) -> TemperatureController:
        """Targets: the table's GFLOPs at `temperatures` (split_budget's choice); slopes: the table's secant around
        them (at least half the grid-wide secant, so a flat stretch does not blow up the gain)."""
        targets, start, slopes = {}, {}, {}
        for b in table.branches:
            t = temperatures.get(b)
            if t is None:
                continue
            entries = table.entries[b]
            i = entries.index(table.entry(b, t))
            target = entries[i].gflops[b]
            lo, hi = entries[max(i - 1, 0)], entries[min(i + 1, len(entries) - 1)]

            def secant(a, c, target=target, b=b):
                if a is c:
                    return 0.0
                return (c.gflops[b] - a.gflops[b]) / target / (math.log(c.temperature) - math.log(a.temperature))

            local, wide = secant(lo, hi), secant(entries[0], entries[-1])
            if wide == 0 and local == 0:
                raise ValueError(f"table: the {b} GFLOPs do not change over the grid {table.temperatures}; "
                                 "nothing to control")
            sign = math.copysign(1.0, wide if wide else local)
            targets[b], start[b] = target, t
            slopes[b] = sign * max(abs(local), abs(wide) / 2)
        return cls(model, table.cost_model, targets, start, slopes, **kwargs)

    def _clamp(self, u: float) -> float:
        return min(max(u, self.bounds[0]), self.bounds[1])

    def apply(self) -> None:
        """Push the current temperatures into the model."""
        set_temperature(self.model, **self.temperature)

    def measure(self) -> dict[str, float]:
        """GFLOPs per sample per branch of the training forwards since the last call (cost-model estimate)."""
        sums = {b: [0.0, 0] for b in BRANCHES}
        for branch, rows in self._watcher.take():
            if branch in sums and branch in self.cost_model.coef:
                sums[branch][0] += self.cost_model.flops(branch, rows) / 1e9
                sums[branch][1] += rows.samples
        # GFLOPs per sample over the sample's passes (the table's unit): BLIP retrieval counts ITC and ITM
        for b in BRANCHES:
            sums[b][0] *= self.cost_model.passes.get(b, 1.0)
        vec = torch.tensor([v for b in BRANCHES for v in sums[b]], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            vec = vec.to(device)
            torch.distributed.all_reduce(vec)
            vec = vec.cpu()
        return {b: float(vec[2 * i] / vec[2 * i + 1]) for i, b in enumerate(BRANCHES) if vec[2 * i + 1] > 0}

    def update(self, gflops: dict[str, float]) -> dict[str, float]:
        """One control step from measured GFLOPs per branch; sets and returns the new temperatures."""
        for b in self.branches:
            if b not in gflops:
                continue   # the branch did not run this step
            e = (gflops[b] - self.targets[b]) / self.targets[b]
            integral = self.integral[b] + e
            u = self.log_t0[b] - (self.kp * e + self.ki * integral) / self.slopes[b]
            clamped = self._clamp(u)
            if clamped == u:
                self.integral[b] = integral    # conditional integration: frozen while the output saturates
            self.temperature[b] = math.exp(clamped)
            self.last[b] = gflops[b]
        self.apply()
        return dict(self.temperature)

    # ---- Callback
    def on_train_begin(self, trainer) -> None:
        self.apply()
        self._watcher.take()

    def on_step_end(self, trainer, step: int, logs: dict[str, float]) -> None:
        measured = self.measure()
        self.update(measured)
        for b in self.branches:
            if b in measured:
                logs[f"madtp/{b}_gflops"] = measured[b]
            logs[f"madtp/{b}_temperature"] = self.temperature[b]

    def on_train_end(self, trainer) -> None:
        self._watcher.take()

    def close(self) -> None:
        """Remove the hooks (the temperatures stay as they are)."""
        self._watcher.close()

    def state_dict(self) -> dict:
        return {"integral": dict(self.integral), "temperature": dict(self.temperature),
                "log_t0": dict(self.log_t0), "targets": dict(self.targets), "slopes": dict(self.slopes)}

    def load_state_dict(self, state: dict) -> None:
        for name in ("integral", "temperature", "log_t0", "targets", "slopes"):
            value = state.get(name)
            if value is not None:
                getattr(self, name).update({b: float(v) for b, v in value.items() if b in self.branches})
        self.apply()
