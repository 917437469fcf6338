"""madtp: MADTP++ (alignment-guided token pruning + 2:4 weight pruning) on Hugging Face CLIP and BLIP.

Built on madtp_kernels: `apply` swaps token pruning into a model instance (executed on packed, ragged token sets),
`remove` undoes it; see shared/DESIGN.md (Model-layer contract).
"""
from .config import MADTPConfig
from .flops import count_flops
from .patch import alignment_loss, apply, pruning_report, remove, set_execution, set_temperature
from .weights import sparsify

__version__ = "0.1.0"

__all__ = ["MADTPConfig", "alignment_loss", "apply", "count_flops", "pruning_report", "remove", "set_execution",
           "set_temperature", "sparsify"]
