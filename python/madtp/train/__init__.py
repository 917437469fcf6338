"""The generic training engine of the MADTP++ pipeline: a plain PyTorch loop (DDP, AMP, accumulation, warmup +
cosine LR, callbacks) with crash-safe safetensors checkpoints and exact resume. Task-agnostic: what to optimise
comes from a :class:`Task`."""
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .engine import (
    Callback,
    GlobalBatchSampler,
    Task,
    TrainConfig,
    Trainer,
    derive_seed,
    seed_everything,
    warmup_cosine,
)

__all__ = [
    "Callback", "GlobalBatchSampler", "Task", "TrainConfig", "Trainer", "derive_seed", "seed_everything",
    "warmup_cosine", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint",
]
