"""Saving and loading models, compressed or dense, from safetensors only (no pickle, no remote code).

A compressed model directory holds what rebuilds it without the original:
    config.json        the Hugging Face model config (model class in `architectures`)
    model.safetensors  every parameter and buffer: SparseLinear layers as values + meta, alignment tokens
    madtp.json         written last, the manifest: MADTPConfig, the branch temperatures and execution, the 2:4
                       layers (by name), the size and SHA-256 of every file beside it (config.json,
                       model.safetensors, and what `add_files` adds, e.g. tokenizer.json), and its own SHA-256
It is written to a temporary directory and renamed into place, so a killed run never leaves half of one; its
modes are those of ordinary files under the umask (as `save_pretrained` leaves them), readable by others.

`load` checks the manifest before reading anything else: a file that is missing, truncated or altered, or a
manifest that was edited, raises `IntegrityError` (a ValueError) naming the file. Every other fault of the
directory (a truncated config.json, a model_type that is not the class's, a madtp.json field of the wrong type, a
file that is not safetensors) raises ValueError naming the file, never a traceback from inside a library.

Directories without hashes still load, as they carry nothing to check against: a plain Hugging Face directory
(no madtp.json), and an export of format madtp-compressed/1 (before hashes), which loads with a warning saying
so; `save` it again to add them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from madtp_kernels import SparseLinear

from . import models
from .config import EXECUTIONS, MADTPConfig, check_temperature
from .integrity import IntegrityError, check_seal, file_entry, seal, share_modes, verify_files
from .patch import ATTRIBUTE, MADTPState, apply, set_execution

try:   # transformers 5 configs validate their fields through huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError
    _HF_CONFIG_ERRORS: tuple[type[Exception], ...] = (StrictDataclassError,)
except ImportError:   # pragma: no cover - older huggingface_hub
    _HF_CONFIG_ERRORS = ()

FORMAT = "madtp-compressed/2"
FORMAT_NO_HASHES = "madtp-compressed/1"
MANIFEST = "madtp.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_KEYS = {"format", "model_class", "sparse_layers", "heads", "madtp", "files", "manifest_sha256"}
_MADTP_KEYS = {"config", "temperature", "execution"}

__all__ = ["save", "load", "add_files", "IntegrityError", "FORMAT"]


def _heads() -> dict[str, type]:
    """Task heads a task attaches to a model (top-level children), rebuilt by class name on load: an allowlist."""
    from .tasks.matching import ClipMatchingHead
    return {cls.__name__: cls for cls in (ClipMatchingHead,)}


def _model_class(config, path: str | os.PathLike = CONFIG_FILE) -> type:
    names = getattr(config, "architectures", None) or []
    if not isinstance(names, (list, tuple)):
        raise ValueError(f"{path}: 'architectures' must be a list of class names, got {names!r}")
    for cls in models.MODELS:
        if cls.__name__ in names:
            return cls
    supported = ", ".join(m.__name__ for m in models.MODELS)
    raise ValueError(f"{path}: architectures {list(names)} names no supported model class ({supported})")


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
        config.to_json_file(tmp / CONFIG_FILE)
        save_model(model, str(tmp / WEIGHTS_FILE))
        meta["files"] = {name: file_entry(tmp / name) for name in (CONFIG_FILE, WEIGHTS_FILE)}
        (tmp / MANIFEST).write_text(json.dumps(seal(meta), indent=2))
        share_modes(tmp, (CONFIG_FILE, WEIGHTS_FILE, MANIFEST))
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


def add_files(directory: str | os.PathLike, names: Iterable[str]) -> None:
    """Record files put beside a saved model afterwards (a tokenizer) in its manifest, so `load` checks them too.
    The manifest is rewritten atomically."""
    directory = Path(directory)
    path = directory / MANIFEST
    meta = _read_json_object(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} has no file hashes to add to (save the model "
                         f"again with madtp.serialization.save)")
    files = dict(meta["files"])
    for name in names:
        if Path(name).name != name or name in (MANIFEST, "", ".", ".."):
            raise ValueError(f"names: expected file names beside {MANIFEST}, got {name!r}")
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing (add_files records files already written)")
        files[name] = file_entry(directory / name)
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(seal({**meta, "files": files}), indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, (directory / MANIFEST).stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json_object(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {type(meta).__name__}")
    return meta


def _check_manifest(directory: Path, meta: dict) -> None:
    """The manifest's integrity (format 2: its seal and every file's hash), then its schema."""
    path = directory / MANIFEST
    fmt = meta.get("format")
    if fmt == FORMAT:
        check_seal(meta, path)
        files = meta.get("files")
        verify_files(directory, files, path)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if name not in files:
                raise IntegrityError(path, f"corrupted: 'files' does not list {name}")
    elif fmt == FORMAT_NO_HASHES or (fmt is None and "files" not in meta):
        warnings.warn(f"{path}: format {fmt or FORMAT_NO_HASHES!r} carries no file hashes: loaded unchecked (save "
                      f"it again with madtp.serialization.save to add them)", stacklevel=3)
    else:
        raise ValueError(f"{path}: unknown format {fmt!r} (this madtp reads {FORMAT} and {FORMAT_NO_HASHES})")
    unknown = sorted(set(meta) - _KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown} (known: {sorted(_KEYS)})")

    def need(cond, what, got):
        if not cond:
            raise ValueError(f"{path}: {what}, got {got!r}")

    need(isinstance(meta.get("model_class", ""), str), "'model_class' must be a string", meta.get("model_class"))
    layers = meta.get("sparse_layers", [])
    need(isinstance(layers, list) and all(isinstance(n, str) and n for n in layers),
         "'sparse_layers' must be a list of layer names", layers)
    heads = meta.get("heads", {})
    need(isinstance(heads, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in heads.items()),
         "'heads' must map child names to class names", heads)
    m = meta.get("madtp")
    if m is None:
        return
    need(isinstance(m, dict), "'madtp' must be null or an object", m)
    unknown = sorted(set(m) - _MADTP_KEYS)
    need(not unknown, f"unknown key(s) in 'madtp' (known: {sorted(_MADTP_KEYS)})", unknown)
    need(isinstance(m.get("config"), dict), "'madtp.config' must be an object of MADTPConfig fields",
         m.get("config"))
    fields = {f.name for f in dataclasses.fields(MADTPConfig)}
    unknown = sorted(set(m["config"]) - fields)
    need(not unknown, f"unknown MADTPConfig field(s) in 'madtp.config' (known: {sorted(fields)})", unknown)
    temps = m.get("temperature", {})
    need(isinstance(temps, dict) and set(temps) <= {"vision", "text"},
         "'madtp.temperature' must map 'vision' / 'text' to a temperature or null", temps)
    for branch, t in temps.items():
        try:
            check_temperature(f"madtp.temperature.{branch}", t)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None
    need(m.get("execution", "ragged") in EXECUTIONS, f"'madtp.execution' must be one of {EXECUTIONS}",
         m.get("execution"))


def _madtp_config(path: Path, cfg: dict) -> MADTPConfig:
    cfg = dict(cfg)
    if isinstance(cfg.get("prune_layers"), list):
        cfg["prune_layers"] = tuple(cfg["prune_layers"])
    try:
        return MADTPConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: 'madtp.config': {e}") from None


def _read_config(directory: Path, cls_hint: str | None):
    from transformers import AutoConfig

    path = directory / CONFIG_FILE
    _read_json_object(path)  # read it first ourselves: AutoConfig's errors on a bad file are long and name no field
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, *_HF_CONFIG_ERRORS) as e:
        raise ValueError(f"{path}: not a config transformers can read ({' '.join(str(e).split())[:300]})") from None
    cls = _model_class(config, path)
    if cls_hint is not None and cls_hint != cls.__name__:
        raise ValueError(f"{directory / MANIFEST}: model_class {cls_hint!r} but {CONFIG_FILE} names "
                         f"{cls.__name__}")
    if not isinstance(config, cls.config_class):
        raise ValueError(f"{path}: model_type {getattr(config, 'model_type', None)!r} gives a "
                         f"{type(config).__name__}, but architectures names {cls.__name__}, which takes a "
                         f"{cls.config_class.__name__}")
    return config, cls


def load(directory: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by `save` (or any directory with config.json + model.safetensors of a supported
    class): the manifest's hashes checked, the class from an allowlist, 2:4 layers and MADTP restored before the
    weights load (strictly)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory (a model directory holds {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE})")
    meta = {"sparse_layers": [], "madtp": None}
    manifest = directory / MANIFEST
    if manifest.is_file():
        meta = _read_json_object(manifest)
        _check_manifest(directory, meta)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing (a model directory holds {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE})")
    config, cls = _read_config(directory, meta.get("model_class"))
    try:
        model = cls(config)
    except (ValueError, TypeError, RuntimeError, AttributeError, KeyError, *_HF_CONFIG_ERRORS) as e:
        raise ValueError(f"{directory / CONFIG_FILE}: cannot build a {cls.__name__} from it "
                         f"({' '.join(str(e).split())[:300]})") from None
    for name, head in meta.get("heads", {}).items():
        if head not in _heads():
            raise ValueError(f"{manifest}: head {name!r} of unknown class {head!r} (known: {sorted(_heads())})")
        if hasattr(model, name):
            raise ValueError(f"{manifest}: head {name!r} would replace {cls.__name__}'s own {name!r}")
        model.add_module(name, _heads()[head]())
    for name in meta.get("sparse_layers", []):
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            parent = None
        linear = getattr(parent, child, None) if parent is not None else None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{manifest}: sparse layer {name!r} is not a Linear of {cls.__name__}")
        setattr(parent, child, SparseLinear(linear.in_features, linear.out_features, linear.bias is not None))
    if meta.get("madtp"):
        m = meta["madtp"]
        try:
            apply(model, _madtp_config(manifest, m["config"]))
        except ValueError as e:   # e.g. prune_layers past the model's depth
            raise ValueError(f"{manifest}: {e}") from None
        getattr(model, ATTRIBUTE).temperature.update(
            {b: check_temperature(b, t) for b, t in m.get("temperature", {}).items()})
        set_execution(model, m.get("execution", "ragged"))
    weights = directory / WEIGHTS_FILE
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except SafetensorError as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    except (RuntimeError, ValueError) as e:   # mis-shaped tensors; SparseLinear's checks of its meta
        raise ValueError(f"{weights}: does not fit {cls.__name__} as configured "
                         f"({' '.join(str(e).split())[:300]})") from None
    if missing or unexpected:
        raise ValueError(f"{weights}: does not match {cls.__name__} as configured "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.eval()
