"""MAG: learnable alignment tokens shared by the image and text branches.

Each encoder layer scores its tokens against the alignment tokens, `A = map(x) T^T` ([T, K]). The scores feed
token pruning (the alignment term of the importance score and the per-sample threshold) and a pooled feature
per alignment token, `softmax_tokens(A^T / sqrt(d)) map(x)`, summed over layers; the alignment loss pulls the
image and text pooled features of a pair together. Where the branches differ in width (CLIP), each branch maps
its tokens into the width of the tokens by a linear layer of its own.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from madtp_kernels import RaggedLayout, unpack

from . import ragged


class AlignmentTokens(nn.Module):
    def __init__(self, num_tokens: int, widths: dict[str, int], init_std: float = 0.02):
        super().__init__()
        self.dim = max(widths.values())
        self.tokens = nn.Parameter(torch.randn(num_tokens, self.dim) * init_std)
        # One map per branch whose width differs from the tokens' width (identity otherwise).
        self.maps = nn.ModuleDict({name: nn.Linear(width, self.dim, bias=False)
                                   for name, width in widths.items() if width != self.dim})

    def project(self, x: Tensor, branch: str) -> Tensor:
        if branch not in self.maps:
            return x
        m = self.maps[branch]
        return m(x.to(m.weight.dtype))   # under autocast x may come in the autocast dtype; the map's own is kept

    def scores(self, x: Tensor, branch: str) -> tuple[Tensor, Tensor]:
        """(A [T, K] in fp32, map(x) [T, d]) for packed rows x [T, C], in fp32 also under autocast."""
        # Autocast would run these products in fp16/bf16 whatever their inputs' dtype: A then loses the digits
        # that a sharp threshold softmax (A / temperature, temperature down to 1e-3) tells tokens apart by, and
        # in fp16 A / temperature overflows to inf (a NaN threshold). The map and the product are small next
        # to the layer's GEMMs, so both run in fp32.
        with _fp32(x):
            h = self.project(x, branch)
            return h.float() @ self.tokens.float().t(), h

    def pooled(self, scores: Tensor, h: Tensor, layout: RaggedLayout, candidates: Tensor) -> Tensor:
        """[B, K, d]: per sample, the candidate tokens pooled with softmax over tokens of A^T / sqrt(d)."""
        with _fp32(scores):   # fp32 as the scores (see scores): autocast would take the product down
            weights = ragged.segment_softmax(scores.float() / math.sqrt(self.dim), layout.cu_seqlens,
                                             candidates)   # [T, K]
            # One batched [K, L] x [L, d] product per sample; padded rows carry zero weight.
            return unpack(weights, layout).transpose(1, 2) @ unpack(h.float(), layout)


def _fp32(x: Tensor):
    """Autocast off on x's device: the products inside run in their inputs' dtype (fp32 here)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def alignment_loss(image_features: Tensor, text_features: Tensor) -> Tensor:
    """1 - cos between the image and text pooled features of each pair, averaged over alignment tokens and pairs."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"alignment_loss: image features {tuple(image_features.shape)} and text features "
                         f"{tuple(text_features.shape)} must pair up (same batch, tokens, width)")
    return (1 - F.cosine_similarity(image_features, text_features, dim=-1)).mean()
