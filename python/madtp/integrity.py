"""Content hashes of what madtp writes: a SHA-256 per file in a JSON manifest, checked before anything is read.

A manifest (``madtp.json`` of an exported model, ``state.json`` of a checkpoint) records, under ``"files"``, each
file's size and SHA-256, and under ``"manifest_sha256"`` the SHA-256 of its own canonical JSON without that key,
so a flipped byte in the manifest itself (a temperature, a layer name) is caught too.

    sha256_file(path) -> str
    file_entry(path) -> {"size": int, "sha256": str}
    seal(doc) -> doc                     a copy with "manifest_sha256" set
    check_seal(doc, path)                raises IntegrityError when the manifest was altered
    verify_files(directory, files, manifest)   raises IntegrityError naming the first bad file
    umask() -> int,  share_modes(directory, names)   the modes an ordinary file and folder get
    IntegrityError (a ValueError)
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

SEAL_KEY = "manifest_sha256"
_CHUNK = 1 << 20

__all__ = ["IntegrityError", "sha256_file", "file_entry", "seal", "check_seal", "verify_files", "SEAL_KEY",
           "umask", "share_modes"]


class IntegrityError(ValueError):
    """A file is missing, truncated or does not hash to what its manifest recorded."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: str | os.PathLike) -> dict:
    return {"size": os.stat(path).st_size, "sha256": sha256_file(path)}


def _canonical(doc: Mapping) -> bytes:
    body = {k: v for k, v in doc.items() if k != SEAL_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal(doc: Mapping) -> dict:
    """A copy of ``doc`` as JSON reads it back (tuples become lists), with its seal."""
    body = json.loads(json.dumps({k: v for k, v in doc.items() if k != SEAL_KEY}))
    return {**body, SEAL_KEY: hashlib.sha256(_canonical(body)).hexdigest()}


def check_seal(doc: Mapping, path: str | os.PathLike) -> None:
    """Raise IntegrityError when ``doc`` (read from ``path``) carries a seal that its content does not match."""
    recorded = doc.get(SEAL_KEY)
    if not isinstance(recorded, str):
        raise IntegrityError(path, f"corrupted: {SEAL_KEY!r} is missing or not a string")
    try:
        actual = hashlib.sha256(_canonical(doc)).hexdigest()
    except (TypeError, ValueError) as e:
        raise IntegrityError(path, f"corrupted: its content cannot be re-encoded ({e})") from None
    if actual != recorded:
        raise IntegrityError(path, f"corrupted: its content hashes to {actual[:16]}..., the manifest records "
                                   f"{recorded[:16]}...")


def verify_files(directory: str | os.PathLike, files: Mapping, manifest: str | os.PathLike) -> None:
    """Check every file the manifest lists (``{name: {"size", "sha256"}}``) under ``directory``: present, of its
    size, of its hash. Sizes are checked first (cheap: a truncated file never gets hashed)."""
    directory = Path(directory)
    if not isinstance(files, Mapping):
        raise IntegrityError(manifest, f"corrupted: 'files' must be an object, got {type(files).__name__}")
    entries = []
    for name, entry in files.items():
        if not (isinstance(name, str) and name and "/" not in name and "\\" not in name and name not in (".", "..")):
            raise IntegrityError(manifest, f"corrupted: 'files' names {name!r}, not a file name")
        if not (isinstance(entry, Mapping) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)):
            raise IntegrityError(manifest, f"corrupted: 'files' entry {name!r} is not {{size, sha256}}: {entry!r}")
        path = directory / name
        if not path.is_file():
            raise IntegrityError(path, f"missing (listed in {Path(manifest).name})")
        size = path.stat().st_size
        if size != entry["size"]:
            what = "truncated" if size < entry["size"] else "longer than recorded"
            raise IntegrityError(path, f"{what}: {size} bytes, {Path(manifest).name} records {entry['size']}")
        entries.append((path, entry["sha256"]))
    for path, expected in entries:
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(path, f"corrupted: SHA-256 {actual[:16]}... does not match {expected[:16]}... "
                                       f"recorded in {Path(manifest).name}")


def umask() -> int:
    """The process umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def share_modes(directory: str | os.PathLike, names) -> None:
    """mkdtemp and safetensors create owner-only entries (0700 / 0600); give ``directory`` and its files ``names``
    the modes ordinary ones get under the umask, as `save_pretrained` leaves them."""
    mask = umask()
    directory = Path(directory)
    for name in names:
        os.chmod(directory / name, 0o666 & ~mask)
    os.chmod(directory, 0o777 & ~mask)
