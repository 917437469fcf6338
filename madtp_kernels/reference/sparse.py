"""2:4 sparse weights in plain PyTorch: pruning, the compressed format, and the gradients of sparse_linear.

The compressed format (shared by every backend; see madtp_kernels.sparse for the full description):
values [N, K/2] holds the two kept entries of each group of 4 input features in column order, and meta [N, K/8]
uint8 packs their positions in the group, 4 bits per group (bits 0-1 first, bits 2-3 second), two groups a
byte (the even group in the low nibble).
"""
from __future__ import annotations

import torch
from torch import Tensor


def prune_2to4(weight: Tensor) -> Tensor:
    """bool mask: in each group of 4 consecutive input features, the 2 entries of largest |w| (lower index on ties)."""
    groups = weight.detach().abs().reshape(*weight.shape[:-1], -1, 4)
    # A stable sort makes ties deterministic: the lower index wins.
    order = torch.sort(groups.float(), dim=-1, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(weight.shape)


def nonzeros_per_group(weight: Tensor) -> Tensor:
    return (weight.reshape(*weight.shape[:-1], -1, 4) != 0).sum(-1)


def compress(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A 2:4 weight [N, K] -> (values [N, K/2], meta uint8 [N, K/8]). Groups with fewer than 2 non-zeros keep
    zeros at their lowest free positions, so the format has exactly 2 entries per group."""
    n, k = weight.shape
    groups = weight.reshape(n, k // 4, 4)
    position = torch.arange(4, device=weight.device)
    # Non-zeros first, then the lowest free positions; kept positions in increasing order.
    rank = (groups != 0).to(torch.int64) * 4 + (3 - position)
    kept = torch.sort(torch.topk(rank, 2, dim=-1).indices, dim=-1).values          # [N, G, 2]
    values = torch.gather(groups, -1, kept).reshape(n, k // 2)
    nibble = (kept[..., 0] | (kept[..., 1] << 2)).to(torch.uint8)                   # [N, G]
    meta = nibble[:, 0::2] | (nibble[:, 1::2] << 4)
    return values.contiguous(), meta.contiguous()


def kept_positions(meta: Tensor) -> Tensor:
    """meta [N, K/8] -> positions [N, K/4, 2] (int64) of the two kept entries of each group."""
    nibble = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(meta.shape[0], -1).to(torch.int64)
    return torch.stack([nibble & 3, nibble >> 2], dim=-1)


def decompress(values: Tensor, meta: Tensor) -> Tensor:
    """(values [N, K/2], meta [N, K/8]) -> the dense weight [N, K]."""
    n, groups = values.shape[0], values.shape[1] // 2
    dense = values.new_zeros((n, groups, 4))
    dense.scatter_(-1, kept_positions(meta), values.reshape(n, groups, 2))
    return dense.reshape(n, groups * 4)


def sparse_linear_backward(grad_y: Tensor, x: Tensor, values: Tensor, meta: Tensor,
                           needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for x, values (the kept entries only) and bias, as needed."""
    grad_x = grad_y @ decompress(values, meta) if needs[0] else None
    grad_values = None
    if needs[1]:
        grad_w = (grad_y.transpose(0, 1) @ x).reshape(values.shape[0], -1, 4)
        grad_values = torch.gather(grad_w, -1, kept_positions(meta)).reshape(values.shape)
    grad_bias = grad_y.sum(0) if needs[2] else None
    return grad_x, grad_values, grad_bias
