"""The compiled extension: its ops carry the Python twins' schemas, and CUDA ops refuse CPU tensors."""
import pytest
import torch

import madtp_kernels as mk
from madtp_kernels import _dispatch, attention, pruning, tokens

needs_extension = pytest.mark.skipif(not _dispatch.BACKENDS["cuda"].is_available(),
                                     reason="madtp_kernels._C not built")
# GPU tests in gpu.sh's sense (`-m cuda`): they judge the built extension, which only a GPU machine builds there.
pytestmark = pytest.mark.cuda


def _signature(op_packet) -> str:
    schema = str(op_packet.default._schema)
    return schema[schema.index("("):]


SCHEMAS = {**tokens.SCHEMAS, "varlen_attention": attention.SCHEMA, "score_and_prune": pruning.SCHEMA}


@needs_extension
@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_cpp_schema_matches_python(op):
    cuda_op = getattr(torch.ops.madtp_kernels, f"{op}_cuda")
    assert _signature(cuda_op) == _signature(getattr(torch.ops.madtp_kernels, f"{op}_torch"))
    assert _signature(cuda_op) == SCHEMAS[op]


@needs_extension
def test_cuda_op_refuses_cpu_tensors():
    x = torch.randn(4, 3)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.ops.madtp_kernels.prune_tokens_cuda(x, cu, torch.rand(4), torch.rand(1), 1, True)
    with mk.use_backend("cuda"), pytest.raises(TypeError, match="backend 'cuda'"):
        mk.prune_tokens(x, cu, torch.rand(4), torch.rand(1))
    stats = (torch.rand(4, 2), torch.rand(4, 2))
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.ops.madtp_kernels.score_and_prune_cuda(x, cu, *stats, torch.randn(4, 2, 8), torch.randn(4, 3), 1.0,
                                                     None, True, 4)
    with mk.use_backend("cuda"), pytest.raises(TypeError, match="backend 'cuda'"):
        mk.score_and_prune(x, cu, stats, torch.randn(4, 2, 8), torch.randn(4, 3), temperature=1.0)


@needs_extension
def test_cusparselt_is_linked():
    version = torch.ops.madtp_kernels.cusparselt_version()
    assert version >= 800  # CUSPARSELT_VERSION: MAJOR*1000 + MINOR*100 + PATCH; the wheel torch pins is 0.8.x


@needs_extension
def test_extension_names_the_archs_it_was_built_for():
    if not hasattr(torch.ops.madtp_kernels, "cuda_archs"):
        pytest.skip("madtp_kernels._C predates cuda_archs (rebuild it)")
    assert torch.ops.madtp_kernels.cuda_archs() == "sm_80,sm_90a,compute_90"
    assert _dispatch.cuda_archs() == ("sm_80", "sm_90a", "compute_90")
