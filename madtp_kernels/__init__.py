"""madtp-kernels: ragged attention, token compaction and 2:4 sparse GEMMs for pruned vision-language models."""
from . import flops
from ._dispatch import available_backends, use_backend
from .attention import AttentionStats, varlen_attention
from .layout import RaggedLayout
from .pruning import ScoredTokens, score_and_prune
from .sparse import SparseLinear, SparseWeight, compress_2to4, prune_2to4, sparse_linear
from .tokens import Packed, PrunedTokens, pack, prune_tokens, unpack

flops.register()   # torch.utils.flop_counter counts the ops by their real (ragged, 2:4) work

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "Packed",
    "PrunedTokens",
    "RaggedLayout",
    "ScoredTokens",
    "SparseLinear",
    "SparseWeight",
    "available_backends",
    "compress_2to4",
    "pack",
    "prune_2to4",
    "prune_tokens",
    "score_and_prune",
    "sparse_linear",
    "unpack",
    "use_backend",
    "varlen_attention",
]
