"""CLIP (Hugging Face `transformers.models.clip`): the encoder layer on pruned token sets, and its towers.

The layer is pre-LN: attention + residual, then (pruning) then MLP + residual. The text tower is causal and pools
at the EOT token, which is found as CLIPTextModel finds it and is never pruned. The text tower drops tokens
without merging them (see TEXT).
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.models.clip import modeling_clip as hf

from .spec import TowerInputs, TowerSpec


def encoder_layer(layer: hf.CLIPEncoderLayer, x: Tensor, ctx) -> Tensor:
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    heads = (attn.num_heads, attn.head_dim)
    q, k, v = (proj(h).unflatten(-1, heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    o, stats = ctx.attend(q, k, v, scale=attn.scale, causal=ctx.plan.causal)
    x = x + attn.out_proj(o.flatten(-2))
    x = ctx.prune(x, o, stats)
    return x + layer.mlp(layer.layer_norm2(x))


def _vision_inputs(tower, bound: dict) -> TowerInputs:
    return TowerInputs()


def _text_inputs(tower, bound: dict) -> TowerInputs:
    input_ids, mask = bound.get("input_ids"), bound.get("attention_mask")
    if input_ids is None:
        return TowerInputs(valid=mask)
    input_ids = input_ids.view(-1, input_ids.shape[-1])
    eos = tower.config.eos_token_id
    ids = input_ids.to(torch.int)
    # As CLIPTextModel pools: the largest id where eos_token_id == 2 (the legacy configs), else the first eos.
    eot = ids.argmax(dim=-1) if eos == 2 else (ids == eos).int().argmax(dim=-1)
    protected = torch.zeros_like(input_ids, dtype=torch.bool)
    protected[torch.arange(ids.shape[0], device=ids.device), eot] = True
    return TowerInputs(valid=mask.bool() if mask is not None else None, protected=protected)


VISION = TowerSpec(branch="vision", tower_types=(hf.CLIPVisionModel, getattr(hf, "CLIPVisionTransformer", None)),
                   encoder_type=hf.CLIPEncoder, layer_type=hf.CLIPEncoderLayer, layer_fn=encoder_layer,
                   inputs=_vision_inputs, output="compact", causal=False)
# No merged row in the causal text tower: appended after a sample's tokens (as in the official code), causal
# attention hides it from EOT, the one row CLIP reads; it would cost a row in every later layer for no change
# of the text feature. Put before EOT it would change that feature, with a position no token of the method
# has. Dropping without merging is the official EOT feature at one row less.
TEXT = TowerSpec(branch="text", tower_types=(hf.CLIPTextModel, getattr(hf, "CLIPTextTransformer", None)),
                 encoder_type=hf.CLIPEncoder, layer_type=hf.CLIPEncoderLayer, layer_fn=encoder_layer,
                 inputs=_text_inputs, output="positions", causal=True, merge=False)

SPECS = (VISION, TEXT)
MODELS = (hf.CLIPModel, hf.CLIPVisionModel, hf.CLIPTextModel)
