"""2:4 structured sparse Linear: pruning, the compressed weight, sparse_linear and SparseLinear.

Compressed format (one for every backend, and what a SparseLinear state dict holds). A weight W [N, K]
(out_features N, in_features K, K % 8 == 0) is 2:4 along K when every group of 4 consecutive input features of
a row has at most 2 non-zeros. It is stored as
  values [N, K/2]  (W's dtype): the two kept entries of group g of row n at values[n, 2g], values[n, 2g + 1],
                   in increasing column order (a kept entry may itself be 0);
  meta   [N, K/8]  uint8: byte j of row n describes groups 2j (low nibble) and 2j + 1 (high nibble); in each
                   nibble bits 0-1 are the position (0..3) in the group of the first kept entry, bits 2-3 of
                   the second, and the first is below the second: the only valid nibbles are 0x4, 0x8, 0x9,
                   0xC, 0xD, 0xE. Other codes are refused when a SparseWeight is built or a state dict loaded.
fp16 values + meta are 0.5625x the dense fp16 bytes. Backends may keep a derived form per weight, made once and
reused by every call: the cuda backend cuSPARSELt's own compressed copy, the torch (CPU) backend the dense one.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _python_dispatch

from . import _dispatch, _library
from . import _validation as checks
from .reference import sparse as ref

SCHEMA = "(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor"
GROUP = 8  # in_features must be a multiple of this: two groups of 4 share a metadata byte
_ZERO_WEIGHT_META = 0x44


class SparseWeight:
    """A 2:4 weight in the compressed format above; `.to_dense()` restores W. The metadata is checked when the
    weight is built (once per meta tensor and version: rebuilding from the same buffers costs no host read)."""

    def __init__(self, values: Tensor, meta: Tensor):
        checks.check_tensor(values, "values")
        checks.check_tensor(meta, "meta")
        checks.check_ndim(values, "values", 2, "2-D [out_features, in_features / 2]")
        checks.check_dtype(meta, "meta", (torch.uint8,))
        checks.check_floating(values, "values")
        if values.shape[0] < 1 or values.shape[1] < GROUP // 2:
            raise ValueError(f"values: expected [out_features >= 1, in_features / 2 >= {GROUP // 2}], got shape "
                             f"{tuple(values.shape)}")
        if tuple(meta.shape) != (values.shape[0], values.shape[1] // 4) or values.shape[1] % 4:
            raise ValueError(f"meta: expected shape {(values.shape[0], values.shape[1] // 4)} for values of shape "
                             f"{tuple(values.shape)} (in_features a multiple of {GROUP}), got {tuple(meta.shape)}")
        if meta.device != values.device:
            raise ValueError(f"meta: expected a tensor on {values.device} (the device of values), got {meta.device}")
        _checked_meta(meta)
        self.values, self.meta = values, meta

    @classmethod
    def _trusted(cls, values: Tensor, meta: Tensor) -> SparseWeight:
        """Values and meta this module just made from a checked weight: no check, no host read."""
        weight = cls.__new__(cls)
        weight.values, weight.meta = values, meta
        return weight

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[0], self.values.shape[1] * 2

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.meta.nbytes

    def to_dense(self) -> Tensor:
        return ref.decompress(self.values, self.meta)

    def to(self, *args, **kwargs) -> SparseWeight:
        values = self.values.to(*args, **kwargs)
        return SparseWeight._trusted(values, self.meta.to(device=values.device))

    def __repr__(self) -> str:
        return f"SparseWeight(shape={self.shape}, dtype={self.dtype}, device={self.device}, nbytes={self.nbytes})"


def prune_2to4(weight: Tensor) -> Tensor:
    """bool mask of W's shape: in each group of 4 consecutive input features, the 2 largest |w|."""
    _check_weight(weight)
    return ref.prune_2to4(weight)


def _check_weight(weight: Tensor, name: str = "weight") -> None:
    checks.check_tensor(weight, name)
    checks.check_ndim(weight, name, 2, "2-D [out_features, in_features]")
    checks.check_floating(weight, name)
    checks.check_has_data(weight, name)
    checks.check_sizes(weight, name, (0, 1), "out_features and in_features")
    if weight.shape[1] % GROUP:
        raise ValueError(f"{name}: expected in_features (dim 1) a multiple of {GROUP} for the 2:4 format, "
                         f"got {weight.shape[1]}")


def compress_2to4(weight: Tensor) -> SparseWeight:
    """Compress a weight that is already 2:4 along its input dim (raises on one that is not)."""
    _check_weight(weight)
    weight = weight.detach()
    count = ref.nonzeros_per_group(weight)
    if not torch.compiler.is_compiling() and bool((count > 2).any()):
        row, group = (int(i) for i in (count > 2).nonzero()[0])
        raise ValueError(f"weight: expected at most 2 non-zeros in every group of 4 input features (2:4), got "
                         f"{int(count[row, group])} in row {row}, columns {4 * group}..{4 * group + 3}; "
                         "prune it first (weight * prune_2to4(weight))")
    return SparseWeight._trusted(*ref.compress(weight.contiguous()))


# ------------------------------------------------------------------ backends

