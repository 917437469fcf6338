"""madtp-kernels: ragged attention, token compaction and 2:4 sparse GEMMs for pruned vision-language models."""
from ._dispatch import available_backends, use_backend
from .attention import AttentionStats, varlen_attention
from .tokens import PrunedTokens, pack, prune_tokens, unpack

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "PrunedTokens",
    "available_backends",
    "pack",
    "prune_tokens",
    "unpack",
    "use_backend",
    "varlen_attention",
]
