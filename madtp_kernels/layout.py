"""RaggedLayout: a packed batch's offsets, checked once and carried on both sides of the device boundary.

Every op that takes `cu_seqlens` validates it with one device-to-host copy (DESIGN.md: bad input gets a named
error before any kernel runs). Inside a pruned encoder the same offsets feed four or five ops per layer, so that
check would be a host sync per op. A RaggedLayout holds the device `cu_seqlens` beside its host copy and the
longest length, and is known valid: `pack`, `prune_tokens` and `score_and_prune` return one, every op accepts
one in place of `cu_seqlens`, and an op handed one trusts it and reads nothing back from the device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _validation as checks


@dataclass(frozen=True, eq=False)
class RaggedLayout:
    """B packed sequences: sequence b is rows offsets[b]:offsets[b+1] of a [T, ...] tensor.

    cu_seqlens: int32 [B+1] on the rows' device; offsets: the same values on the host; max_len: the longest
    sequence. Build one with `from_cu_seqlens` (validates, one host copy) or get one from an op.
    """
    cu_seqlens: Tensor
    offsets: tuple[int, ...]
    max_len: int

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor, rows: int | None = None) -> RaggedLayout:
        """Validate `cu_seqlens` (int32 [B+1], from 0, non-decreasing, ending at `rows` when given)."""
        offsets = checks.check_cu_seqlens(cu_seqlens, "cu_seqlens", rows)
        return cls._read(cu_seqlens) if offsets is None else cls._from_host(cu_seqlens, offsets)

    @classmethod
    def uniform(cls, batch: int, length: int, device=None) -> RaggedLayout:
        """B sequences of `length` rows each (a batch without padding): no host read."""
        checks.check_int(batch, "batch", minimum=0)
        checks.check_int(length, "length", minimum=0)
        cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * length
        return cls(cu, tuple(b * length for b in range(batch + 1)), length if batch else 0)

    @classmethod
    def _from_host(cls, cu_seqlens: Tensor, offsets) -> RaggedLayout:
        """Trusted: `offsets` is cu_seqlens' host copy (a CPU tensor or a sequence of ints), already valid."""
        values = tuple(offsets.tolist() if isinstance(offsets, Tensor) else offsets)
        # sym_max, not max: under torch.compile the values are unbacked symbols, which cannot be compared
        longest = functools.reduce(torch.sym_max, (b - a for a, b in zip(values[:-1], values[1:], strict=True)), 0)
        return cls(cu_seqlens, values, longest)

    @classmethod
    def _read(cls, cu_seqlens: Tensor, bound: int | None = None) -> RaggedLayout:
        """Trusted device offsets an op just made: the one host read (row count and longest length together).

        `bound`: a known upper bound on the lengths (the input's longest, for an op that only removes rows).
        Under torch.compile the offsets are unbacked symbols and max_len is that static bound instead of the
        exact longest: max_len sizes grids and padding, where a bound is as good, and a static one keeps
        data-dependent integers out of every op that follows."""
        values = cu_seqlens.tolist()
        if _tracing() and bound is not None:
            for a, b in zip(values[:-1], values[1:], strict=True):
                torch._check(b - a <= bound)
            return cls(cu_seqlens, tuple(values), bound)
        return cls._from_host(cu_seqlens, values)

    @property
    def batch(self) -> int:
        return len(self.offsets) - 1

    @property
    def rows(self) -> int:
        return self.offsets[-1]

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]

    def to(self, device) -> RaggedLayout:
        return RaggedLayout(self.cu_seqlens.to(device), self.offsets, self.max_len)

    def __repr__(self) -> str:
        return f"RaggedLayout(batch={self.batch}, rows={self.rows}, max_len={self.max_len}, device={self.device})"


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def device_offsets(cu_seqlens, name: str) -> Tensor | None:
    """The device tensor of an op's offsets argument (a RaggedLayout's, or the tensor itself, type-checked), for
    the device checks that run before `resolve`; None stays None."""
    if cu_seqlens is None:
        return None
    return cu_seqlens.cu_seqlens if isinstance(cu_seqlens, RaggedLayout) else checks.check_tensor(cu_seqlens, name)


def resolve(cu_seqlens, name: str, rows: int) -> tuple[Tensor, RaggedLayout | None, Tensor | None]:
    """(device cu_seqlens, the layout if one was given, host offsets) for an op argument that is either a
    RaggedLayout (trusted: only its row count is compared, on the host) or a plain tensor (validated as ever:
    host offsets come back, None while tracing)."""
    if isinstance(cu_seqlens, RaggedLayout):
        if not _tracing() and cu_seqlens.rows != rows:
            raise ValueError(f"{name}: the layout has {cu_seqlens.rows} rows, expected {rows}")
        return cu_seqlens.cu_seqlens, cu_seqlens, None
    checks.check_tensor(cu_seqlens, name)
    return cu_seqlens, None, checks.check_cu_seqlens(cu_seqlens, name, rows)


def max_len_of(value, name: str, layout: RaggedLayout | None, offsets: Tensor | None, *, unit: str = "sequence",
               rows: str = "") -> int:
    """A bound on the lengths (`max_seqlen`, `max_len`): the longest when None, else an int >= it; from the
    layout when one was given (no host read), else from the validated host offsets."""
    if layout is None:
        return checks.check_max_len(value, name, offsets, unit=unit, rows=rows)
    if value is None:
        return layout.max_len
    checks.check_int(value, name, minimum=0, maximum=checks.INT32_MAX)
    if not _tracing() and value < layout.max_len:
        raise ValueError(f"{name}: expected >= the longest {unit} ({layout.max_len}{rows}), got {value}")
    return value