def _triton_forward(x, values, meta, bias):
    from .triton import sparse  # first use: Triton reads TRITON_INTERPRET when kernels are decorated

    return sparse.sparse_linear(x, values, meta, bias)


class _PerWeight:
    """A form of a compressed weight derived once and reused: one per values tensor (dropped when the tensor
    is freed), rebuilt when values or meta is another tensor (identity: `module.meta = other.meta` keeps the
    version counter) or changed in place through the tensor (its version counter; writes through `.data` are
    not seen). Values that require grad (in training) and inference tensors (no version counter) are derived
    afresh every call.
    Keyed by id with a liveness check, since tensors compare elementwise and cannot key a WeakKeyDictionary."""

    def __init__(self, build):
        self._build = build
        self._entries: dict[int, tuple] = {}

    def __call__(self, values: Tensor, meta: Tensor) -> Tensor:
        # Weights in training change every step; inference tensors keep no version counter to check.
        if values.requires_grad or values.is_inference() or meta.is_inference():
            return self._build(values, meta)
        version = (values._version, meta._version)
        entry = self._entries.get(id(values))
        if entry is None or entry[0]() is not values or entry[1]() is not meta or entry[2] != version:
            if entry is None or entry[0]() is not values:
                weakref.finalize(values, self._entries.pop, id(values), None)
            entry = (weakref.ref(values), weakref.ref(meta), version, self._build(values, meta))
            self._entries[id(values)] = entry
        return entry[3]

    def __len__(self) -> int:
        return len(self._entries)


# Meta tensors whose encoding was checked, by id -> (weak reference, version counter; None for an inference
# tensor, which has none): a SparseLinear builds its SparseWeight every forward, and only the first build of
# a buffer (or of a buffer written since) pays the check's host read.
_checked: dict[int, tuple[weakref.ref, int | None]] = {}


def _mark_checked(meta: Tensor) -> None:
    key = id(meta)
    entry = _checked.get(key)
    if entry is None or entry[0]() is not meta:
        weakref.finalize(meta, _checked.pop, key, None)
    _checked[key] = (weakref.ref(meta), None if meta.is_inference() else meta._version)


def _checked_meta(meta: Tensor, name: str = "meta") -> None:
    if torch.compiler.is_compiling():
        return
    entry = _checked.get(id(meta))
    if (entry is not None and entry[0]() is meta
            and entry[1] == (None if meta.is_inference() else meta._version)):
        return
    checks.check_2to4_meta(meta, name)
    _mark_checked(meta)


# The torch backend keeps the dense weight: then a call costs what F.linear costs (the CPU path trades memory
# for time here; the memory saving is the GPU backends'). The cuda backend keeps cuSPARSELt's own compressed copy.
_dense_weight = _PerWeight(ref.decompress)
_cusparselt_weight = _PerWeight(
    lambda values, meta: torch.ops.madtp_kernels.cusparselt_compress(ref.decompress(values, meta).contiguous()))


def _torch_forward(x, values, meta, bias):
    return F.linear(x, _dense_weight(values, meta), bias)


_PLAIN = (Tensor, nn.Parameter)   # not subclasses that override torch functions (FakeTensor, DTensor, ...)


def _direct_call(x: Tensor, values: Tensor, bias: Tensor | None) -> bool:
    """Whether an eager torch-backend call may skip the custom op and run F.linear on the cached dense weight
    itself. The op's dispatch (autograd and autocast wrappers, the dynamo-disable frame) runs ~40 Python frames
    per call that evict the caches between GEMMs: measured 0.3-0.5 ms of CPU time per call at 64 tokens on the
    ViT-B MLP shapes (F.linear takes 2-4 ms there), 0.89-0.96x of dense. The op stays the path for everything
    that needs it: torch.compile / export tracing (a dispatch mode or tensor subclass), autocast (the op computes
    in the dtype it is given) and autograd (its backward gives the gradient of the kept entries only)."""
    return (not torch.compiler.is_compiling() and type(x) in _PLAIN and type(values) in _PLAIN
            and (bias is None or type(bias) in _PLAIN) and not torch.is_autocast_enabled(x.device.type)
            and _python_dispatch._get_current_dispatch_mode() is None
            and not (torch.is_grad_enabled()
                     and (x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad))))


def _cuda_forward(x, values, meta, bias):
    return torch.ops.madtp_kernels.cusparselt_linear(x, _cusparselt_weight(values, meta), values.shape[0],
                                                     values.shape[1] * 2, bias)


def _fake(x, values, meta, bias):
    return x.new_empty((x.shape[0], values.shape[0]))


def _setup_context(ctx, inputs, output):
    x, values, meta, bias = inputs
    ctx.needs = (x.requires_grad, values.requires_grad, bias is not None and bias.requires_grad)
    ctx.save_for_backward(x, values, meta)


def _backward(ctx, grad_y):
    x, values, meta = ctx.saved_tensors
    grad_x, grad_values, grad_bias = ref.sparse_linear_backward(grad_y, x, values, meta, ctx.needs)
    return grad_x, grad_values, None, grad_bias


