"""MADTPConfig: what to prune and how the pruned model executes."""
from __future__ import annotations

from dataclasses import dataclass

EXECUTIONS = ("ragged", "padded")


@dataclass(frozen=True)
class MADTPConfig:
    num_alignment_tokens: int = 100
    temperature: float | None = None   # None or 0 disables token pruning
    prune_vision: bool = True
    prune_text: bool = True
    merge_pruned: bool = True
    execution: str = "ragged"          # "ragged": packed tokens end to end; "padded": the published baseline
    prune_layers: tuple[int, ...] | None = None   # encoder layers (0-based) that prune; None: every layer

    def __post_init__(self):
        if isinstance(self.num_alignment_tokens, bool) or not isinstance(self.num_alignment_tokens, int) \
                or self.num_alignment_tokens < 1:
            raise ValueError(f"num_alignment_tokens: expected an int >= 1, got {self.num_alignment_tokens!r}")
        if self.temperature is not None and not (isinstance(self.temperature, (int, float))
                                                 and self.temperature >= 0):
            raise ValueError(f"temperature: expected None or a float >= 0, got {self.temperature!r}")
        if self.prune_layers is not None:
            if isinstance(self.prune_layers, (str, bytes)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.prune_layers):
                raise ValueError(f"prune_layers: expected None or a sequence of layer indices >= 0, got "
                                 f"{self.prune_layers!r}")
            object.__setattr__(self, "prune_layers", tuple(sorted(set(self.prune_layers))))
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution: expected one of {EXECUTIONS}, got {self.execution!r}")

    @property
    def prunes_tokens(self) -> bool:
        return bool(self.temperature) and (self.prune_vision or self.prune_text)
