"""count_flops charges dense SDPA attention like eager attention. Oracles: the eager model (its QK^T and PV are
bmm's, which torch's counter counts), 4*B*H*L*S*D, and torch's own SDPA formulas."""
import madtp
import pytest
import torch
import torch.nn.functional as F
from test_clip import inputs, tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count
from transformers import CLIPModel, CLIPTextModel, CLIPVisionModel

import madtp_kernels
from madtp_kernels import flops as kernel_flops

aten = torch.ops.aten
B, H, L, S, D = 2, 3, 5, 7, 8


def qkv(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, n, D, generator=g, requires_grad=requires_grad) for n in (L, S, S)]


def counted(op, fn):
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_flop_counts()["Global"].get(op, 0), counter.get_total_flops()


@pytest.mark.parametrize("masking", ["none", "causal", "mask"])
def test_flash_attention_for_cpu_forward_counts_4bhlsd(masking):
    q, k, v = qkv()
    kw = {"none": {}, "causal": {"is_causal": True},
          "mask": {"attn_mask": torch.zeros(B, 1, L, S).masked_fill(torch.rand(B, 1, L, S) < 0.3, -1e4)}}[masking]
    op = aten._scaled_dot_product_flash_attention_for_cpu
    # torch's convention for the CUDA SDPA ops: the full (L, S) grid, mask and causality not discounted
    assert counted(op, lambda: op(q, k, v, **kw)) == (4 * B * H * L * S * D, 4 * B * H * L * S * D)


def test_flash_attention_for_cpu_backward_counts_like_torch_sdpa_backward():
    q, k, v = qkv(requires_grad=True)
    op = aten._scaled_dot_product_flash_attention_for_cpu_backward
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        got, total = counted(op, lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    expected = sdpa_backward_flop_count(q.shape, q.shape, k.shape, v.shape)
    assert expected == 10 * B * H * L * S * D   # recomputed scores, dP, dV, dQ, dK
    assert got == expected and total == 4 * B * H * L * S * D + expected


def test_fused_attention_overrideable_formulas():
    q, k, v = qkv()
    fwd = flop_registry[aten._scaled_dot_product_fused_attention_overrideable]
    bwd = flop_registry[aten._scaled_dot_product_fused_attention_overrideable_backward]
    assert fwd(q, k, v, None, out_val=None) == 4 * B * H * L * S * D
    assert bwd(q, q, k, v, None, [True] * 4, q, None, out_val=None) == 10 * B * H * L * S * D


def test_registration_is_idempotent_and_keeps_torchs_formulas():
    before = dict(flop_registry)
    kernel_flops.register_sdpa()
    kernel_flops.register()
    madtp_kernels.flops.register_sdpa()
    assert flop_registry == before
    for name in ("flash_attention", "efficient_attention", "cudnn_attention"):
        for suffix in ("", "_backward"):
            formula = flop_registry[getattr(aten, f"_scaled_dot_product_{name}{suffix}")]
            assert formula.__module__ == "torch.utils.flop_counter", (name, suffix)


@pytest.mark.parametrize("model_class", [CLIPModel, CLIPVisionModel, CLIPTextModel])
def test_dense_sdpa_counts_like_eager(model_class):
    config = tiny_config()
    if model_class is not CLIPModel:
        config = config.vision_config if model_class is CLIPVisionModel else config.text_config
    x = inputs(batch=4, lengths=(9, 2, 6, 4))
    if model_class is CLIPVisionModel:
        x = {"pixel_values": x["pixel_values"]}
    elif model_class is CLIPTextModel:
        x = {k: x[k] for k in ("input_ids", "attention_mask")}
    counts = {}
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = model_class._from_config(config, attn_implementation=impl).eval()
        assert model.config._attn_implementation == impl
        counts[impl] = madtp.count_flops(model, **x)
    for branch in ("vision", "text", "total"):
        assert counts["sdpa"][branch] == pytest.approx(counts["eager"][branch], rel=1e-12), (branch, counts)
    if model_class is not CLIPTextModel:
        assert counts["sdpa"]["vision"] > 0
    if model_class is not CLIPVisionModel:
        assert counts["sdpa"]["text"] > 0
