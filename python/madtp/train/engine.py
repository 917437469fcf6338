"""A plain PyTorch training loop: DDP (torchrun or single process), AMP on CUDA, gradient accumulation, clipping,
warmup + cosine LR, per-step callbacks, crash-safe checkpoints and exact resume.

Data order and global batch
    Every optimizer step consumes one *global batch* of ``G = micro_batch_size * world_size * accumulation``
    samples: the slice ``perm[s*G:(s+1)*G]`` of a per-epoch permutation of the dataset (seeded by (seed, epoch);
    the last incomplete global batch of an epoch is dropped). The global batch is cut into ``world_size *
    accumulation`` micro-batches of ``micro_batch_size``; rank ``r`` trains micro-batches ``j = r*accumulation + a``
    for ``a = 0..accumulation-1``. Data order therefore depends on ``G`` and the seed only: 1 process with
    accumulation ``A*W`` trains exactly the micro-batches that ``W`` processes with accumulation ``A`` train, and
    the loss (the task's mean over a micro-batch, divided by ``accumulation``, gradients averaged over ranks by
    DDP) is the mean over the global batch in both.

Randomness
    Before micro-batch ``j`` of step ``s`` the torch (CPU and CUDA), ``random`` and numpy generators are seeded from
    ``(seed, s, j)``. Dropout masks are thus a function of the micro-batch, not of the process layout or of how
    often the run was interrupted: resume needs no saved generator state, and a 2-process run draws the masks the
    1-process run draws. Data-loading randomness (augmentation in workers) should likewise be derived from the
    sample index.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, default_collate

from . import checkpoint as ckpt

__all__ = ["TrainConfig", "Task", "Callback", "Trainer", "GlobalBatchSampler", "warmup_cosine", "derive_seed",
           "seed_everything"]

AMP_MODES = ("none", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")
METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    output_dir: str
    max_steps: int                          # optimizer steps
    micro_batch_size: int                   # samples per rank per forward/backward
    accumulation: int = 1                   # micro-batches per optimizer step (per rank)
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"                # "cosine" (after warmup, down to min_lr_ratio * lr) | "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None          # max global grad norm; None: no clipping
    amp: str = "none"                       # "none" | "bf16" | "fp16" (CUDA only; fp16 uses a GradScaler)
    seed: int = 0
    shuffle: bool = True
    checkpoint_dir: str | None = None       # default <output_dir>/checkpoints
    checkpoint_every: int = 0               # 0: no periodic checkpoints
    checkpoint_at_end: bool = True
    keep_last: int = 2
    resume: bool | str = False              # True: the latest checkpoint in checkpoint_dir; str: a checkpoint path
    log_every: int = 1
    eval_every: int = 0                     # 0: evaluate only at the end (if the task has metric and an eval loader)
    progress: bool = True                   # tqdm bar on rank 0
    num_workers: int = 0
    device: str = "auto"                    # "auto" | "cpu" | "cuda"
    find_unused_parameters: bool = False

    def __post_init__(self):
        def need_int(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")

        def need_float(name, lo, hi=math.inf, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and lo <= v <= hi):
                raise ValueError(f"{name}: expected a finite number in [{lo}, {hi}]"
                                 f"{' or None' if allow_none else ''}, got {v!r}")

        for name in ("max_steps", "micro_batch_size", "accumulation", "log_every", "keep_last"):
            need_int(name, 1)
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "num_workers", "seed"):
            need_int(name, 0)
        need_float("lr", 0.0)
        if self.lr == 0:   # AdamW at lr 0 moves nothing: a run that silently trains nothing
            raise ValueError(f"lr: expected a number > 0, got {self.lr!r}")
        need_float("weight_decay", 0.0)
        need_float("min_lr_ratio", 0.0, 1.0)
        need_float("grad_clip", 0.0, allow_none=True)
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip: expected None or a number > 0, got {self.grad_clip!r}")
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
                and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: expected one of {AMP_MODES}, got {self.amp!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if not isinstance(self.resume, (bool, str, os.PathLike)):
            raise ValueError(f"resume: expected a bool or a checkpoint path, got {self.resume!r}")
        if not self.output_dir:
            raise ValueError(f"output_dir: expected a directory path, got {self.output_dir!r}")
        self.output_dir = os.fspath(self.output_dir)
        if self.checkpoint_dir is None:
            self.checkpoint_dir = os.path.join(self.output_dir, "checkpoints")
        self.checkpoint_dir = os.fspath(self.checkpoint_dir)
        for name in ("output_dir", "checkpoint_dir"):
            p = Path(getattr(self, name))
            if p.exists() and not p.is_dir():
                raise ValueError(f"{name}: {p} is a file, expected a directory")

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else
                         os.fspath(v) if isinstance(v, os.PathLike) else v) for f in dataclasses.fields(self)}

    # ---- command line -------------------------------------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add ``--output-dir``, ``--max-steps``, ..., ``--resume [PATH]`` (one option per field)."""
        g = parser.add_argument_group("training")
        for f in dataclasses.fields(TrainConfig):
            flag = "--" + f.name.replace("_", "-")
            required = f.default is dataclasses.MISSING
            default = None if required else f.default
            if f.name == "resume":
                g.add_argument(flag, nargs="?", const=True, default=False, metavar="PATH",
                               help="resume from the latest checkpoint (or from PATH)")
            elif f.name == "betas":
                g.add_argument(flag, nargs=2, type=float, default=default, metavar=("B1", "B2"))
            elif f.type in ("bool", bool):
                g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            else:
                conv = {"int": int, "float": float, "str": str, "float | None": float, "str | None": str}[str(f.type)]
                g.add_argument(flag, type=conv, default=default, required=required)
        return parser

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


