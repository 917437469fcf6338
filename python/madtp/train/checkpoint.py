"""Crash-safe checkpoints: safetensors for every tensor, JSON for everything else, no pickle anywhere.

Layout of a checkpoint directory::

    <dir>/latest                    text: the name of the newest complete checkpoint ("step_00000020")
    <dir>/step_00000020/
        model.safetensors           the model's state_dict; tied (shared-storage) tensors stored once
        state.safetensors           every tensor of the other states (optimizer moments, callback tensors, ...)
        state.json                  written last: step, epoch, position, seeds, config, the non-tensor structure
                                    of the other states (tensors replaced by references), the size and SHA-256
                                    of each file, and the SHA-256 of state.json itself (madtp.integrity)

A checkpoint is written into a temporary directory (``.tmp-*``), every file and the directory are fsynced, and the
directory is renamed into place; only then is ``latest`` replaced (write to a temporary file, fsync, os.replace).
A crash at any point leaves either the previous checkpoint or the new one named by ``latest``, never a truncated
one; leftover ``.tmp-*`` / ``.trash-*`` entries are ignored and removed by the next writer.

Since a checkpoint appears complete or not at all, one that ``latest`` names and that is missing a file, or whose
files or state.json do not match the hashes state.json records, was damaged after it was written: loading it (or
finding it with ``latest_checkpoint``) raises ``IntegrityError`` naming the file instead of silently resuming from
other weights. Checkpoints of format 1 (sizes only, no hashes) still load: their sizes are checked.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from ..integrity import IntegrityError, check_seal, file_entry, seal, share_modes, umask, verify_files

MODEL_FILE = "model.safetensors"
STATE_TENSOR_FILE = "state.safetensors"
STATE_JSON = "state.json"
LATEST = "latest"
FORMAT_VERSION = 2          # 2: SHA-256 per file and a sealed state.json; 1: sizes only
_NAME_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"

__all__ = [
    "checkpoint_name", "flatten_state", "unflatten_state", "is_complete", "list_checkpoints", "latest_checkpoint",
    "save_checkpoint", "load_checkpoint", "read_meta", "clean_stale", "verify_checkpoint", "IntegrityError",
]


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(path: Path) -> int | None:
    m = _NAME_RE.match(path.name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------------------------
# Nested state <-> (JSON structure, flat tensor dict)
# ---------------------------------------------------------------------------------------------------------------
_MARKERS = ("__tensor__", "__tuple__", "__items__")


def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, scalars, tensors) into a JSON-able structure in which every tensor
    is replaced by ``{"__tensor__": name}``, and a flat ``{name: tensor}`` dict ready for safetensors.

    Dicts with non-string keys (an optimizer's ``state`` is keyed by int) and tuples are encoded so that they come
    back with the same key and container types. Tensors are moved to CPU, made contiguous, and copied where they
    share storage with an earlier one (safetensors refuses shared storage).
    """
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()

    def tensor_ref(t: torch.Tensor, path: str) -> dict:
        name = path or "tensor"
        if name in tensors:
            raise ValueError(f"state: two tensors flatten to the same name {name!r}")
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage:
                t = t.clone()
            else:
                seen_storage.add(ptr)
        tensors[name] = t
        return {"__tensor__": name}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            return tensor_ref(x, path)
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and k not in _MARKERS for k in x):
                return {k: enc(v, f"{path}/{k}" if path else k) for k, v in x.items()}
            items = []
            for k, v in x.items():
                if not (k is None or isinstance(k, (bool, int, float, str))):
                    raise TypeError(f"state: dict key {k!r} at {path or '<root>'!r} is not a str/int/float/bool")
                items.append([k, enc(v, f"{path}/{k}" if path else str(k))])
            return {"__items__": items}
        if hasattr(x, "item") and callable(x.item) and type(x).__module__ == "numpy":  # numpy scalar
            return x.item()
        raise TypeError(f"state: cannot store a {type(x).__name__} at {path or '<root>'!r} without pickle; "
                        f"use tensors, numbers, strings, lists, tuples and dicts")

    return enc(obj, prefix), tensors


def unflatten_state(spec: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(spec, list):
        return [unflatten_state(v, tensors) for v in spec]
    if isinstance(spec, dict):
        if set(spec) == {"__tensor__"}:
            name = spec["__tensor__"]
            if name not in tensors:
                raise ValueError(f"checkpoint: tensor {name!r} named in {STATE_JSON} is missing from "
                                 f"{STATE_TENSOR_FILE}")
            return tensors[name]
        if set(spec) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in spec["__tuple__"])
        if set(spec) == {"__items__"}:
            return {k: unflatten_state(v, tensors) for k, v in spec["__items__"]}
        return {k: unflatten_state(v, tensors) for k, v in spec.items()}
    return spec


