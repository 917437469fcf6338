"""Bad input to score_and_prune is refused before any backend runs, with the argument named (issue 18; the
earlier cases live in test_pruning.py)."""
import pytest
import torch

import madtp_kernels as mk

I32 = torch.int32


def _args(rows=5, channels=4, heads=3, head_dim=4, device="cpu", **over):
    g = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(rows, channels, generator=g), layout=torch.tensor([0, 3, rows], dtype=I32),
                stats=(torch.rand(rows, heads, generator=g), torch.rand(rows, heads, generator=g)),
                attn_out=torch.randn(rows, heads, head_dim, generator=g),
                align_scores=torch.randn(rows, 2, generator=g), temperature=0.5)
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) else tuple(t.to(device) for t in v)
                if isinstance(v, tuple) else v) for k, v in args.items()}
    args.update(over)
    return args


CASES = [
    (dict(channels=0), ValueError, r"x: expected channels >= 1 \(dim 1\), got shape \(5, 0\)"),
    (dict(head_dim=0), ValueError, r"attn_out: expected head dim >= 1 \(dim 2\), got shape \(5, 3, 0\)"),
    (dict(device="meta"), ValueError, "x: expected a tensor with data .* meta device"),
    (dict(protected=[False] * 5), TypeError, "protected: expected a torch.Tensor, got list"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("over,exc,msg", CASES)
def test_rejects_on_every_backend(backend, over, exc, msg):
    with mk.use_backend(backend), pytest.raises(exc, match=msg):
        mk.score_and_prune(**_args(**over))


def test_valid_arguments_run():   # the cases above differ from a call that runs by their one argument
    out = mk.score_and_prune(**_args())
    assert out.x.shape[1] == 4 and out.layout.batch == 2