# ---------------------------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------------------------
@runtime_checkable
class Task(Protocol):
    """What to optimise. ``loss`` returns a dict with a scalar ``"loss"`` (the mean over the micro-batch; it is
    backpropagated) and optionally more scalars (logged, averaged like the loss). ``model`` is the DDP-wrapped
    model: call it (``model(...)``) so gradients are synchronised. An optional ``metric(model, loader) ->
    dict[str, float]`` is run on rank 0 with the unwrapped model in eval mode under no_grad."""

    def loss(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]: ...


class Callback:
    """Per-step hook. Subclass and override what you need; ``state_dict``/``load_state_dict`` make the callback's
    state part of every checkpoint (tensors, numbers, strings, lists and dicts). After a resume, ``on_train_begin``
    is called after ``load_state_dict``: push restored state into the model there. ``logs`` are the same on every
    rank (averaged over ranks), so a callback that acts on them stays in sync across ranks."""

    def on_train_begin(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


# ---------------------------------------------------------------------------------------------------------------
# Seeds, schedule, sampler
# ---------------------------------------------------------------------------------------------------------------
def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), ``random`` and numpy (if installed)."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return
    np.random.seed(seed % (1 << 32))


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0,
                  cosine: bool = True) -> Callable[[int], float]:
    """LR multiplier for step ``s`` (0-based): linear warmup to 1 over ``warmup_steps`` steps, then cosine decay to
    ``min_ratio`` at ``total_steps`` (or constant 1 with ``cosine=False``)."""
    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        if not cosine:
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


class GlobalBatchSampler:
    """Batch sampler yielding this rank's micro-batches (lists of dataset indices) in training order.

    Step ``s`` of epoch ``e`` uses ``perm_e[s*G:(s+1)*G]`` (``G`` = global batch); its micro-batch ``j`` is the
    ``j``-th run of ``micro_batch_size`` indices in it, and rank ``r`` takes ``j = r*accumulation + a``. Iteration
    starts at ``set_epoch(epoch, start_step)``, so a resume continues mid-epoch at the exact sample."""

    def __init__(self, num_samples: int, micro_batch_size: int, accumulation: int = 1, world_size: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True):
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.accumulation = accumulation
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch_size = micro_batch_size * world_size * accumulation
        self.steps_per_epoch = num_samples // self.global_batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"micro_batch_size: the dataset has {num_samples} samples, fewer than one global batch of "
                f"{self.global_batch_size} (micro_batch_size {micro_batch_size} x world size {world_size} x "
                f"accumulation {accumulation})")
        self.epoch = 0
        self.start_step = 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
                perm = torch.randperm(self.num_samples, generator=g)
            else:
                perm = torch.arange(self.num_samples)
            self._perm = (epoch, perm)
        return self._perm[1]

    def global_batch(self, epoch: int, step_in_epoch: int) -> list[int]:
        g = self.global_batch_size
        return self.permutation(epoch)[step_in_epoch * g:(step_in_epoch + 1) * g].tolist()

    def micro_batch(self, epoch: int, step_in_epoch: int, j: int) -> list[int]:
        b = self.micro_batch_size
        start = step_in_epoch * self.global_batch_size + j * b
        return self.permutation(epoch)[start:start + b].tolist()

    def __iter__(self):
        for s in range(self.start_step, self.steps_per_epoch):
            for a in range(self.accumulation):
                yield self.micro_batch(self.epoch, s, self.rank * self.accumulation + a)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accumulation


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_to_device(v, device) for v in x)
    if hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(_to_device(v, device) for v in x))
    if hasattr(x, "to") and callable(x.to):  # e.g. transformers.BatchEncoding
        return x.to(device)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False


