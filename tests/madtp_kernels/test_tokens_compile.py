"""torch.compile traces the token ops whole: fake implementations, no graph breaks, same results as eager."""
import pytest
import torch

import madtp_kernels as mk


class PruneAndPad(torch.nn.Module):
    """A layer as the model layer uses it: score, prune, merge, pad back."""

    def __init__(self, channels):
        super().__init__()
        self.score = torch.nn.Linear(channels, 1)

    def forward(self, x, cu_seqlens, threshold, max_len: int):
        scores = torch.sigmoid(self.score(x)).squeeze(1)
        pruned = mk.prune_tokens(x, cu_seqlens, scores, threshold)
        return mk.unpack(pruned.x, pruned.cu_seqlens, max_len=max_len)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)  # prune_tokens' row count is data-dependent
def test_compiled_module_has_no_graph_breaks(backend):
    torch.manual_seed(0)
    module = PruneAndPad(16)
    x = torch.randn(23, 16, requires_grad=True)
    cu = torch.tensor([0, 10, 10, 11, 23], dtype=torch.int32)
    threshold = torch.full((4,), 0.5)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    expected = module(x, cu, threshold, 12)
    got = compiled(x, cu, threshold, 12)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    expected.sum().backward()
    torch.testing.assert_close(grad, x.grad)
