"""Saving and loading models, compressed or dense, from safetensors only (no pickle, no remote code).

A compressed model directory holds what rebuilds it without the original:
    config.json        the Hugging Face model config (model class in `architectures`)
    madtp.json         MADTPConfig, the branch temperatures and execution, the 2:4 layers (by name)
    model.safetensors  every parameter and buffer: SparseLinear layers as values + meta, alignment tokens
It is written to a temporary directory and renamed into place, so a killed run never leaves half of one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn

from madtp_kernels import SparseLinear

from . import models
from .config import MADTPConfig
from .patch import ATTRIBUTE, MADTPState, apply, set_execution

FORMAT = "madtp-compressed/1"


def _heads() -> dict[str, type]:
    """Task heads a task attaches to a model (top-level children), rebuilt by class name on load: an allowlist."""
    from .tasks.matching import ClipMatchingHead
    return {cls.__name__: cls for cls in (ClipMatchingHead,)}


def _model_class(config) -> type:
    names = list(getattr(config, "architectures", None) or [])
    for cls in models.MODELS:
        if cls.__name__ in names:
            return cls
    supported = ", ".join(m.__name__ for m in models.MODELS)
    raise ValueError(f"config.json: architectures {names} names no supported model class ({supported})")


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `model` (applied, sparsified or plain) to `directory` atomically; returns the directory."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory: {directory} exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.architectures = [type(model).__name__]
    state = getattr(model, ATTRIBUTE, None)
    meta = {
        "format": FORMAT,
        "model_class": type(model).__name__,
        "sparse_layers": sorted(n for n, m in model.named_modules() if isinstance(m, SparseLinear)),
        "heads": {name: type(m).__name__ for name, m in model.named_children()
                  if type(m).__name__ in _heads() and isinstance(m, _heads()[type(m).__name__])},
        "madtp": None if not isinstance(state, MADTPState) else {
            "config": dataclasses.asdict(state.config), "temperature": state.temperature,
            "execution": state.execution},
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        config.to_json_file(tmp / "config.json")
        (tmp / "madtp.json").write_text(json.dumps(meta, indent=2))
        save_model(model, str(tmp / "model.safetensors"))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load(directory: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by `save` (or any directory with config.json + model.safetensors of a supported
    class): the class from an allowlist, 2:4 layers and MADTP restored before the weights load (strictly)."""
    from transformers import AutoConfig

    directory = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing (a model directory holds config.json and "
                                    "model.safetensors)")
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True)
    cls = _model_class(config)
    meta = {"sparse_layers": [], "madtp": None}
    if (directory / "madtp.json").is_file():
        try:
            meta = json.loads((directory / "madtp.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{directory / 'madtp.json'}: malformed JSON ({e})") from e
    model = cls(config)
    for name, head in meta.get("heads", {}).items():
        if head not in _heads():
            raise ValueError(f"{directory / 'madtp.json'}: head {name!r} of unknown class {head!r} "
                             f"(known: {sorted(_heads())})")
        model.add_module(name, _heads()[head]())
    for name in meta.get("sparse_layers", []):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child, None)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{directory / 'madtp.json'}: sparse layer {name!r} is not a Linear of {cls.__name__}")
        setattr(parent, child, SparseLinear(linear.in_features, linear.out_features, linear.bias is not None))
    if meta.get("madtp"):
        m = meta["madtp"]
        cfg = dict(m["config"])
        if cfg.get("prune_layers") is not None:
            cfg["prune_layers"] = tuple(cfg["prune_layers"])
        apply(model, MADTPConfig(**cfg))
        getattr(model, ATTRIBUTE).temperature.update(m.get("temperature", {}))
        set_execution(model, m.get("execution", "ragged"))
    missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory / 'model.safetensors'}: does not match {cls.__name__} as configured "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.eval()
