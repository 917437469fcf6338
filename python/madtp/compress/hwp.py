"""HWP: hardware-aware N:M weight pruning of the encoders' Linear layers, learned with SR-STE.

Training (`prepare_sparse_training`): each selected Linear's weight becomes a parametrization
(torch.nn.utils.parametrize) of its dense weight W: the forward uses W * mask(W), the N:M magnitude mask recomputed
from the current dense W at every forward, and the backward is SR-STE (Zhou et al., ICLR 2021):

    grad_W = grad_{W*mask}  +  decay * (1 - mask) * W

the sparse weight's gradient passed straight through to every dense entry (so pruned weights can come back) plus
a decay that pulls the pruned entries towards zero (so the mask settles). The decay term is added by every
backward through the weight: with gradient accumulation over A micro-batches (whose losses are divided by A) pass
decay / A to keep the per-step strength.

Only 2:4 is accelerated (Sparse Tensor Cores, sm80+, through cuSPARSELt) and only 2:4 has a packed format
(madtp_kernels.SparseLinear); other N:M patterns (the published code's 4:8) are accepted for experiments only,
with `allow_unaccelerated=True`, and `export_sparse` refuses them.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from madtp_kernels import SparseLinear, prune_2to4

from ..patch import find_towers
from ..weights import GROUP, encoder_linears, prunable

ACCELERATED = "2:4"
TAG = "_madtp_nm_pattern"   # set by one_shot on the layers it pruned (plain attribute: survives deepcopy)

__all__ = ["NMSparsity", "nm_mask", "prepare_sparse_training", "one_shot", "export_sparse", "sparsity_report"]


def parse_pattern(pattern: str, allow_unaccelerated: bool = False) -> tuple[int, int]:
    """"N:M" -> (N, M). Anything but 2:4 needs allow_unaccelerated=True (and then warns)."""
    try:
        n, m = (int(p) for p in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"pattern: expected 'N:M' (e.g. '2:4'), got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern: expected 'N:M' with 0 < N < M, got {pattern!r}")
    if f"{n}:{m}" != ACCELERATED:
        if not allow_unaccelerated:
            raise ValueError(f"pattern: {pattern!r} runs no faster than dense on any hardware (Sparse Tensor Cores "
                             f"accelerate {ACCELERATED} only); pass allow_unaccelerated=True to use it anyway")
        warnings.warn(f"pattern {pattern!r}: only {ACCELERATED} is accelerated (Sparse Tensor Cores); {pattern} "
                      "weights will not run faster on any hardware and cannot be exported to a packed format",
                      stacklevel=3)
    return n, m


def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """bool mask of weight's shape: in each group of m consecutive input features, the n largest |w| (the lower
    index wins ties, as madtp_kernels.prune_2to4, which is used for 2:4)."""
    if (n, m) == (2, 4):
        return prune_2to4(weight)
    groups = weight.detach().abs().reshape(*weight.shape[:-1], -1, m)
    order = torch.sort(groups.float(), dim=-1, descending=True, stable=True).indices[..., :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(weight.shape)


class _SRSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, decay: float) -> Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, mask = ctx.saved_tensors
        if ctx.decay:
            grad = grad + ctx.decay * (~mask) * weight
        return grad, None, None


class NMSparsity(nn.Module):
    """The parametrization: dense W -> W * nm_mask(W), with the SR-STE backward (see the module docstring)."""

    def __init__(self, n: int, m: int, decay: float):
        super().__init__()
        self.n, self.m, self.decay = n, m, float(decay)

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    def mask(self, weight: Tensor) -> Tensor:
        return nm_mask(weight, self.n, self.m)

    def forward(self, weight: Tensor) -> Tensor:
        return _SRSTE.apply(weight, self.mask(weight), self.decay)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern}, decay={self.decay}"


def _sparsity_of(module: nn.Module) -> NMSparsity | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, NMSparsity)), None)


def _tower_linears(model: nn.Module, filter_fn, m: int):
    """(parent, child name, fqn, child) for the plain nn.Linear layers HWP prunes (madtp.weights.sparsify's
    selection: inside the encoder towers, in_features a multiple of 8 (and of M), filter_fn(module, fqn))."""
    found = []
    for module, child_name, fqn, child in encoder_linears(model, filter_fn):
        if _sparsity_of(child) is not None:
            raise ValueError(f"model: {fqn} already has an N:M parametrization "
                             "(prepare_sparse_training was called already)")
        if prunable(child, fqn, filter_fn, math.lcm(GROUP, m)):
            found.append((module, child_name, fqn, child))
    return found


def prepare_sparse_training(model: nn.Module, pattern: str = "2:4", decay: float = 2e-4,
                            filter_fn: Callable[[nn.Module, str], bool] | None = None,
                            allow_unaccelerated: bool = False) -> nn.Module:
    """Parametrize the encoders' Linear weights for SR-STE training with an N:M mask (in place; returns model).

    The state dict then holds each dense weight under `<layer>.parametrizations.weight.original`: call this before
    loading a checkpoint of such a run. Undo with `export_sparse` (packed 2:4) or
    `torch.nn.utils.parametrize.remove_parametrizations`."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0:
        raise ValueError(f"decay: expected a number >= 0, got {decay!r}")
    n, m = parse_pattern(pattern, allow_unaccelerated)
    layers = _tower_linears(model, filter_fn, m)
    for _, _, _, child in layers:
        parametrize.register_parametrization(child, "weight", NMSparsity(n, m, decay))
    return model


