"""The MADTP++ compression pipeline end to end: a dense Hugging Face model in, a token- and weight-pruned model out,
with the numbers that say what it cost and what it saved.

    result = compress(model, task, train_dataset, eval_data, CompressConfig(target_gflops_reduction=0.5,
                      train=TrainConfig(...)), collate_fn, output_dir)

Steps (one teacher and one dense measurement; then, per target, on the model itself or, with several targets,
on a copy of it each):
 1. `task.prepare(model)` where the task has one (the CLIP matching head), then the teacher: `make_teacher`, a
    frozen copy of the dense model. The dense model is measured: metric, GFLOPs (madtp.count_flops over the
    eval batches), parameters, latency.
 2. `madtp.apply` (pruning off), `measure_sensitivity` on calibration batches of the training set (batches of
    different sizes, so the cost model is pinned down) over the temperature grid, `split_budget` relative to
    the dense model's GFLOPs with the 2:4 credit when weight sparsity is 2:4. A target the grid cannot meet is
    refused here, the best reachable reduction named (with unreachable="closest": replaced by it).
 3. Per-branch GFLOPs targets: the grid point split_budget chose lies at or under the budget; the slack is
    handed back to the pruned branches (in proportion to what each saves), so the model lands on the budget
    rather than on the grid point below it, and each start temperature is interpolated (in log T) to its target.
 4. `prepare_sparse_training` (SR-STE N:M masks), then the Trainer with a `DistillationTask` (task loss + alpha *
    MAG alignment + beta_v / beta_t layer-summary MSE + gamma * T^2 KL on the task's logits) and the
    `TemperatureController` (holding each branch's GFLOPs at its target as the weights move). `settle_steps`
    no-grad forwards in training mode then let the controller settle on the final weights.
 5. `export_sparse` (2:4 -> madtp_kernels.SparseLinear; another N:M pattern stays a masked dense Linear: nothing
    runs it faster), the compressed model measured as the dense one was (GFLOPs counted on the execution that
    runs: 2:4 Linear at half), its latency in both executions, and `madtp.serialization.save` to
    <output_dir>/model.
 6. report.json, report.md, a printed table and accuracy_vs_gflops.png in output_dir.

Resume: with `TrainConfig.resume` the Trainer restores the latest checkpoint under <output_dir>/checkpoints (or
the path given), controller state included; steps 1-3 are deterministic and are recomputed (they are forwards
only). A resume with no checkpoint yet starts from step 0. With several targets each has its own directory
<output_dir>/target-<t>/ (model, checkpoints, metrics.jsonl); one report and one plot cover them all.

GFLOPs (the budget's reference, the sensitivity table, the controller's targets, the report) all count one thing:
what the task's inference runs per sample, the model calls `task.cost_inputs(batch)` lists (a task without it:
`task.model_inputs`), summed, per sample of the batch. ClipRetrieval, ImageTextMatching, BlipVQA: the main pass;
BlipRetrieval: ITC (ranking) + ITM on the true pairs (re-ranking), as the Hugging Face model runs them (its ITM call
encodes the image again). Training-only passes (hard negatives) run in `madtp.tasks.auxiliary_pass` and are not
counted by the table or the controller; compress checks that the table counts what count_gflops counts.

Timings are labelled with the device they were taken on ("CPU" or "GPU (<name>)"): CPU numbers say nothing about
the GPU kernels. Under torchrun the Trainer runs DDP; every rank measures (the same figures), rank 0 alone
writes the model and the report.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, Dataset

from ..config import MADTPConfig
from ..patch import recording
from ..train import TrainConfig, Trainer, latest_checkpoint, seed_everything
from .budget import (
    BRANCHES,
    WEIGHT_SPARSITY,
    SensitivityTable,
    TemperatureController,
    cross_saving,
    measure_sensitivity,
    split_budget,
)
from .distill import distillation_loss, kd_loss, make_teacher, teacher_forward
from .hwp import ACCELERATED, _count, _sparsity_of, export_sparse, prepare_sparse_training, sparsity_report

__all__ = ["CompressConfig", "CompressResult", "Measurement", "TargetResult", "DistillationTask", "compress",
           "measure", "write_report", "format_table", "plot_accuracy_vs_gflops", "device_label"]

TOLERANCE = 0.05   # how far from the GFLOPs budget a compressed model may land before compress says so
DEFAULT_TEMPERATURES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
REPORT_JSON, REPORT_MD, PLOT_PNG, MODEL_DIR = "report.json", "report.md", "accuracy_vs_gflops.png", "model"


# ------------------------------------------------------------------ configuration

def _number(name: str, value, lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False,
            reason: str = "") -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and \
        (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name}: expected a number in {left}{lo:g}, {hi:g}{right}, got {value!r}{reason}")
    return float(value)


def _int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")
    return value


@dataclass(frozen=True)
class CompressConfig:
    """What `compress` does. Every field is checked here; a bad value raises ValueError naming the field.

    target_gflops_reduction  fraction of the dense model's GFLOPs per sample to remove, in (0, 1); a sequence
                             compresses one model per target (one point each in the plot)
    weight_sparsity          "2:4" (Sparse Tensor Cores; the Linear layers count at half), None (token pruning
                             only), or another "N:M" with allow_unaccelerated=True (trained and reported, but no
                             hardware runs it faster: its GFLOPs count as dense and it is saved as masked dense)
    num_alignment_tokens, prune_vision, prune_text, prune_layers, execution, importance    the MADTPConfig of the
                             model (importance: "minmax" ours, "official" the published MADTP token importance)
    temperatures             the grid measure_sensitivity and split_budget search over
    calibration_batches      training batches the sensitivity table and the cost model are measured on (sizes
                             alternate between micro_batch_size and half of it, so the cost model is pinned down)
    alpha, beta_v, beta_t, gamma, kd_temperature    distillation weights (madtp.compress.distill); gamma's KL is
                             on the task's logits (task.logits) at temperature kd_temperature, times T^2
    srste_decay              SR-STE decay on the pruned weights (divided by the accumulation, per micro-batch)
    controller_kp, controller_ki   the TemperatureController's gains
    settle_steps             no-grad training-mode forwards after training, over which the controller settles the
                             temperatures on the final weights (0: none)
    latency_repeats          timed forwards per latency figure (the median is reported; one warm-up before)
    unreachable              a target beyond what the grid reaches: "error" (ValueError naming the best reachable
                             reduction) or "closest" (compress to the deepest reachable reduction, said in the log;
                             the report's gflops_vs_budget then exceeds 1)
    train                    the TrainConfig (its output_dir is replaced by compress's output_dir); None: defaults
    """
    target_gflops_reduction: float | tuple[float, ...] = 0.5
    weight_sparsity: str | None = "2:4"
    allow_unaccelerated: bool = False
    num_alignment_tokens: int = 16
    prune_vision: bool = True
    prune_text: bool = True
    prune_layers: tuple[int, ...] | None = None
    execution: str = "ragged"
    importance: str = "minmax"
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    calibration_batches: int = 4
    alpha: float = 0.1
    beta_v: float = 1.0
    beta_t: float = 1.0
    gamma: float = 1.0
    kd_temperature: float = 2.0
    srste_decay: float = 2e-4
    controller_kp: float = 0.2
    controller_ki: float = 0.3
    settle_steps: int = 8
    latency_repeats: int = 5
    unreachable: str = "error"
    train: TrainConfig | None = None

    def __post_init__(self):
        targets = self.target_gflops_reduction
        many = isinstance(targets, (list, tuple))
        values = list(targets) if many else [targets]
        if not values:
            raise ValueError("target_gflops_reduction: expected a fraction in (0, 1) or a non-empty sequence of them")
        for v in values:
            _number("target_gflops_reduction", v, 0.0, 1.0, lo_open=True, hi_open=True,
                    reason=" (a reduction >= 1 would leave no GFLOPs at all: it cannot be met)"
                    if not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 1 else "")
        if len(set(values)) != len(values):
            raise ValueError(f"target_gflops_reduction: the targets must differ, got {values}")
        object.__setattr__(self, "target_gflops_reduction", tuple(float(v) for v in values) if many
                           else float(values[0]))
        if not isinstance(self.allow_unaccelerated, bool):
            raise ValueError(f"allow_unaccelerated: expected a bool, got {self.allow_unaccelerated!r}")
        object.__setattr__(self, "weight_sparsity", _check_pattern(self.weight_sparsity, self.allow_unaccelerated))
        # MADTPConfig checks its own fields (the same names)
        MADTPConfig(num_alignment_tokens=self.num_alignment_tokens, prune_layers=self.prune_layers,
                    execution=self.execution, importance=self.importance)
        if self.prune_layers is not None:
            object.__setattr__(self, "prune_layers", tuple(sorted(set(self.prune_layers))))
        for name in ("prune_vision", "prune_text"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        grid = self.temperatures
        if isinstance(grid, (str, bytes)) or not isinstance(grid, (list, tuple)) or not grid or not all(
                not isinstance(t, bool) and isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in grid):
            raise ValueError(f"temperatures: expected a non-empty sequence of numbers > 0, got {grid!r}")
        object.__setattr__(self, "temperatures", tuple(sorted({float(t) for t in grid})))
        _int("calibration_batches", self.calibration_batches, 1)
        for name in ("alpha", "beta_v", "beta_t", "gamma", "srste_decay", "controller_kp", "controller_ki"):
            _number(name, getattr(self, name), 0.0)
        _number("kd_temperature", self.kd_temperature, 0.0, lo_open=True)
        _int("settle_steps", self.settle_steps, 0)
        _int("latency_repeats", self.latency_repeats, 1)
        if self.unreachable not in ("error", "closest"):
            raise ValueError(f"unreachable: expected 'error' or 'closest', got {self.unreachable!r}")
        if self.train is not None and not isinstance(self.train, TrainConfig):
            raise ValueError(f"train: expected a madtp.train.TrainConfig or None, got {type(self.train).__name__}")

    @property
    def targets(self) -> tuple[float, ...]:
        t = self.target_gflops_reduction
        return t if isinstance(t, tuple) else (t,)

    @property
    def budget_sparsity(self) -> str | None:
        """What split_budget credits: 2:4 only (no hardware runs another pattern faster)."""
        return ACCELERATED if self.weight_sparsity == ACCELERATED else None

    def madtp_config(self) -> MADTPConfig:
        return MADTPConfig(num_alignment_tokens=self.num_alignment_tokens, temperature=None,
                           prune_vision=self.prune_vision, prune_text=self.prune_text, execution=self.execution,
                           prune_layers=self.prune_layers, importance=self.importance)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        out["train"] = self.train.to_dict() if self.train is not None else None
        return out


def _check_pattern(pattern, allow_unaccelerated: bool) -> str | None:
    if pattern is None or (isinstance(pattern, str) and pattern.strip().lower() in ("none", "dense", "")):
        return None
    if not isinstance(pattern, str):
        raise ValueError(f"weight_sparsity: expected '2:4', None or 'N:M', got {pattern!r}")
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise ValueError(f"weight_sparsity: expected '2:4', 'none' or 'N:M', got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"weight_sparsity: expected 'N:M' with 0 < N < M, got {pattern!r}")
    pattern = f"{n}:{m}"
    if pattern != ACCELERATED and not allow_unaccelerated:
        raise ValueError(f"weight_sparsity: {pattern!r} runs no faster than dense on any hardware (Sparse Tensor "
                         f"Cores accelerate {ACCELERATED} only); set allow_unaccelerated to train it anyway")
    return pattern


# ------------------------------------------------------------------ results

@dataclass
class Measurement:
    """One model's numbers. gflops: per sample ("vision", "text", "total") as madtp.count_flops counts them
    (2:4 SparseLinear at half), averaged over the eval batches; parameters / nonzero: the whole model,
    dense-equivalent (a SparseLinear counts in * out + bias) / non-zero; latency_ms: median per forward of the
    latency batch, by execution ("dense", "padded", "ragged"), on `device`."""
    label: str
    metric: dict[str, float]
    gflops: dict[str, float]
    parameters: int
    nonzero: int
    latency_ms: dict[str, float]
    device: str
    encoder: dict[str, float] = field(default_factory=dict)   # sparsity_report()["total"] of the towers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TargetResult:
    target_gflops_reduction: float
    achieved_gflops_reduction: float          # 1 - compressed total / dense total, on the eval batches
    budget_gflops: float                      # (1 - target) * dense total, on the eval batches
    gflops_vs_budget: float                   # compressed total / budget: 1 is on target, > 1 over it
    start_temperatures: dict[str, float | None]
    temperatures: dict[str, float | None]     # final (saved with the model)
    branch_targets: dict[str, float]          # controller targets, GFLOPs per sample, dense-weight-equivalent
    weight_sparsity: str | None
    measurement: Measurement
    model_dir: Path
    train_logs: dict[str, float]
    steps: int
    resumed_from: str | None
    sensitivity: dict = field(default_factory=dict)   # the table split_budget chose from (GFLOPs, loss per T)
    model: nn.Module | None = None

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(
            dataclasses.replace(self, model=None, measurement=None)).items() if k not in ("model", "measurement")}
        out["model_dir"] = str(self.model_dir)
        out["measurement"] = self.measurement.to_dict()
        return out


@dataclass
class CompressResult:
    dense: Measurement
    targets: list[TargetResult]
    output_dir: Path
    report_json: Path
    report_md: Path
    plot: Path
    metric_name: str
    table: str

    @property
    def model(self) -> nn.Module | None:
        """The compressed model of the first (or only) target."""
        return self.targets[0].model if self.targets else None

    def to_dict(self) -> dict:
        return {"dense": self.dense.to_dict(), "targets": [t.to_dict() for t in self.targets],
                "output_dir": str(self.output_dir), "metric_name": self.metric_name}


# ------------------------------------------------------------------ the training objective

def model_inputs(task, batch: dict, model: nn.Module) -> dict:
    """task.model_inputs(batch) (passing the model where the task's signature takes it: ImageTextMatching)."""
    fn = task.model_inputs
    params = inspect.signature(fn).parameters
    return fn(batch, model) if len(params) >= 2 else fn(batch)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class DistillationTask:
    """The MADTP++ objective around a downstream task (a madtp.tasks task):

        loss = task loss + alpha * MAG alignment + beta_v / beta_t * layer-summary MSE + gamma * T^2 KL

    The KL compares task.logits of the student's pass with task.logits of the teacher's (from the teacher output
    of teacher_forward where the task can read it, else from task.forward on the teacher). Terms that the model
    cannot give are left out and say so once in the logs as 0: the alignment loss where a forward does not run
    both branches' alignment (VQA: the question encoder is not pruned), a branch's MSE where that branch did not
    run. The task's own logged terms are kept; its loss is logged as "task"."""

    def __init__(self, task, teacher: nn.Module, *, alpha: float = 0.0, beta_v: float = 0.0, beta_t: float = 0.0,
                 gamma: float = 0.0, kd_temperature: float = 1.0):
        for name in ("forward", "logits", "model_inputs"):
            if not callable(getattr(task, name, None)):
                raise TypeError(f"task: expected a madtp.tasks task with {name}(), got {type(task).__name__}")
        self.task, self.teacher = task, teacher
        self.alpha, self.beta_v, self.beta_t, self.gamma = alpha, beta_v, beta_t, gamma
        self.kd_temperature = kd_temperature

    def _teacher_logits(self, t_out, batch: dict) -> Tensor:
        if t_out is not None:
            try:
                return self.task.logits(t_out.outputs)
            except TypeError:
                pass
        with torch.no_grad():
            return self.task.forward(self.teacher, batch)[0].logits.detach()

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        with recording(_unwrap(model)):   # the alignment and summary terms, with or without autograd
            out, logs = self.task.forward(model, batch)
        records = _unwrap(model).madtp.records
        need_summaries = self.beta_v or self.beta_t
        t_out = teacher_forward(self.teacher, **model_inputs(self.task, batch, self.teacher)) \
            if need_summaries else None
        ran = {b: b in records and bool(records[b].summaries) and t_out is not None and b in t_out.summaries
               for b in BRANCHES}
        aligned = all(b in records and records[b].pooled is not None for b in BRANCHES)
        parts = distillation_loss(model, self.teacher, out.output, t_out, task_loss=logs["loss"],
                                  alpha=self.alpha if aligned else 0.0,
                                  beta_v=self.beta_v if ran["vision"] else 0.0,
                                  beta_t=self.beta_t if ran["text"] else 0.0)
        if self.gamma:
            kd = kd_loss(self.task.logits(out), self._teacher_logits(t_out, batch), self.kd_temperature)
            parts["kd"] = kd
            parts["loss"] = parts["loss"] + self.gamma * kd
        extra = {k: v for k, v in logs.items() if k != "loss" and k not in parts}
        return {**extra, **parts}

    def metric(self, model: nn.Module, loader) -> dict[str, float]:
        return self.task.metric(model, loader)


# ------------------------------------------------------------------ measuring

def device_label(device: torch.device | str | None = None) -> str:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return f"GPU ({torch.cuda.get_device_name(device)})"
    return f"CPU ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})"


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    return batch


def _batch_size(inputs: dict) -> int:
    for name in ("pixel_values", "input_ids"):
        if isinstance(inputs.get(name), Tensor):
            return int(inputs[name].shape[0])
    return 1


def cost_inputs(task, batch: dict, model: nn.Module) -> list[dict]:
    """The model calls whose GFLOPs are the model's for this task (task.cost_inputs, passing the model where its
    signature takes it; a task without it: [task.model_inputs(batch)]), each over the batch's samples."""
    fn = getattr(task, "cost_inputs", None)
    if not callable(fn):
        return [model_inputs(task, batch, model)]
    passes = fn(batch, model) if len(inspect.signature(fn).parameters) >= 2 else fn(batch)
    if not passes or not all(isinstance(p, dict) for p in passes):
        raise TypeError(f"task: {type(task).__name__}.cost_inputs must return a non-empty list of model-input "
                        f"dicts, got {passes!r:.80}")
    return list(passes)


def gflops_definition(task) -> str:
    """What the model's GFLOPs count for this task, in words (the first line of cost_inputs' docstring)."""
    doc = inspect.getdoc(getattr(task, "cost_inputs", None)) if callable(getattr(task, "cost_inputs", None)) \
        else None
    what = doc.splitlines()[0].rstrip(".") if doc else "the main pass (task.model_inputs)"
    if what[1:2].islower():   # "The paired pass" -> "the paired pass"; "ITC ..." stays
        what = what[:1].lower() + what[1:]
    return f"{type(task).__name__}: {what}"


def _batch_samples(task, batch: dict, model: nn.Module) -> int:
    return _batch_size(model_inputs(task, batch, model))


def count_gflops(model: nn.Module, task, batches: Sequence[dict]) -> dict[str, float]:
    """madtp.count_flops over the batches, per sample, weighted by batch size: each batch's passes
    (`cost_inputs`: what the task's inference runs; BLIP retrieval ITC + ITM) summed."""
    from ..flops import count_flops

    device = _device_of(model)
    totals, samples = {"vision": 0.0, "text": 0.0, "total": 0.0}, 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = _to(batch, device)
            b = _batch_samples(task, batch, model)
            for inputs in cost_inputs(task, batch, model):
                if _batch_size(inputs) != b:
                    raise ValueError(f"task: {type(task).__name__}.cost_inputs gave a pass over "
                                     f"{_batch_size(inputs)} samples, the batch has {b}: each pass runs over the "
                                     "batch's samples")
                counted = count_flops(model, **inputs)
                for k in totals:
                    totals[k] += counted[k] * b
            samples += b
    finally:
        model.train(was_training)
    if not samples:
        raise ValueError("eval_data: no batches to count GFLOPs on")
    return {k: v / samples for k, v in totals.items()}


@torch.no_grad()
def time_forward(model: nn.Module, inputs: dict, repeats: int = 5) -> float:
    """Median milliseconds of model(**inputs) over `repeats` timed calls after one warm-up."""
    device = _device_of(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    try:
        model(**inputs)
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            model(**inputs)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        model.train(was_training)
    return statistics.median(times)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(dense-equivalent parameters, non-zero parameters) of the whole model (SparseLinear: in * out + bias;
    an SR-STE layer: its masked weight)."""
    params = nonzero = 0
    for module in model.modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue
        p, nz, _ = _count(module)
        params += p
        nonzero += nz
    return int(params), int(nonzero)


def measure(model: nn.Module, task, eval_batches: Sequence[dict], label: str, *, latency_inputs: dict | None,
            repeats: int = 5, executions: Sequence[str] = ("dense",)) -> Measurement:
    """Metric, GFLOPs, parameter counts and latency of a model (eval mode). executions: "dense" times the model
    as it is; "padded" / "ragged" time a madtp-applied model in that execution (restored after)."""
    from ..patch import ATTRIBUTE, MADTPState, set_execution

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            metric = {k: float(v) for k, v in task.metric(model, eval_batches).items()}
        gflops = count_gflops(model, task, eval_batches)
        params, nonzero = parameter_counts(model)
        latency = {}
        if latency_inputs is not None:
            inputs = model_inputs(task, _to(latency_inputs, _device_of(model)), model)
            state = getattr(model, ATTRIBUTE, None)
            saved = state.execution if isinstance(state, MADTPState) else None
            try:
                for execution in executions:
                    if execution != "dense":
                        set_execution(model, execution)
                    latency[execution] = time_forward(model, inputs, repeats)
            finally:
                if saved is not None:
                    set_execution(model, saved)
        try:
            encoder = dict(sparsity_report(model)["total"])
        except ValueError:
            encoder = {}
    finally:
        model.train(was_training)
    return Measurement(label, metric, gflops, params, nonzero, latency, device_label(_device_of(model)), encoder)


# ------------------------------------------------------------------ the budget plan

def _calibration_batches(dataset, collate_fn, micro_batch_size: int, count: int) -> list[dict]:
    """`count` batches of consecutive training samples, sizes alternating B and ceil(B/2): two shapes (and the
    texts' own lengths) so the cost model's terms are pinned down."""
    sizes = [micro_batch_size if i % 2 == 0 else max(1, (micro_batch_size + 1) // 2) for i in range(count)]
    n = len(dataset)
    batches, start = [], 0
    for size in sizes:
        idx = [(start + j) % n for j in range(size)]
        start += size
        batches.append(collate_fn([dataset[i] for i in idx]))
    return batches


def sensitivity(model: nn.Module, task, calib: Sequence[dict], temperatures: Sequence[float]) -> SensitivityTable:
    """The sensitivity table compress budgets with: the loss is task.loss on the whole batch (hard negatives
    included), the GFLOPs its passes outside `auxiliary_pass`, per sample: the passes count_gflops counts."""
    return measure_sensitivity(model, calib, temperatures, lambda m, b: task.loss(m, b)["loss"],
                               batch_size=lambda b: _batch_samples(task, b, model))


def _check_same_passes(model: nn.Module, table: SensitivityTable, task, calib: Sequence[dict]) -> None:
    """The table must count the passes count_gflops counts (the report's and the reference's): on the same
    batches with pruning off (as the model is here) the two agree."""
    table_gflops, counted = table.dense.gflops["total"], count_gflops(model, task, calib)["total"]
    if not math.isclose(table_gflops, counted, rel_tol=1e-6):
        raise ValueError(f"task: {type(task).__name__}.loss runs model passes worth {table_gflops:.6g} GFLOPs per "
                         f"sample with pruning off, its cost_inputs {counted:.6g}: the sensitivity table would "
                         "budget another quantity than the report counts. Run training-only passes (hard negatives) "
                         "inside madtp.tasks.auxiliary_pass(model), or list every inference pass in cost_inputs")


def _interpolate_temperature(table: SensitivityTable, branch: str, target: float, fallback: float) -> float:
    """The temperature whose GFLOPs (log-linear between grid points) equal target; fallback outside the grid."""
    points = [(math.log(e.temperature), e.gflops[branch]) for e in table.entries[branch]]
    for (t0, g0), (t1, g1) in zip(points, points[1:], strict=False):
        lo, hi = min(g0, g1), max(g0, g1)
        if lo <= target <= hi and g0 != g1:
            return math.exp(t0 + (target - g0) / (g1 - g0) * (t1 - t0))
    return fallback


def plan_targets(table: SensitivityTable, temperatures: dict[str, float | None], budget: float,
                 weight_sparsity: str | None) -> tuple[dict[str, float], dict[str, float]]:
    """(per-branch GFLOPs targets (dense-weight-equivalent, per sample), start temperatures) for the branches
    split_budget prunes. The chosen grid point's total is at most `budget`; the slack is given back to the pruned
    branches in proportion to what each saves (in effective GFLOPs: a 2:4 Linear counts at half), capped at
    their dense cost."""
    factor = WEIGHT_SPARSITY[weight_sparsity]
    pruned = [b for b in table.branches if temperatures.get(b) is not None]
    chosen = {b: table.entry(b, temperatures.get(b)) for b in table.branches}
    # what each branch runs with the others pruned too (BLIP's text projects fewer image rows), as split_budget
    # counts it: the controller measures the branch in that company
    cross = {b: cross_saving(table, chosen, b) for b in table.branches}
    own = {b: e.gflops[b] - cross[b] for b, e in chosen.items()}
    total = table.dense.gflops["other"] + sum(own[b] - (1 - factor) * (e.linear[b] - cross[b])
                                              for b, e in chosen.items())
    slack = max(0.0, budget - total)
    ratio, savings = {}, {}
    for b in pruned:
        e = chosen[b]
        ratio[b] = 1 - (1 - factor) * (e.linear[b] - cross[b]) / own[b] if own[b] else 1.0
        # a branch whose GFLOPs do not move over the grid cannot absorb slack: it stays at its grid point
        savings[b] = max(0.0, table.dense.gflops[b] - e.gflops[b]) * ratio[b] if controllable(table, b) else 0.0
    weight = sum(savings.values())
    targets, starts = {}, {}
    for b in pruned:
        give = min(savings[b], slack * savings[b] / weight) if weight else 0.0
        # no more than the least pruning of the grid: below its lowest temperature the GFLOPs need not rise
        # (every pruning layer drops its least important tokens at any temperature), and a target there would
        # only wind the controller up against its clamp
        reachable = max(e.gflops[b] for e in table.entries[b]) - cross[b]
        targets[b] = min(own[b] + give / ratio[b], max(reachable, own[b]))
        # the table's curve ran the other branches unpruned: without their saving
        starts[b] = _interpolate_temperature(table, b, targets[b] + cross[b], temperatures[b])
    return targets, starts


def controllable(table: SensitivityTable, branch: str) -> bool:
    """Whether the branch's GFLOPs move over the temperature grid (a controller has something to act on)."""
    values = [e.gflops[branch] for e in table.entries.get(branch, [])]
    return bool(values) and max(values) - min(values) > 1e-9 * max(abs(v) for v in values)


def _controller(model, table: SensitivityTable, temperatures, targets, starts, config: CompressConfig):
    """The controller over the branches whose GFLOPs the temperature moves (None if there are none); the other
    pruned branches keep their grid temperature."""
    from ..patch import set_temperature

    held = {b: temperatures[b] for b in targets if not controllable(table, b)}
    set_temperature(model, **held)
    moving = {b: temperatures[b] for b in targets if b not in held}
    if not moving:
        return None
    probe = TemperatureController.from_table(model, table, moving)   # the slopes at the chosen grid point
    probe.close()
    kw = {"kp": config.controller_kp, "ki": config.controller_ki}
    return TemperatureController(model, table.cost_model, {b: targets[b] for b in moving},
                                 {b: starts[b] for b in moving}, probe.slopes, **kw)


# ------------------------------------------------------------------ the pipeline

_START = [time.perf_counter()]


def _say(verbose: bool, *msg) -> None:
    if verbose:
        print(f"[madtp compress {time.perf_counter() - _START[0]:7.1f}s]", *msg, file=sys.stderr, flush=True)


def _eval_batches(eval_data, collate_fn, batch_size: int) -> list:
    if isinstance(eval_data, Dataset) or (hasattr(eval_data, "__getitem__") and hasattr(eval_data, "__len__")
                                          and not isinstance(eval_data, (list, tuple))):
        eval_data = DataLoader(eval_data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    batches = list(eval_data)
    if not batches:
        raise ValueError("eval_data: the eval set yielded no batches")
    return batches


def _train_config(config: CompressConfig, run_dir: Path) -> TrainConfig:
    train = config.train or TrainConfig(output_dir=str(run_dir), max_steps=100, micro_batch_size=16, lr=1e-4)
    default_ckpt = os.path.join(train.output_dir, "checkpoints")
    checkpoint_dir = None if os.path.normpath(train.checkpoint_dir) == os.path.normpath(default_ckpt) \
        else train.checkpoint_dir
    return dataclasses.replace(train, output_dir=str(run_dir), checkpoint_dir=checkpoint_dir)


def _pick_device(train: TrainConfig) -> torch.device:
    if train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False")
        return torch.device("cuda")
    return torch.device("cpu")


def _check_model(model: nn.Module) -> None:
    from .. import models
    from ..patch import ATTRIBUTE, MADTPState

    if not isinstance(model, models.MODELS):
        names = ", ".join(m.__name__ for m in models.MODELS)
        raise ValueError(f"model: {type(model).__name__} is not supported; supported classes: {names}")
    if isinstance(getattr(model, ATTRIBUTE, None), MADTPState):
        raise ValueError("model: madtp.apply was already called on it; compress starts from the dense model")


def _finish_weights(model: nn.Module, pattern: str | None) -> None:
    if pattern is None:
        return
    if pattern == ACCELERATED:
        export_sparse(model)
        return
    for module in list(model.modules()):   # no packed format: keep the masked weight as a plain Linear
        if _sparsity_of(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


@torch.no_grad()
def _settle(model: nn.Module, controller: TemperatureController, task, batches: Sequence[dict], steps: int) -> None:
    """Forwards in training mode (no grad) with a controller update after each: the temperatures settle on the
    final weights (training moved what each temperature keeps)."""
    if not steps or not batches:
        return
    device = _device_of(model)
    was_training = model.training
    model.train()
    try:
        controller.measure()   # drop whatever the last training step left
        for i in range(steps):
            task.forward(model, _to(batches[i % len(batches)], device))
            controller.update(controller.measure())
    finally:
        model.train(was_training)


def _compress_one(model, teacher, task, train_dataset, collate_fn, eval_batches, latency_batch, config,
                  target: float, run_dir: Path, dense: Measurement, dense_calib: float, verbose: bool
                  ) -> TargetResult:
    from ..patch import ATTRIBUTE, apply, set_temperature
    from ..serialization import save

    train_cfg = _train_config(config, run_dir)
    seed_everything(train_cfg.seed)
    apply(model, config.madtp_config())
    calib = _calibration_batches(train_dataset, collate_fn, train_cfg.micro_batch_size, config.calibration_batches)
    device = _device_of(model)
    calib = [_to(b, device) for b in calib]
    _say(verbose, f"target {target:g}: sensitivity over {len(config.temperatures)} temperatures x "
                  f"{len(calib)} calibration batches")
    table = sensitivity(model, task, calib, config.temperatures)
    _check_same_passes(model, table, task, calib)
    try:
        temps = split_budget(table, target, dense_gflops=dense_calib, weight_sparsity=config.budget_sparsity,
                             unreachable=config.unreachable)
    except ValueError as e:
        raise ValueError(f"{e}; lower the target, widen the temperature grid or prune more layers") from None
    budget_calib = (1 - target) * dense_calib
    branch_targets, starts = plan_targets(table, temps, budget_calib, config.budget_sparsity)
    _say(verbose, f"target {target:g}: grid choice {temps}, branch GFLOPs targets "
                  f"{ {b: round(v, 6) for b, v in branch_targets.items()} }, start temperatures "
                  f"{ {b: round(v, 4) for b, v in starts.items()} }")
    set_temperature(model, vision=None, text=None)
    controller = _controller(model, table, temps, branch_targets, starts, config) if branch_targets else None
    if config.weight_sparsity is not None:
        with warnings.catch_warnings():
            if config.allow_unaccelerated:
                warnings.filterwarnings("ignore", message="pattern .* only 2:4 is accelerated")
            prepare_sparse_training(model, config.weight_sparsity, decay=config.srste_decay / train_cfg.accumulation,
                                    allow_unaccelerated=config.allow_unaccelerated)
    if train_cfg.resume is True and latest_checkpoint(train_cfg.checkpoint_dir) is None:
        _say(verbose, f"resume: no checkpoint in {train_cfg.checkpoint_dir} yet; starting from step 0")
        train_cfg = dataclasses.replace(train_cfg, resume=False)
    objective = DistillationTask(task, teacher, alpha=config.alpha, beta_v=config.beta_v, beta_t=config.beta_t,
                                 gamma=config.gamma, kd_temperature=config.kd_temperature)
    trainer = Trainer(model, objective, train_dataset, train_cfg, collate_fn=collate_fn,
                      eval_loader=eval_batches if train_cfg.eval_every else None,
                      callbacks=[controller] if controller is not None else [])
    try:
        if trainer.resumed_from is not None:
            _say(verbose, f"resumed from {trainer.resumed_from} (step {trainer.step})")
        _say(verbose, f"target {target:g}: training to step {train_cfg.max_steps} (checkpoints in "
                      f"{train_cfg.checkpoint_dir})")
        logs = trainer.fit()
        steps, resumed = trainer.step, trainer.resumed_from
    finally:
        trainer.close()
    if controller is not None:
        _settle(model, controller, task, calib, config.settle_steps)
        controller.close()
    _finish_weights(model, config.weight_sparsity)
    model.eval()
    _say(verbose, f"target {target:g}: measuring the compressed model")
    executions = ("padded", "ragged")
    measurement = measure(model, task, eval_batches, f"compressed (target {target:g})",
                          latency_inputs=latency_batch, repeats=config.latency_repeats, executions=executions)
    model_dir = run_dir / MODEL_DIR
    if _is_main():   # under torchrun every rank holds the same model: one writes it
        save(model, model_dir)
    _barrier()
    temperatures = dict(getattr(model, ATTRIBUTE).temperature)
    budget = (1 - target) * dense.gflops["total"]
    achieved = 1 - measurement.gflops["total"] / dense.gflops["total"]
    ratio = measurement.gflops["total"] / budget
    _say(verbose, f"target {target:g}: achieved reduction {achieved:.4f} (GFLOPs {measurement.gflops['total']:.6g} "
                  f"= {ratio:.3f} x the budget {budget:.6g}), model saved to {model_dir}")
    if ratio < 1 - TOLERANCE:
        _say(verbose, f"target {target:g}: {1 - ratio:.1%} under the budget: the token pruning cannot spend less "
                      "(at the grid's lowest temperature the pruned branches already drop more; see the "
                      "sensitivity table in report.json), or 2:4 alone exceeds the target")
    elif ratio > 1 + TOLERANCE and config.unreachable == "closest":
        _say(verbose, f"target {target:g}: {ratio - 1:.1%} over the budget: beyond what token pruning can reach "
                      "with this model and grid, compressed to the deepest reachable reduction instead "
                      "(unreachable='closest')")
    elif ratio > 1 + TOLERANCE:
        _say(verbose, f"target {target:g}: {ratio - 1:.1%} over the budget on the eval data (the controller held "
                      "it on the training batches); more --settle-steps or a higher target may help")
    start = {b: starts.get(b, temps.get(b)) if temps.get(b) is not None else None for b in BRANCHES}
    return TargetResult(target, achieved, budget, ratio, start, temperatures, branch_targets, config.weight_sparsity,
                        measurement, model_dir, {k: float(v) for k, v in logs.items()}, steps,
                        str(resumed) if resumed else None, table_summary(table), model)


def table_summary(table: SensitivityTable) -> dict:
    """The sensitivity table as JSON: per branch and temperature, GFLOPs per sample (dense-weight-equivalent)
    of that branch and the calibration loss, with only that branch pruned."""
    return {"execution": table.execution, "dense": {"loss": table.dense.loss, "gflops": table.dense.gflops},
            **{b: [{"temperature": e.temperature, "loss": e.loss, "gflops": e.gflops[b]} for e in entries]
               for b, entries in table.entries.items()}}


def compress(model: nn.Module, task, train_dataset, eval_data, config: CompressConfig,
             collate_fn: Callable | None = None, output_dir: str | os.PathLike | None = None, *,
             verbose: bool = True) -> CompressResult:
    """Compress `model` for `task` (module docstring). eval_data: a map-style dataset (batched with collate_fn and
    the micro-batch size) or an iterable of batches. With one target the model is compressed in place (and
    returned as result.model); with several, each target compresses a copy. Writes into output_dir (default
    config.train.output_dir): model/ (or target-<t>/model/), report.json, report.md, accuracy_vs_gflops.png."""
    if not isinstance(config, CompressConfig):
        raise TypeError(f"config: expected a CompressConfig, got {type(config).__name__}")
    if output_dir is None:
        if config.train is None:
            raise ValueError("output_dir: give an output directory (or a config.train with one)")
        output_dir = config.train.output_dir
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir: {out} exists and is not a directory")
    _check_model(model)
    for name in ("loss", "forward", "logits", "model_inputs", "metric"):
        if not callable(getattr(task, name, None)):
            raise TypeError(f"task: expected a madtp.tasks task (with {name}()), got {type(task).__name__}")
    if not (hasattr(train_dataset, "__len__") and hasattr(train_dataset, "__getitem__")):
        raise TypeError(f"train_dataset: expected a map-style dataset, got {type(train_dataset).__name__}")
    collate_fn = collate_fn or torch.utils.data.default_collate
    base_train = _train_config(config, out)
    global_batch = base_train.micro_batch_size * base_train.accumulation
    if len(train_dataset) < global_batch:
        raise ValueError(f"train_dataset: {len(train_dataset)} samples, fewer than one global batch of {global_batch} "
                         "(micro_batch_size x accumulation)")
    out.mkdir(parents=True, exist_ok=True)
    _START[0] = time.perf_counter()
    device = _pick_device(base_train)
    model.to(device)
    eval_batches = [_to(b, device) for b in _eval_batches(eval_data, collate_fn, base_train.micro_batch_size)]
    latency_batch = eval_batches[0]

    prepare = getattr(task, "prepare", None)
    if callable(prepare):
        prepare(model)
    teacher = make_teacher(model)
    _say(verbose, f"measuring the dense model on {len(eval_batches)} eval batches ({device_label(device)})")
    dense = measure(teacher, task, eval_batches, "dense", latency_inputs=latency_batch,
                    repeats=config.latency_repeats)
    calib = _calibration_batches(train_dataset, collate_fn, base_train.micro_batch_size, config.calibration_batches)
    dense_calib = count_gflops(teacher, task, calib)["total"]

    results = []
    many = len(config.targets) > 1
    for target in config.targets:
        student = copy.deepcopy(model) if many else model
        run_dir = out / f"target-{target:g}" if many else out
        results.append(_compress_one(student, teacher, task, train_dataset, collate_fn, eval_batches,
                                     latency_batch, config, target, run_dir, dense, dense_calib, verbose))
    metric_name = primary_metric(dense.metric)
    report = {
        "task": type(task).__name__, "model_class": type(model).__name__, "device": dense.device,
        "metric_name": metric_name, "config": config.to_dict(), "dense": dense.to_dict(),
        "compressed": [r.to_dict() for r in results],
        "notes": ["GFLOPs per sample as madtp.count_flops counts them: 2:4 SparseLinear at half; other N:M patterns "
                  "as dense (no hardware runs them faster)",
                  f"GFLOPs per sample count what the task's inference runs, {gflops_definition(task)}; the budget, "
                  "the sensitivity table and the controller count the same passes (training-only hard negatives "
                  "left out)",
                  f"latency: median of {config.latency_repeats} forwards of one eval batch "
                  f"({_batch_size(model_inputs(task, latency_batch, teacher))} samples) on {dense.device}"],
    }
    if config.weight_sparsity not in (None, ACCELERATED):
        report["notes"].append(f"weight sparsity {config.weight_sparsity}: no hardware runs it faster than dense; its "
                               "GFLOPs count as dense and the model holds it as masked dense Linear layers")
    paths = write_report(report, out) if _is_main() else _report_paths(out)
    _barrier()
    table = format_table(report)
    if verbose and _is_main():
        print(table, flush=True)
    return CompressResult(dense, results, out, paths["json"], paths["md"], paths["png"], metric_name, table)


# ------------------------------------------------------------------ reporting

def primary_metric(metric: dict[str, float]) -> str:
    """The metric the plot and the table lead with: accuracy; else retrieval among the true caption and its hard
    negatives; else the mean of the two in-batch recalls; else the first."""
    if "accuracy" in metric:
        return "accuracy"
    if "hard_negative_acc" in metric:
        return "hard_negative_acc"
    if "i2t_r1" in metric and "t2i_r1" in metric:
        return "r1_mean"
    return next(iter(metric), "")


def metric_value(metric: dict[str, float], name: str) -> float:
    if name == "r1_mean":
        return (metric["i2t_r1"] + metric["t2i_r1"]) / 2
    return float(metric.get(name, float("nan")))


def _rows(report: dict) -> list[dict]:
    name = report["metric_name"]
    dense = report["dense"]
    rows = [{"model": "dense", "target": "", "gflops": dense["gflops"]["total"], "reduction": 0.0,
             "metric": metric_value(dense["metric"], name), "parameters": dense["parameters"],
             "nonzero": dense["nonzero"], "latency": dense["latency_ms"]}]
    for r in report["compressed"]:
        m = r["measurement"]
        rows.append({"model": f"compressed ({r['weight_sparsity'] or 'no weight sparsity'})",
                     "target": f"{r['target_gflops_reduction']:g}", "gflops": m["gflops"]["total"],
                     "reduction": r["achieved_gflops_reduction"], "metric": metric_value(m["metric"], name),
                     "parameters": m["parameters"], "nonzero": m["nonzero"], "latency": m["latency_ms"]})
    return rows


def _cells(report: dict) -> tuple[list[str], list[list[str]]]:
    device = report["device"].split(" (")[0]
    head = ["model", "target", "GFLOPs/sample", "reduction", report["metric_name"], "params", "non-zero",
            f"{device} ms dense", f"{device} ms padded", f"{device} ms ragged"]
    body = []
    for r in _rows(report):
        lat = r["latency"]

        def ms(key, lat=lat):
            return f"{lat[key]:.2f}" if key in lat else "-"
        body.append([r["model"], r["target"] or "-", f"{r['gflops']:.4g}", f"{r['reduction']:.1%}",
                     f"{r['metric']:.4f}", f"{r['parameters']:,}", f"{r['nonzero']:,}", ms("dense"), ms("padded"),
                     ms("ragged")])
    return head, body


def format_table(report: dict) -> str:
    """The report as a fixed-width text table."""
    head, body = _cells(report)
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                 for i, (c, w) in enumerate(zip(row, widths, strict=True)))
    rule = "  ".join("-" * w for w in widths)
    title = f"{report['task']} on {report['model_class']}, timed on {report['device']}"
    return "\n".join([title, line(head), rule, *(line(r) for r in body)])


def _markdown(report: dict) -> str:
    head, body = _cells(report)
    lines = [f"# MADTP++ compression report: {report['task']} on {report['model_class']}", "",
             f"Timed on {report['device']}.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", *(f"- {note}" for note in report.get("notes", []))]
    for r in report["compressed"]:
        lines.append(f"- target {r['target_gflops_reduction']:g}: GFLOPs {r['gflops_vs_budget']:.3f} x the budget, "
                     f"temperatures {r['temperatures']}, model `{r['model_dir']}`, {r['steps']} training steps")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_gflops(report: dict, path: str | os.PathLike) -> Path:
    """Metric vs GFLOPs per sample: the dense model and one point per compressed target (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    name = report["metric_name"]
    fig = Figure(figsize=(5.5, 4.0), dpi=100)
    ax = fig.add_subplot()
    d = report["dense"]
    ax.scatter([d["gflops"]["total"]], [metric_value(d["metric"], name)], marker="o", s=60, color="black",
               label="dense", zorder=3)
    xs = [r["measurement"]["gflops"]["total"] for r in report["compressed"]]
    ys = [metric_value(r["measurement"]["metric"], name) for r in report["compressed"]]
    ax.scatter(xs, ys, marker="s", s=50, color="tab:red", label="MADTP++ compressed", zorder=3)
    for r, x, y in zip(report["compressed"], xs, ys, strict=True):
        ax.annotate(f"target -{r['target_gflops_reduction']:.0%}", (x, y), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xlabel("GFLOPs per sample (2:4 Linear at half)")
    ax.set_ylabel(name)
    ax.set_title(f"{report['task']}: {name} vs GFLOPs", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _is_main() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _report_paths(out: Path) -> dict[str, Path]:
    return {"json": out / REPORT_JSON, "md": out / REPORT_MD, "png": out / PLOT_PNG}


def write_report(report: dict, output_dir: str | os.PathLike) -> dict[str, Path]:
    """report.json, report.md and accuracy_vs_gflops.png in output_dir."""
    out = Path(output_dir)
    paths = _report_paths(out)
    _atomic_write(paths["json"], json.dumps(report, indent=2, default=_json_default))
    _atomic_write(paths["md"], _markdown(report))
    tmp = out / f".{PLOT_PNG}.tmp.png"
    plot_accuracy_vs_gflops(report, tmp)
    os.replace(tmp, paths["png"])
    return paths


def _json_default(value: Any):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