_impls = {"torch": _torch_forward, "triton": _triton_forward}
if _dispatch.BACKENDS["cuda"].is_available() and hasattr(torch.ops.madtp_kernels, "cusparselt_linear"):
    _impls["cuda"] = _cuda_forward
_library.define("sparse_linear", SCHEMA, _impls, fake=_fake, backward=_backward, setup_context=_setup_context)
_TORCH_OP = _dispatch.implementations("sparse_linear")["torch"]


# ------------------------------------------------------------------ public API

def sparse_linear(x: Tensor, weight: SparseWeight, bias: Tensor | None = None) -> Tensor:
    """x [..., in_features] -> x W^T + bias [..., out_features], W a 2:4 SparseWeight. Gradients flow to x
    (and to bias, and to weight.values if they require grad)."""
    checks.check_tensor(x, "x")
    if not isinstance(weight, SparseWeight):
        raise TypeError(f"weight: expected a SparseWeight (compress_2to4(w) or SparseLinear.from_dense), got "
                        f"{type(weight).__name__}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x: expected [..., {in_features}] (in_features of weight), got {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x: expected dtype {weight.dtype} (the dtype of weight), got {x.dtype}")
    if bias is not None:
        checks.check_tensor(bias, "bias")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias: expected shape ({out_features},) (out_features), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: expected dtype {x.dtype} (the dtype of x), got {bias.dtype}")
    checks.check_same_device(x, "x", weight=weight.values, bias=bias)
    rows = math.prod(x.shape[:-1])
    impl = _dispatch.select("sparse_linear", x.device, x.dtype, rows=rows, features=weight.shape)
    # Every path takes contiguous rows: the Triton kernel indexes by K // 2 and K // 8, the CUDA launcher refuses
    # anything else, and CPU F.linear in fp16/bf16 accumulates in the input dtype on a strided x and, on a 1-D x
    # with a strided bias, rounds x @ W^T before adding it (up to 57x the fp32-accumulation bound; test_attack).
    # Views are copied here, contiguous tensors pass as they are.
    rows_x = x.reshape(rows, in_features).contiguous()
    bias = None if bias is None else bias.contiguous()
    if impl is _TORCH_OP and _direct_call(x, weight.values, bias):
        # the dense weight is derived once per values tensor (a view included), contiguous [out_features,
        # in_features]: the layout nn.Linear holds
        y = F.linear(rows_x, _dense_weight(weight.values, weight.meta), bias)
    else:
        y = impl(rows_x, weight.values.contiguous(), weight.meta.contiguous(), bias)
    return y.reshape(*x.shape[:-1], out_features)


class SparseLinear(nn.Module):
    """nn.Linear with a 2:4 weight kept compressed. Its state dict holds plain tensors (values, meta, bias) that
    round-trip through safetensors and load on any machine."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__()
        checks.check_int(in_features, "in_features", minimum=GROUP, maximum=checks.INT32_MAX)
        if in_features % GROUP:
            raise ValueError(f"in_features: expected a multiple of {GROUP} for the 2:4 format, got {in_features}")
        checks.check_int(out_features, "out_features", minimum=1, maximum=checks.INT32_MAX)
        checks.check_bool(bias, "bias")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating-point torch.dtype (or None), got {dtype!r}")
        self.in_features, self.out_features = in_features, out_features
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, **factory))
        # 0x44 (positions 0 and 1 in both groups) is what compress_2to4 gives the all-zero weight
        self.register_buffer("meta", torch.full((out_features, in_features // GROUP), _ZERO_WEIGHT_META,
                                                dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        _mark_checked(self.meta)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Tensor | None = None) -> SparseLinear:
        """The 2:4 version of `linear`: its weight times `mask` (default: prune_2to4 by magnitude)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        _check_weight(weight, "linear.weight")
        if mask is None:
            mask = ref.prune_2to4(weight)
        elif not isinstance(mask, Tensor) or mask.shape != weight.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask: expected a bool tensor of shape {tuple(weight.shape)}, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        sparse = compress_2to4(weight * mask.to(weight.device))
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device=weight.device,
                     dtype=weight.dtype)
        module.values.copy_(sparse.values)
        module.meta.copy_(sparse.meta)
        _mark_checked(module.meta)   # compress_2to4 made it
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checked before anything is copied: a refused state dict leaves the module as it was. A meta of another
        # dtype would be cast by copy_ (4.7 -> 4), so it is refused too; shapes are left to nn.Module's checks.
        name = prefix + "meta"
        meta = state_dict.get(name)
        if isinstance(meta, Tensor):
            checks.check_dtype(meta, name, (torch.uint8,))
            if meta.shape == self.meta.shape:
                checks.check_2to4_meta(meta, name)
        values = state_dict.get(prefix + "values")
        if isinstance(values, Tensor):
            checks.check_floating(values, prefix + "values")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if isinstance(meta, Tensor) and not error_msgs:
            _mark_checked(self.meta)   # just checked: the forward after a load pays no host read

    @property
    def weight(self) -> SparseWeight:
        return SparseWeight(self.values, self.meta)

    def to_dense(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.values.device,
                           dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        return sparse_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, 2:4"

