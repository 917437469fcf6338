"""Input checks shared by every op: each names the argument, what was expected and what came.

They run before any backend, so a kernel never sees input that would make it read or write out of bounds.
Checks on values (monotonic cu_seqlens, index ranges) read the tensor once on the host; they are skipped
while torch.compile traces, where values are not known.
"""
from __future__ import annotations

import math

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


def check_has_data(t: torch.Tensor, name: str) -> None:
    """Ops compute on values: a meta tensor has none (and would fail deep inside a value check or kernel).
    Fake tensors while tracing report their real device, so this never blocks torch.compile."""
    if t.device.type == "meta" and not _tracing():
        raise ValueError(f"{name}: expected a tensor with data (cpu or cuda), got a tensor on the meta device")


def check_same_device(ref: torch.Tensor, ref_name: str, **others: torch.Tensor | None) -> None:
    """`ref` holds data and every other tensor given (None: absent) is a tensor on ref's device."""
    check_has_data(ref, ref_name)
    for name, t in others.items():
        if t is not None and check_tensor(t, name).device != ref.device:
            raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {t.device}")


def check_sizes(t: torch.Tensor, name: str, dims: tuple[int, ...], what: str) -> None:
    """Feature dims (heads, head dim, channels, in/out features) are >= 1; only row dims (tokens, samples) may
    be 0. An empty feature dim has no meaning for these ops and becomes a zero-size grid or a division by 0."""
    for d in dims:
        if t.shape[d] < 1:
            raise ValueError(f"{name}: expected {what} >= 1 (dim {d % t.dim()}), got shape {tuple(t.shape)}")


def check_bool(v, name: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return v


INT32_MAX = 2**31 - 1


def check_int(v, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name}: expected an int <= {maximum}, got {v}")
    return v


def check_float(v, name: str, *, finite: bool = False, positive: bool = False) -> float:
    """A Python real (int or float, not bool), returned as float; `finite` refuses NaN and +-inf, `positive`
    also values <= 0."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    v = float(v)
    if (finite or positive) and not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite float{' > 0' * positive}, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name}: expected a finite float > 0, got {v}")
    return v


def check_index(index, name: str, buffer_rows: int, buffer: str) -> None:
    """Optional int32 [T] row indices into a buffer of `buffer_rows` rows (one host read of min and max)."""
    if index is None:
        return
    check_tensor(index, name)
    check_dtype(index, name, (torch.int32,))
    check_ndim(index, name, 1, "1-D [T] (one physical row per logical token)")
    if index.numel() and not _tracing():
        check_has_data(index, name)
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= buffer_rows:
            raise ValueError(f"{name}: expected rows in [0, {buffer_rows}) ({buffer} has {buffer_rows} rows), "
                             f"got min {lo}, max {hi}")


# 2:4 metadata: one nibble per group of 4 (bits 0-1 the first kept position, bits 2-3 the second). The kernels
# read the pair as two distinct positions in increasing order (Triton places position 0 only from the first
# and position 3 only from the second; the torch path scatters both), so only these 6 nibbles mean one thing.
VALID_2TO4_NIBBLES = tuple(p0 | (p1 << 2) for p0 in range(4) for p1 in range(p0 + 1, 4))   # 4 8 12 9 13 14
_VALID_BYTE = [((b & 0xF) in VALID_2TO4_NIBBLES) and ((b >> 4) in VALID_2TO4_NIBBLES) for b in range(256)]


def check_2to4_meta(meta: torch.Tensor, name: str) -> None:
    """Every byte of uint8 2:4 metadata holds two valid nibbles: one vectorised check and one host read (run
    when a weight is built or loaded, not per call); skipped while tracing and on the meta device."""
    if _tracing() or meta.device.type == "meta" or meta.numel() == 0:
        return
    valid = torch.tensor(_VALID_BYTE, device=meta.device)[meta.to(torch.int64)]
    if bool(valid.all()):
        return
    row, col = (int(i) for i in (~valid).nonzero()[0])
    code = int(meta[row, col])
    bad = [g for g, nibble in ((2 * col, code & 0xF), (2 * col + 1, code >> 4)) if nibble not in VALID_2TO4_NIBBLES]
    raise ValueError(f"{name}: expected 2:4 metadata, each nibble two distinct kept positions in increasing order "
                     f"(bits 0-1 < bits 2-3: nibble 0x4, 0x8, 0x9, 0xC, 0xD or 0xE), got byte 0x{code:02X} at "
                     f"{name}[{row}, {col}] (group {bad[0]} of row {row})")


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
    check_has_data(cu, name)
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
    # Lengths are int32 (cu_seqlens): a larger bound sizes nothing real, only grids and padding that overflow.
    check_int(value, name, minimum=0, maximum=INT32_MAX)
    if value < longest:
        raise ValueError(f"{name}: expected >= the longest {unit} ({longest}{rows}), got {value}")
    return value
