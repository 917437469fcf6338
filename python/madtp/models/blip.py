"""BLIP (Hugging Face `transformers.models.blip`): its encoder layers on pruned token sets, its towers, and the
cross-attention of the modules that read a pruned image without being pruned themselves.

- Vision (BlipVisionModel): pre-LN like CLIP, one fused `qkv` Linear laid out [3, heads, head_dim]; pruning
  after attention + residual, before the MLP. Output "compact": kept rows + the merged row, CLS first, so the
  pooled [:, 0] is CLS.
- Text encoder (BlipTextModel called as an encoder): post-LN BERT layers; pruning after self-attention, before
  the cross-attention to the image, which reaches each sample's own kept image rows only (the image layout is
  looked up by the `encoder_hidden_states` tensor, see madtp.patch). Output "positions": [B, N, C] like the
  input, so [:, 0] (CLS, never pruned) is what the ITM head and the ITC projection read, and the output still
  pairs with the caller's attention_mask.
- Not pruned, not replaced: the decoders (BlipTextLMHeadModel: a language model predicts every position; they
  keep their own forward, KV cache and generate) and the question encoder of BlipForQuestionAnswering, whose
  every row (padding rows included: HF's answer decoder is given a mask of ones in generate, and in 5.x it drops
  the cross-attention mask altogether) feeds the answer decoder: pruning it would change what the decoder reads.
  Their cross-attention to a recognised pruned image gets the image's padding masked out (`PATCHES`). So in VQA
  only the image is pruned, and the text branch has no alignment features (alignment_loss needs ITM/ITC).
- Decoder `generate` (captioning; BLIP's own uses beam search): HF expands the image for num_beams /
  num_return_sequences (repeat_interleave) before the first forward, so the decoder would be handed a tensor no
  one recorded and attend the padding rows. `generate` is wrapped to pass the image's real rows as the
  `encoder_attention_mask` it already hands on (HF's are ones), which HF expands with the states; inside that
  call the decoder's forward records the expanded states with that mask, and the cross-attention masks as above
  (HF 5.x itself drops a cross-attention mask, so the mask alone would not do). Beam reordering keeps every beam
  in its sample's rows, whose image rows are the same.

Dropout: the hidden dropouts are the layers' own modules; attention-probability dropout (the vision
`attention_dropout`, the text `attention_probs_dropout_prob`) has no place in the varlen kernel and is not applied
in the towers (both default to 0 in BLIP's configs; in eval() it is a no-op anyway).
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
from transformers.models.blip import modeling_blip as hf
from transformers.models.blip import modeling_blip_text as hf_text

from .spec import MethodPatch, ModulePatch, OutputLayout, TowerInputs, TowerSpec


def vision_layer(layer: hf.BlipEncoderLayer, x: Tensor, ctx) -> Tensor:
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    # HF: qkv(h).reshape(B, N, 3, heads, head_dim): q, k, v are the outer split of the fused output.
    q, k, v = attn.qkv(h).unflatten(-1, (3, attn.num_heads, attn.head_dim)).unbind(-3)
    o, stats = ctx.attend(q, k, v, scale=attn.scale)
    x = x + attn.projection(o.flatten(-2))
    x = ctx.prune(x, o, stats)
    return x + layer.mlp(layer.layer_norm2(x))


def text_layer(layer: hf_text.BlipTextLayer, x: Tensor, ctx) -> Tensor:
    attn = layer.attention.self
    heads = (attn.num_attention_heads, attn.attention_head_size)
    scale = 1.0 / math.sqrt(attn.attention_head_size)
    q, k, v = (proj(x).unflatten(-1, heads) for proj in (attn.query, attn.key, attn.value))
    o, stats = ctx.attend(q, k, v, scale=scale)
    x = layer.attention.output(o.flatten(-2), x)          # dense, dropout, LayerNorm(+ residual)
    x = ctx.prune(x, o, stats)
    if ctx.memory is not None:
        cross = layer.crossattention
        q = cross.self.query(x).unflatten(-1, heads)
        k, v = (proj(ctx.memory).unflatten(-1, heads) for proj in (cross.self.key, cross.self.value))
        x = cross.output(ctx.cross_attend(q, k, v, scale=scale).flatten(-2), x)
    return layer.feed_forward_chunk(x)                     # chunking only splits rows: the same result


def _vision_inputs(tower, bound: dict) -> TowerInputs:
    return TowerInputs()


def _text_inputs(tower, bound: dict) -> TowerInputs:
    if bound.get("is_decoder"):
        raise ValueError("is_decoder: MADTP prunes BlipTextModel as a (bidirectional) encoder; call it with "
                         "is_decoder=False or madtp.remove the model")
    masks = {}
    for name in ("attention_mask", "encoder_attention_mask"):
        mask = bound.get(name)
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D [B, N] mask (1: token, 0: padding), got "
                             f"{tuple(mask.shape)}")
        masks[name] = mask.bool() if mask is not None else None
    memory = bound.get("encoder_hidden_states")
    if memory is not None and not tower.config.is_decoder:
        raise ValueError("encoder_hidden_states: this BlipTextModel has no cross-attention (config.is_decoder "
                         "is False)")
    return TowerInputs(valid=masks["attention_mask"], memory=memory, memory_valid=masks["encoder_attention_mask"])


def _cross_attention(layer: hf_text.BlipTextLayer):
    cross = getattr(layer, "crossattention", None)
    return cross.self if cross is not None else None


def _mask_cross_attention(outputs, module, args, kwargs):
    """A pre-hook on a decoder layer's cross-attention: handed a recognised tower output with padding rows (a
    pruned image), it masks them out with an additive encoder_attention_mask; any other call is left as it is.
    Works step by step under the KV cache: the cached keys have the image's rows, and the mask is rebuilt each
    call from the `encoder_hidden_states` that generate passes again (expanded by generate: recognised through
    `_generate_with_image_rows`). BlipTextAttention passes everything but hidden_states by keyword."""
    layout = outputs.output_layout(kwargs.get("encoder_hidden_states"))
    if layout is None or not layout.padded:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    keep = layout.valid.to(hidden.device)[:, None, None, :]
    given = kwargs.get("encoder_attention_mask")
    base = given if given is not None and given.is_floating_point() else \
        torch.zeros(keep.shape, dtype=hidden.dtype, device=hidden.device)
    return args, {**kwargs, "encoder_attention_mask": base.masked_fill(~keep, torch.finfo(base.dtype).min)}


class _Generating(threading.local):
    def __init__(self):
        self.decoders: set[int] = set()   # decoders inside a generate whose encoder mask is an image's rows


_generating = _Generating()   # per thread, like the call it describes: another thread's generate never sees it


@contextlib.contextmanager
def _image_rows_in_mask(decoder):
    ids, key = _generating.decoders, id(decoder)
    inside = key in ids
    ids.add(key)
    try:
        yield
    finally:
        if not inside:
            ids.discard(key)


def _generate_with_image_rows(outputs, decoder, generate, *args, **kwargs):
    """BlipTextLMHeadModel.generate handed a recognised pruned image: its rows become the encoder mask (ANDed
    with the caller's), which HF expands and passes on with the states; anything else runs unchanged."""
    image = kwargs.get("encoder_hidden_states")
    layout = outputs.output_layout(image)
    if layout is None or not layout.padded:
        return generate(*args, **kwargs)
    valid = layout.valid.to(image.device)
    given = kwargs.get("encoder_attention_mask")
    if given is not None:
        if tuple(given.shape) != tuple(valid.shape):
            raise ValueError(f"encoder_attention_mask: expected {tuple(valid.shape)} (encoder_hidden_states' batch "
                             f"and rows), got {tuple(given.shape)}")
        valid = valid & given.to(image.device).bool()
    with _image_rows_in_mask(decoder):
        return generate(*args, **{**kwargs, "encoder_attention_mask": valid.long()})


def _record_expanded_image(outputs, decoder, args, kwargs):
    """A pre-hook on the decoder: inside `_generate_with_image_rows`, the states generate hands it (expanded, a
    tensor no tower made) are recorded with the mask it expanded with them: the image's rows. Outside such a call
    a caller's mask is left to HF (which 5.x ignores in the cross-attention): the model computes what HF does."""
    if id(decoder) not in _generating.decoders:
        return None
    states, mask = kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")
    if isinstance(states, torch.Tensor) and isinstance(mask, torch.Tensor) and outputs.output_layout(states) is None:
        outputs.record_output_layout(states, OutputLayout(mask.to(states.device).bool()))
    return None


def _itself(module):
    return module


VISION = TowerSpec(branch="vision", tower_types=(hf.BlipVisionModel,), encoder_type=hf.BlipEncoder,
                   layer_type=hf.BlipEncoderLayer, layer_fn=vision_layer, inputs=_vision_inputs, output="compact")
TEXT = TowerSpec(branch="text", tower_types=(hf_text.BlipTextModel,), encoder_type=hf_text.BlipTextEncoder,
                 layer_type=hf_text.BlipTextLayer, layer_fn=text_layer, inputs=_text_inputs, output="positions",
                 not_inside=(hf_text.BlipTextLMHeadModel, hf.BlipForQuestionAnswering),
                 encoder_output=BaseModelOutputWithPastAndCrossAttentions, cross_attends=True)

SPECS = (VISION, TEXT)
MODELS = (hf.BlipForImageTextRetrieval, hf.BlipForQuestionAnswering, hf.BlipForConditionalGeneration)
PATCHES = (ModulePatch(hf_text.BlipTextLayer, _cross_attention, _mask_cross_attention),
           ModulePatch(hf_text.BlipTextLMHeadModel, _itself, _record_expanded_image),
           MethodPatch(hf_text.BlipTextLMHeadModel, "generate", _generate_with_image_rows))
