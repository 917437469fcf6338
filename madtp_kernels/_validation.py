"""Input checks shared by every op: each names the argument, what was expected and what came.

They run before any backend, so a kernel never sees input that would make it read or write out of bounds.
Checks on values (monotonic cu_seqlens, index ranges) read the tensor once on the host; they are skipped
while torch.compile traces, where values are not known.
"""
from __future__ import annotations

import torch


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def check_ndim(t: torch.Tensor, name: str, ndim: int | tuple[int, ...], what: str) -> None:
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in allowed:
        raise ValueError(f"{name}: expected a {what} tensor, got shape {tuple(t.shape)}")


def check_dtype(t: torch.Tensor, name: str, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name}: expected dtype {' or '.join(map(str, allowed))}, got {t.dtype}")


def check_floating(t: torch.Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")


def check_same_device(ref: torch.Tensor, ref_name: str, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {t.device}")


def check_int(v, name: str, minimum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    return v


def check_cu_seqlens(cu, name: str, rows: int | None, *, batch: int | None = None) -> torch.Tensor | None:
    """A flash-attn style offsets tensor: int32, 1-D, [B+1], starts at 0, non-decreasing, ends at `rows`
    (any end when rows is None).

    Returns the offsets as a CPU tensor (one device-to-host copy), or None while tracing.
    """
    check_tensor(cu, name)
    check_dtype(cu, name, (torch.int32,))
    check_ndim(cu, name, 1, "1-D [B+1]")
    if cu.numel() < 1:
        raise ValueError(f"{name}: expected at least one entry ([B+1] with {name}[0] == 0), got shape (0,)")
    if batch is not None and cu.numel() != batch + 1:
        raise ValueError(f"{name}: expected shape ({batch + 1},) for a batch of {batch}, got {tuple(cu.shape)}")
    if _tracing():
        return None
    offsets = cu.cpu()
    if offsets[0] != 0:
        raise ValueError(f"{name}: expected {name}[0] == 0, got {int(offsets[0])}")
    drops = (offsets[1:] < offsets[:-1]).nonzero()
    if drops.numel():
        b = int(drops[0])
        raise ValueError(f"{name}: expected non-decreasing offsets, got {name}[{b + 1}] = {int(offsets[b + 1])}"
                         f" < {name}[{b}] = {int(offsets[b])}")
    if rows is not None and offsets[-1] != rows:
        raise ValueError(f"{name}: expected {name}[-1] == {rows} (the number of rows), got {int(offsets[-1])}")
    return offsets


def check_max_len(value, name: str, offsets: torch.Tensor | None, *, unit: str = "sequence",
                  rows: str = "") -> int:
    """A bound on the sequence lengths (`max_seqlen`, `max_len`): the longest length when None, else an int
    >= it. `offsets` is what check_cu_seqlens returned (None while tracing, where the bound is then required).
    `unit` and `rows` word the messages ("sample", " rows")."""
    longest = int((offsets[1:] - offsets[:-1]).max()) if offsets is not None and offsets.numel() > 1 else 0
    if value is None:
        if offsets is None:
            raise ValueError(f"{name}: required under torch.compile (the longest {unit} is not known while tracing)")
        return longest
    check_int(value, name, minimum=0)
    if value < longest:
        raise ValueError(f"{name}: expected >= the longest {unit} ({longest}{rows}), got {value}")
    return value