# ---------------------------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------------------------
def read_meta(path: str | os.PathLike) -> dict:
    """The parsed state.json of a checkpoint directory. Raises ValueError when it is not a complete checkpoint (no
    or unreadable state.json), IntegrityError (a ValueError) when state.json was altered or a file it lists is
    missing or of another size. The files' hashes are checked by ``verify_checkpoint`` (``load_checkpoint``)."""
    path = Path(path)
    meta_path = path / STATE_JSON
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint: {path} is not a complete checkpoint ({STATE_JSON}: {e})") from None
    if not isinstance(meta, dict):
        raise IntegrityError(meta_path, f"corrupted: expected a JSON object, got a JSON {type(meta).__name__}")
    version = meta.get("format")
    if version == 1:   # sizes only
        files = meta.get("files", {})
        if not isinstance(files, dict):
            raise IntegrityError(meta_path, "corrupted: 'files' is not an object")
        for fname, size in files.items():
            f = path / str(fname)
            if not f.is_file():
                raise IntegrityError(f, f"missing (listed in {STATE_JSON})")
            if f.stat().st_size != size:
                raise IntegrityError(f, f"truncated or altered: {f.stat().st_size} bytes, {STATE_JSON} records "
                                        f"{size}")
        return meta
    if version != FORMAT_VERSION:
        raise IntegrityError(meta_path, f"unknown checkpoint format {version!r} (this madtp reads 1 and "
                                        f"{FORMAT_VERSION})")
    check_seal(meta, meta_path)
    files = meta.get("files")
    if not isinstance(files, dict) or set(files) != {MODEL_FILE, STATE_TENSOR_FILE}:
        raise IntegrityError(meta_path, f"corrupted: 'files' must list {MODEL_FILE} and {STATE_TENSOR_FILE}")
    for fname, entry in files.items():
        f = path / fname
        if not f.is_file():
            raise IntegrityError(f, f"missing (listed in {STATE_JSON})")
        if not isinstance(entry, dict) or f.stat().st_size != entry.get("size"):
            raise IntegrityError(f, f"truncated or altered: {f.stat().st_size} bytes, {STATE_JSON} records "
                                    f"{entry.get('size') if isinstance(entry, dict) else entry!r}")
    return meta


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """read_meta, then every file against its recorded SHA-256 (format 2); returns the metadata."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format") != 1:
        verify_files(path, meta["files"], path / STATE_JSON)
    return meta


def is_complete(path: str | os.PathLike) -> bool:
    try:
        read_meta(path)
    except ValueError:
        return False
    return True


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest step first. Temporary and partial entries are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(s, p) for p in directory.iterdir() if (s := _step_of(p)) is not None and p.is_dir() and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names; if ``latest`` names none (missing, garbage, or a checkpoint since removed),
    the newest complete one; None if there is none. A checkpoint ``latest`` names that exists but is incomplete or
    altered raises IntegrityError: it was complete when ``latest`` was written, so it was damaged since."""
    directory = Path(directory)
    pointer = directory / LATEST
    try:
        name = pointer.read_text().strip()
    except OSError:
        name = ""
    if name and _NAME_RE.match(name) and (directory / name).is_dir():
        try:
            read_meta(directory / name)
            return directory / name
        except IntegrityError:
            raise
        except ValueError as e:
            if (directory / name).is_dir():   # not removed by a concurrent writer's pruning meanwhile
                raise IntegrityError(directory / name / STATE_JSON,
                                     f"missing or unreadable in the checkpoint {LATEST} names ({e})") from None
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Rename out of the ``step_*`` namespace first (atomic), so a crash mid-delete never leaves a half checkpoint
    under a checkpoint's name."""
    trash = path.parent / f"{_TRASH_PREFIX}{path.name}-{os.getpid()}"
    try:
        os.replace(path, trash)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
        return
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(directory: str | os.PathLike) -> None:
    """Remove temporary and trash entries a crashed writer left behind (call from the single writer only)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _write_pointer(directory: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{LATEST}-", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / LATEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_path(directory)


def save_checkpoint(directory: str | os.PathLike, step: int, model: torch.nn.Module, state: dict[str, Any],
                    meta: dict[str, Any] | None = None, keep_last: int | None = None) -> Path:
    """Atomically write checkpoint ``step_<step>`` under ``directory`` and point ``latest`` at it.

    ``state``: nested non-model state (optimizer/scheduler/scaler/callback state dicts); ``meta``: JSON-able extras
    stored at the top level of state.json. Checkpoints newer than ``step`` (an abandoned timeline) are removed, and
    of the rest only the newest ``keep_last`` are kept. Call from one process only.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"checkpoint_dir: {directory} is a file, expected a directory")
    directory.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    spec, tensors = flatten_state(state)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=directory))
    try:
        save_model(model, str(tmp / MODEL_FILE))
        save_file(tensors, str(tmp / STATE_TENSOR_FILE))
        files = {f: file_entry(tmp / f) for f in (MODEL_FILE, STATE_TENSOR_FILE)}
        doc = seal({**(meta or {}), "format": FORMAT_VERSION, "step": step, "state": spec, "files": files})
        with open(tmp / STATE_JSON, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        share_modes(tmp, (*files, STATE_JSON))
        for fname in (*files, STATE_JSON):
            _fsync_path(tmp / fname)
        _fsync_path(tmp)
        final = directory / name
        if final.exists():
            _remove_tree(final)
        os.replace(tmp, final)
        _fsync_path(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_pointer(directory, name)
    for p in list_checkpoints(directory):
        s = _step_of(p)
        if s is not None and s > step:
            _remove_tree(p)
    if keep_last is not None:
        for p in list_checkpoints(directory)[:-keep_last]:
            if p.name != name:
                _remove_tree(p)
    return final


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module | None = None,
                    device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Read a checkpoint: checks every file against the hashes state.json records (IntegrityError naming the
    first bad one), loads the weights into ``model`` (strict; tied weights restored) if given, and returns
    ``(meta, state)``: the state.json document and the non-model state with its tensors restored (on CPU)."""
    path = Path(path)
    meta = verify_checkpoint(path)
    try:
        if model is not None:
            try:
                load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
            except RuntimeError as e:   # strict: missing / unexpected / mis-shaped keys
                raise ValueError(f"{path / MODEL_FILE}: does not match the model being trained "
                                 f"({' '.join(str(e).split())[:300]})") from None
        tensors = load_file(str(path / STATE_TENSOR_FILE), device="cpu")
    except SafetensorError as e:   # a format-1 checkpoint has no hashes to catch this first
        raise IntegrityError(path, f"unreadable safetensors file ({e})") from None
    state = unflatten_state(meta.get("state", {}), tensors)
    return meta, state
