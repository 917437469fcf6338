"""MADTPConfig: what to prune and how the pruned model executes.

Every setting is checked here, once, for the API, madtp.json loading (madtp.serialization) and the command line:
a wrong type is a TypeError, a wrong value a ValueError, each naming the field, what it expects and what it got.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# "ragged": our per-sample decisions on packed tokens end to end; "padded": the same decisions, each layer padded to
# the batch's longest sample (same outputs, the published code's compute); "published": the published code's batch
# policy: every sample keeps the batch's largest keep count of its top-TIS candidates, padded execution.
# The token importance formula (madtp_kernels.score_and_prune): "minmax", each term min-max normalised per sample
# and the CLS term weighted by the CLS row's head norms; "official", the formula of the published MADTP code
# (received summed over queries of the max over heads and alignment sum-normalised, CLS weighted by each token's
# own head norms). README "Fidelity" says which keeps accuracy better.
IMPORTANCES = ("minmax", "official")
EXECUTIONS = ("ragged", "padded", "published")

__all__ = ["MADTPConfig", "EXECUTIONS", "IMPORTANCES", "check_temperature"]


def check_temperature(name: str, value) -> float | None:
    """None (no pruning) or a finite number > 0, as a float. A bool is not a number here (True would prune at 1.0),
    and 0 is refused rather than read as "off": None says that."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected None or a number > 0, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected None (no pruning) or a finite number > 0, got {value!r}")
    return float(value)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class MADTPConfig:
    num_alignment_tokens: int = 100
    temperature: float | None = None   # None disables token pruning; else a finite float > 0
    prune_vision: bool = True
    prune_text: bool = True
    merge_pruned: bool = True
    execution: str = "ragged"          # one of EXECUTIONS (see there): "ragged", "padded" or "published"
    prune_layers: tuple[int, ...] | None = None   # encoder layers (0-based) that prune; None: every layer
    importance: str = "minmax"         # one of IMPORTANCES (see there)

    def __post_init__(self):
        n = self.num_alignment_tokens
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"num_alignment_tokens: expected an int >= 1, got {type(n).__name__} {n!r}")
        if n < 1:
            raise ValueError(f"num_alignment_tokens: expected an int >= 1, got {n!r}")
        object.__setattr__(self, "temperature", check_temperature("temperature", self.temperature))
        for name in ("prune_vision", "prune_text", "merge_pruned"):
            _check_bool(name, getattr(self, name))
        if not isinstance(self.execution, str):
            raise TypeError(f"execution: expected one of {EXECUTIONS}, got {type(self.execution).__name__} "
                            f"{self.execution!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution: expected one of {EXECUTIONS}, got {self.execution!r}")
        if not isinstance(self.importance, str):
            raise TypeError(f"importance: expected one of {IMPORTANCES}, got {type(self.importance).__name__} "
                            f"{self.importance!r}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance: expected one of {IMPORTANCES}, got {self.importance!r}")
        if self.prune_layers is not None:
            layers = self.prune_layers
            if not isinstance(layers, (tuple, list, range)):
                raise TypeError(f"prune_layers: expected None or a sequence of layer indices >= 0, got "
                                f"{type(layers).__name__} {layers!r}")
            if len(layers) == 0:
                raise ValueError("prune_layers: expected None (every layer) or at least one layer index, got an "
                                 "empty sequence (temperature=None turns pruning off)")
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, int):
                    raise TypeError(f"prune_layers: expected layer indices (ints >= 0), got {type(i).__name__} "
                                    f"{i!r} in {layers!r}")
                if i < 0:
                    raise ValueError(f"prune_layers: expected layer indices >= 0, got {i} in {layers!r}")
            object.__setattr__(self, "prune_layers", tuple(sorted(set(layers))))

    @property
    def prunes_tokens(self) -> bool:
        return self.temperature is not None and (self.prune_vision or self.prune_text)
