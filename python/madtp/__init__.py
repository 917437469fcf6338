"""madtp: MADTP++ (alignment-guided token pruning + 2:4 weight pruning) on Hugging Face CLIP and BLIP.

Built on madtp_kernels. The model layer (apply/remove/sparsify/count_flops) lands with its own issue; what is
here now is the configuration every part of it shares.
"""
from .config import MADTPConfig

__version__ = "0.1.0"

__all__ = ["MADTPConfig"]