class Trainer:
    """Train ``model`` on ``task`` over ``train_dataset`` (map-style: ``len`` and ``__getitem__``).

    ``optimizer_factory(model) -> Optimizer`` (default AdamW over all trainable parameters) and
    ``scheduler_factory(optimizer, config) -> LRScheduler`` (default: ``warmup_cosine`` via LambdaLR) may replace
    the defaults. Under torchrun (WORLD_SIZE > 1) a process group is created (nccl on CUDA, gloo on CPU) unless one
    exists. With ``config.resume`` the state of the latest (or the named) checkpoint is restored here; ``fit`` then
    continues from its step.
    """

    def __init__(self, model: nn.Module, task: Task, train_dataset: Any, config: TrainConfig, *,
                 collate_fn: Callable | None = None, eval_loader: Iterable | None = None,
                 callbacks: Sequence[Callback] = (),
                 optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
                 scheduler_factory: Callable[[torch.optim.Optimizer, TrainConfig], Any] | None = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if not callable(getattr(task, "loss", None)):
            raise TypeError(f"task: expected an object with a loss(model, batch) method, got {type(task).__name__}")
        if not (hasattr(train_dataset, "__len__") and hasattr(train_dataset, "__getitem__")):
            raise TypeError(f"train_dataset: expected a map-style dataset (__len__ and __getitem__), got "
                            f"{type(train_dataset).__name__}")
        for i, cb in enumerate(callbacks):
            if not callable(getattr(cb, "on_step_end", None)):
                raise TypeError(f"callbacks[{i}]: expected an object with on_step_end(trainer, step, logs), got "
                                f"{type(cb).__name__}")
        self.config = config
        self.task = task
        self.callbacks = list(callbacks)
        self.eval_loader = eval_loader
        self.step = 0
        self.resumed_from: Path | None = None
        self._last_saved_step: int | None = None

        self._dist = self._init_distributed()
        self.device = self._pick_device()
        if config.amp != "none" and self.device.type != "cuda":
            raise ValueError(f"amp: {config.amp!r} needs a CUDA device; this run is on {self.device} "
                             f"(use amp='none')")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)

        self.sampler = GlobalBatchSampler(len(train_dataset), config.micro_batch_size, config.accumulation,
                                          self.world_size, self.rank, config.seed, config.shuffle)
        self.loader = DataLoader(train_dataset, batch_sampler=self.sampler,
                                 collate_fn=collate_fn or default_collate, num_workers=config.num_workers,
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=config.num_workers > 0)

        self.model = model.to(self.device)
        self.optimizer = (optimizer_factory(self.model) if optimizer_factory else torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=config.lr, betas=config.betas,
            weight_decay=config.weight_decay))
        self.scheduler = (scheduler_factory(self.optimizer, config) if scheduler_factory else
                          torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(
                              config.warmup_steps, config.max_steps, config.min_lr_ratio,
                              cosine=config.schedule == "cosine")))
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16")

        if config.resume:
            self._resume()
        if self.world_size > 1:
            kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.ddp_model: nn.Module = nn.parallel.DistributedDataParallel(
                self.model, find_unused_parameters=config.find_unused_parameters, **kw)
        else:
            self.ddp_model = self.model

    # ---- process layout ---------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._dist.rank

    @property
    def world_size(self) -> int:
        return self._dist.world_size

    @property
    def is_main(self) -> bool:
        return self._dist.rank == 0

    @property
    def global_batch_size(self) -> int:
        return self.sampler.global_batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.checkpoint_dir)

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    def _init_distributed(self) -> _Dist:
        if dist.is_available() and dist.is_initialized():  # e.g. torch.multiprocessing.spawn set it up
            local = os.environ.get("LOCAL_RANK")
            local_rank = int(local) if local is not None else dist.get_rank() % max(1, torch.cuda.device_count())
            return _Dist(dist.get_rank(), dist.get_world_size(), local_rank)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return _Dist()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = self.config.device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, created=True)

    def _pick_device(self) -> torch.device:
        want = self.config.device
        if want == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False")
        if want == "cpu" or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", self._dist.local_rank % torch.cuda.device_count())

    def _barrier(self) -> None:
        if self.world_size > 1:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this trainer created it."""
        if self._dist.created and dist.is_initialized():
            dist.destroy_process_group()
            self._dist.created = False

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- one optimizer step -----------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _train_step(self, batches: Iterable) -> dict[str, float]:
        cfg = self.config
        accum = cfg.accumulation
        self.ddp_model.train()
        sums: dict[str, torch.Tensor] = {}
        it = iter(batches)
        for a in range(accum):
            batch = _to_device(next(it), self.device)
            seed_everything(derive_seed(cfg.seed, "step", self.step, "micro", self.rank * accum + a))
            sync = a == accum - 1 or self.world_size == 1
            ctx = contextlib.nullcontext() if sync else self.ddp_model.no_sync()
            with ctx:
                with self._autocast():
                    out = self.task.loss(self.ddp_model, batch)
                if not isinstance(out, dict) or "loss" not in out:
                    got = f"keys {sorted(out)}" if isinstance(out, dict) else type(out).__name__
                    raise ValueError(f"Task.loss: expected a dict with a 'loss' entry, got {got}")
                loss = out["loss"]
                if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
                    raise ValueError("Task.loss: 'loss' must be a scalar tensor that requires grad (the mean over "
                                     "the micro-batch)")
                self.scaler.scale(loss.reshape(()) / accum).backward()
            for k, v in out.items():
                v = v.detach().float().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                sums[k] = sums[k] + v.to(self.device) if k in sums else v.to(self.device)

        logs: dict[str, float] = {}
        keys = sorted(sums)
        vec = torch.stack([sums[k] for k in keys]) / accum
        if self.world_size > 1:
            dist.all_reduce(vec, op=dist.ReduceOp.SUM)
            vec /= self.world_size
        logs.update(zip(keys, vec.tolist(), strict=True))
        logs["lr"] = float(self.optimizer.param_groups[0]["lr"])
        if cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            logs["grad_norm"] = float(nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        self.scaler.step(self.optimizer)
        if self.scaler.is_enabled():
            logs["loss_scale"] = float(self.scaler.get_scale())
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logs

    # ---- the loop ---------------------------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> dict[str, float]:
        """Train until ``config.max_steps`` (or until step ``stop_at``, leaving the schedule as for max_steps).
        Returns the logs of the last step."""
        cfg = self.config
        end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_stale(self.checkpoint_dir)
            self._prepare_metrics_file()
        for cb in self.callbacks:
            if hasattr(cb, "on_train_begin"):
                cb.on_train_begin(self)
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        logs: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            while self.step < end:
                epoch, pos = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch, pos)
                batches = iter(self.loader)
                while pos < self.steps_per_epoch and self.step < end:
                    logs = self._train_step(batches)
                    self.step += 1
                    pos += 1
                    logs = {"step": self.step, "epoch": self.step / self.steps_per_epoch, **logs}
                    last = self.step == cfg.max_steps   # not stop_at: a stopped run logs like a crashed one
                    if self.eval_loader is not None and callable(getattr(self.task, "metric", None)) and (
                            (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.max_steps):
                        logs.update({f"eval/{k}": v for k, v in self.evaluate().items()})
                    for cb in self.callbacks:
                        cb.on_step_end(self, self.step, logs)
                    if self.is_main and (self.step % cfg.log_every == 0 or last):
                        self._log(logs, time.perf_counter() - t0)
                    if bar is not None:
                        bar.update(1)
                        if self.step % cfg.log_every == 0 or last:
                            bar.set_postfix(loss=f"{logs['loss']:.4g}", lr=f"{logs['lr']:.3g}")
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                del batches
            if cfg.checkpoint_at_end and self._last_saved_step != self.step:
                self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        for cb in self.callbacks:
            if hasattr(cb, "on_train_end"):
                cb.on_train_end(self)
        return logs

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``task.metric(model, eval_loader)`` on rank 0 (unwrapped model, eval mode), broadcast to every rank."""
        result: list[Any] = [None]
        if self.is_main:
            seed_everything(derive_seed(self.config.seed, "eval", self.step))
            was_training = self.model.training
            self.model.eval()
            try:
                with self._autocast():
                    result[0] = {k: float(v) for k, v in self.task.metric(self.model, self.eval_loader).items()}
            finally:
                self.model.train(was_training)
        if self.world_size > 1:
            dist.broadcast_object_list(result, src=0)
        return result[0]

    # ---- metrics ----------------------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    def _prepare_metrics_file(self) -> None:
        # A resumed run drops the lines past its step, so the file reads as if the run was never interrupted.
        path = self.metrics_path
        if self.step == 0 or not path.exists():
            path.write_text("")
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except ValueError:  # a line cut by the crash
                continue
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)

    def _log(self, logs: dict[str, float], elapsed: float) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({**logs, "elapsed_s": round(elapsed, 4)}) + "\n")

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything but the model weights, as nested state dicts."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "callbacks": [{"class": type(cb).__qualname__,
                           "state": cb.state_dict() if hasattr(cb, "state_dict") else {}} for cb in self.callbacks],
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank waits at a barrier). Returns its path
        on rank 0, None elsewhere."""
        path = None
        if self.is_main:
            epoch, pos = divmod(self.step, self.steps_per_epoch)
            meta = {
                "epoch": epoch, "step_in_epoch": pos, "steps_per_epoch": self.steps_per_epoch,
                "global_batch_size": self.global_batch_size, "world_size": self.world_size,
                "micro_batch_size": self.config.micro_batch_size, "accumulation": self.config.accumulation,
                "rng": {"seed": self.config.seed,
                        "scheme": "torch/random/numpy seeded with derive_seed(seed, 'step', step, 'micro', j) "
                                  "before micro-batch j of every step"},
                "config": self.config.to_dict(), "torch": torch.__version__,
            }
            path = ckpt.save_checkpoint(self.checkpoint_dir, self.step, self.model, self.state_dict(), meta,
                                        keep_last=self.config.keep_last)
        self._last_saved_step = self.step
        self._barrier()
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        """Restore weights and optimizer/scheduler/scaler/callback state from ``path``; returns its metadata."""
        meta, state = ckpt.load_checkpoint(path, self.model, device=self.device)
        if meta.get("global_batch_size") != self.global_batch_size:
            raise ValueError(f"resume: {path} was trained with a global batch of {meta.get('global_batch_size')}, "
                             f"this run has {self.global_batch_size} (micro_batch_size x world size x "
                             f"accumulation); data order would differ")
        if meta.get("rng", {}).get("seed") != self.config.seed:
            raise ValueError(f"resume: {path} was trained with seed {meta.get('rng', {}).get('seed')}, this run has "
                             f"seed {self.config.seed}")
        cb_states = state.get("callbacks", [])
        if len(cb_states) != len(self.callbacks):
            raise ValueError(f"callbacks: {path} holds the state of {len(cb_states)} callbacks, this trainer has "
                             f"{len(self.callbacks)}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for cb, s in zip(self.callbacks, cb_states, strict=True):
            if s["class"] != type(cb).__qualname__:
                warnings.warn(f"callbacks: restoring the state of a {s['class']} into a {type(cb).__qualname__}",
                              stacklevel=2)
            if hasattr(cb, "load_state_dict"):
                cb.load_state_dict(s["state"])
        self.step = int(meta["step"])
        self._last_saved_step = self.step
        return meta

    def _resume(self) -> None:
        res = self.config.resume
        if res is True:
            path = ckpt.latest_checkpoint(self.checkpoint_dir)
            if path is None:
                raise ValueError(f"resume: no complete checkpoint found in {self.checkpoint_dir}")
        else:
            path = Path(res)
            if not path.is_dir():
                raise FileNotFoundError(f"resume: {path} is not a checkpoint directory")
            try:
                ckpt.read_meta(path)
            except ckpt.IntegrityError:
                raise                   # names the damaged file
            except ValueError:
                raise ValueError(f"resume: {path} is not a complete checkpoint (no readable "
                                 f"{ckpt.STATE_JSON})") from None
        self.load_checkpoint(path)
        self.resumed_from = path