@torch.no_grad()
def one_shot(model: nn.Module, pattern: str = "2:4", filter_fn: Callable[[nn.Module, str], bool] | None = None,
             allow_unaccelerated: bool = False) -> nn.Module:
    """Magnitude N:M masks computed once and applied (weights zeroed in place), as apex's ASP does; no hooks, so
    further training regrows the zeros. The layers stay nn.Linear; `export_sparse` packs 2:4 ones."""
    n, m = parse_pattern(pattern, allow_unaccelerated)
    for _, _, _, child in _tower_linears(model, filter_fn, m):
        child.weight.mul_(nm_mask(child.weight, n, m))
        setattr(child, TAG, f"{n}:{m}")
    return model


def _sparse_layers(model: nn.Module):
    """(parent, child name, fqn, child, pattern) for every layer prepare_sparse_training or one_shot pruned."""
    out = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            fqn = f"{name}.{child_name}" if name else child_name
            sparsity = _sparsity_of(child)
            if sparsity is not None:
                out.append((module, child_name, fqn, child, sparsity.pattern))
            elif isinstance(child, nn.Linear) and hasattr(child, TAG):
                out.append((module, child_name, fqn, child, getattr(child, TAG)))
    return out


@torch.no_grad()
def export_sparse(model: nn.Module) -> nn.Module:
    """The N:M layers (SR-STE parametrized or one_shot) -> madtp_kernels.SparseLinear with their final masks (the
    magnitude 2:4 mask of the final dense weight, as the last forward used). In place; returns the model, whose
    outputs equal the masked dense model's. 2:4 only: no other pattern has a packed format."""
    layers = _sparse_layers(model)
    if not layers:
        raise ValueError("model: no N:M-pruned layers found; call prepare_sparse_training or one_shot first")
    other = sorted({p for *_, p in layers if p != ACCELERATED})
    if other:
        raise ValueError(f"model: pattern {other[0]!r} has no packed format (SparseLinear packs {ACCELERATED} "
                         f"only); {sum(p != ACCELERATED for *_, p in layers)} layers use it")
    for parent, child_name, _, child, _ in layers:
        if _sparsity_of(child) is not None:
            mask = _sparsity_of(child).mask(child.parametrizations.weight.original)
            parametrize.remove_parametrizations(child, "weight", leave_parametrized=True)
        else:
            mask = prune_2to4(child.weight)
            delattr(child, TAG)
        setattr(parent, child_name, SparseLinear.from_dense(child, mask))
    return model


@torch.no_grad()
def _count(module: nn.Module) -> tuple[int, int, bool]:
    """(dense-equivalent parameters, non-zero parameters, is an N:M layer) of module's own parameters."""
    if isinstance(module, SparseLinear):
        bias = module.bias.numel() if module.bias is not None else 0
        nonzero = int(torch.count_nonzero(module.values)) + \
            (int(torch.count_nonzero(module.bias)) if module.bias is not None else 0)
        return module.in_features * module.out_features + bias, nonzero, True
    own = dict(module.named_parameters(recurse=False))
    params = sum(p.numel() for p in own.values())
    nonzero = sum(int(torch.count_nonzero(p)) for p in own.values())
    sparse = hasattr(module, TAG)
    if _sparsity_of(module) is not None:   # the effective weight: the masked one
        w = module.weight
        params, nonzero, sparse = params + w.numel(), nonzero + int(torch.count_nonzero(w)), True
    return params, nonzero, sparse


def sparsity_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per encoder branch ("vision", "text") and "total" (the towers together): "parameters" (dense-equivalent:
    a SparseLinear counts as in * out (+ bias)), "nonzero" (of the weights the forward uses: masked ones under
    SR-STE), "density" = nonzero / parameters, "sparsity" = 1 - density, "sparse_layers" (N:M layers)."""
    report: dict[str, dict[str, float]] = {}
    for tower in find_towers(model):
        entry = report.setdefault(tower.spec.branch, {"parameters": 0, "nonzero": 0, "sparse_layers": 0})
        for module in tower.module.modules():
            if isinstance(module, parametrize.ParametrizationList):
                continue   # its `original` is counted, masked, by the layer that owns it
            params, nonzero, sparse = _count(module)
            entry["parameters"] += params
            entry["nonzero"] += nonzero
            entry["sparse_layers"] += int(sparse)
    report["total"] = {k: sum(e[k] for e in list(report.values())) for k in ("parameters", "nonzero",
                                                                             "sparse_layers")}
    for entry in report.values():
        entry["density"] = entry["nonzero"] / entry["parameters"] if entry["parameters"] else 0.0
        entry["sparsity"] = 1.0 - entry["density"] if entry["parameters"] else 0.0
    return report
