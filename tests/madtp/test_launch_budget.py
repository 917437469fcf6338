"""The cost budget of the pruned path (DESIGN.md), counted exactly on CPU: what a GPU pays besides FLOPs.

A pruning layer may add at most 12 kernel launches to the dense layer's own on the Triton backend (what a GPU
runs; counted under the interpreter) and at most one host sync (the new row count and longest length, read
together); at inference a layer that does not prune adds nothing. Counted with madtp_kernels.tools.launches,
which sees inside the custom ops.
"""
import copy

import madtp
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

import madtp_kernels as mk
from madtp_kernels.tools.launches import LaunchCounter


def tower(layers: int) -> CLIPVisionModel:
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                            num_hidden_layers=layers, image_size=64, patch_size=16)).eval()


def count(model, backend: str) -> LaunchCounter:
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), mk.use_backend(backend):
        model(pixel_values=x)   # first calls build caches
        with LaunchCounter() as counter:
            model(pixel_values=x)
    return counter


def applied(model, temperature):
    return madtp.apply(copy.deepcopy(model), madtp.MADTPConfig(num_alignment_tokens=8, temperature=temperature,
                                                               prune_text=False))


@pytest.fixture(scope="module")
def counts():
    out = {}
    for layers in (2, 4):
        model = tower(layers)
        out[layers] = {"dense": count(model, "triton"), "control": count(applied(model, None), "triton"),
                       "pruned": count(applied(model, 1.0), "triton")}
    return out


def test_a_pruning_layer_adds_at_most_12_launches_and_one_sync(counts):
    for layers, c in counts.items():
        extra = (c["pruned"].launches - c["dense"].launches) / layers
        assert extra <= 12, (layers, extra, c["pruned"].by_op.most_common(20))
        assert c["pruned"].syncs - c["dense"].syncs <= layers, c["pruned"].syncs_by


def test_a_layer_that_does_not_prune_adds_nothing(counts):
    # What the applied model adds without pruning is per forward (the tower's entry and exit), not per layer.
    added = {layers: c["control"].launches - c["dense"].launches for layers, c in counts.items()}
    assert added[4] == added[2], added
    assert all(c["control"].syncs == c["dense"].syncs for c in counts.values())
    # and pruning layers cost the same each: the count grows by a constant per layer
    pruned = {layers: c["pruned"].launches for layers, c in counts.items()}
    dense = {layers: c["dense"].launches for layers, c in counts.items()}
    assert (pruned[4] - dense[4]) - (pruned[2] - dense[2]) <= 2 * 12


def test_the_counter_sees_inside_custom_ops():
    x = torch.randn(10, 4)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with LaunchCounter() as c, mk.use_backend("torch"):
        mk.prune_tokens(x, cu, torch.rand(10), torch.full((2,), 0.5))
    assert "prune_tokens_torch" in c.by_custom_op and c.by_custom_op["prune_tokens_torch"] > 3
    assert c.syncs >= 1   # the validation's host copy of cu_seqlens, and the new layout's read
