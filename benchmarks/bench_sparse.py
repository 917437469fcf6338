"""2:4 sparse_linear vs dense F.linear on the ViT MLP shapes, timed in the same run; on a GPU also PyTorch's
to_sparse_semi_structured. Few tokens is where the weight read dominates (the Triton path's regime), many
tokens where the GEMM is compute-bound (cuSPARSELt's).

Shape-major: each shape's dense baseline and sparse rows run back to back (the target is their ratio, and the
load of a shared machine drifts over a suite); each sparse row also records `paired_speedup`, dense time / its
time over rounds that alternate the two calls."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_GPU, paired_speedup, record, run

import madtp_kernels as mk
from madtp_kernels import _dispatch


@dataclass(frozen=True)
class Shape:
    name: str
    in_features: int
    out_features: int


SHAPES = [Shape("vit-b-fc1", 768, 3072), Shape("vit-b-fc2", 3072, 768), Shape("vit-l-fc1", 1024, 4096),
          Shape("vit-l-fc2", 4096, 1024)]
TOKENS = [16, 64, 4096, 16384] if ON_GPU else [64, 1576]  # CPU: one ViT-B image's worth x 8 (197 x 8)
DTYPE = torch.float16 if ON_GPU else torch.float32
PAIRED_ROUNDS = 20


def impls():
    names = ["dense"] + (["torch-semi-structured"] if ON_GPU else [])
    return names + [f"madtp-{b}" for b in _dispatch.available_backends()
                    if b in _dispatch.implementations("sparse_linear") and DEVICE.type in _dispatch.BACKENDS[b].devices]


VARIANTS = [(shape, tokens, impl) for shape in SHAPES for tokens in TOKENS for impl in impls()]


@pytest.mark.parametrize("shape,tokens,impl", VARIANTS, ids=[f"{i}-{s.name}-{t}" for s, t, i in VARIANTS])
def test_sparse_linear(benchmark, shape, tokens, impl):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(shape.out_features, shape.in_features, generator=g)
    weight = (weight * mk.prune_2to4(weight)).to(DEVICE, DTYPE)
    bias = torch.randn(shape.out_features, generator=g).to(DEVICE, DTYPE)
    x = torch.randn(tokens, shape.in_features, generator=g).to(DEVICE, DTYPE)
    sparse = mk.compress_2to4(weight)
    weight_bytes = weight.nbytes
    dense = lambda: F.linear(x, weight, bias)  # noqa: E731
    extra = {}
    if impl == "dense":
        fn = dense
    elif impl == "torch-semi-structured":
        semi = torch.sparse.to_sparse_semi_structured(weight)
        fn = lambda: F.linear(x, semi, bias)  # noqa: E731
    else:
        backend = mk.use_backend(impl.removeprefix("madtp-"))
        backend.__enter__()   # once, as a model's forward would: no context manager inside the timed call
        weight_bytes = sparse.nbytes

        def fn():
            return mk.sparse_linear(x, sparse, bias)
    try:
        benchmark.group = f"sparse_linear {shape.name} tokens {tokens}"
        run(benchmark, fn)
        if impl != "dense":
            extra["paired_speedup"] = round(paired_speedup(dense, fn, PAIRED_ROUNDS), 4)
    finally:
        if impl.startswith("madtp-"):
            backend.__exit__(None, None, None)
    flops = 2 * tokens * shape.in_features * shape.out_features  # dense-equivalent FLOPs
    moved = weight_bytes + (x.numel() + tokens * shape.out_features) * x.element_size()
    record(benchmark, backend=impl, flops=flops, bytes_moved=moved, tokens=tokens, in_features=shape.in_features,
           out_features=shape.out_features, dtype=str(DTYPE).removeprefix("torch."), baseline=impl == "dense",
           **extra)
