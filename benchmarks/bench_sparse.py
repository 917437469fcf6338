"""2:4 sparse_linear vs dense F.linear on the ViT MLP shapes, timed in the same run; on a GPU also PyTorch's
to_sparse_semi_structured. Few tokens is where the weight read dominates (the Triton path's regime), many
tokens where the GEMM is compute-bound (cuSPARSELt's)."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_GPU, record, run

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


def impls():
    names = ["dense"] + (["torch-semi-structured"] if ON_GPU else [])
    return names + [f"madtp-{b}" for b in _dispatch.available_backends()
                    if b in _dispatch.implementations("sparse_linear") and DEVICE.type in _dispatch.BACKENDS[b].devices]


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("impl", impls())
def test_sparse_linear(benchmark, shape, tokens, impl):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(shape.out_features, shape.in_features, generator=g)
    weight = (weight * mk.prune_2to4(weight)).to(DEVICE, DTYPE)
    bias = torch.randn(shape.out_features, generator=g).to(DEVICE, DTYPE)
    x = torch.randn(tokens, shape.in_features, generator=g).to(DEVICE, DTYPE)
    sparse = mk.compress_2to4(weight)
    weight_bytes = weight.nbytes
    if impl == "dense":
        fn = lambda: F.linear(x, weight, bias)  # noqa: E731
    elif impl == "torch-semi-structured":
        semi = torch.sparse.to_sparse_semi_structured(weight)
        fn = lambda: F.linear(x, semi, bias)  # noqa: E731
    else:
        backend = impl.removeprefix("madtp-")
        weight_bytes = sparse.nbytes

        def fn():
            with mk.use_backend(backend):
                return mk.sparse_linear(x, sparse, bias)
    benchmark.group = f"sparse_linear {shape.name} tokens {tokens}"
    run(benchmark, fn)
    flops = 2 * tokens * shape.in_features * shape.out_features  # dense-equivalent FLOPs
    moved = weight_bytes + (x.numel() + tokens * shape.out_features) * x.element_size()
    record(benchmark, backend=impl, flops=flops, bytes_moved=moved, tokens=tokens)
