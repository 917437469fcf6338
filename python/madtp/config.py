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

    def __post_init__(self):
        if isinstance(self.num_alignment_tokens, bool) or not isinstance(self.num_alignment_tokens, int) \
                or self.num_alignment_tokens < 1:
            raise ValueError(f"num_alignment_tokens: expected an int >= 1, got {self.num_alignment_tokens!r}")
        if self.temperature is not None and not (isinstance(self.temperature, (int, float))
                                                 and self.temperature >= 0):
            raise ValueError(f"temperature: expected None or a float >= 0, got {self.temperature!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution: expected one of {EXECUTIONS}, got {self.execution!r}")

    @property
    def prunes_tokens(self) -> bool:
        return bool(self.temperature) and (self.prune_vision or self.prune_text)
