"""MADTP on Hugging Face CLIP: the original model is the oracle (pruning off), padded execution is the oracle
of ragged execution (pruning on), and remove() must give back the original model exactly."""
import copy

import _decision_oracle as oracle
import madtp
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionModel

import madtp_kernels

BOS, EOS, PAD = 1, 3, 0


def tiny_config(text_width=64, vision_width=96, vision_layers=3):
    return CLIPConfig(
        text_config=dict(hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2,
                         num_attention_heads=4, vocab_size=50, max_position_embeddings=16, eos_token_id=EOS,
                         bos_token_id=BOS, pad_token_id=PAD),
        vision_config=dict(hidden_size=vision_width, intermediate_size=2 * vision_width,
                           num_hidden_layers=vision_layers, num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=32)


def text_batch(lengths, seed=0):
    """Right-padded ids: BOS, random words, EOS; lengths count BOS and EOS (>= 2)."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.full((len(lengths), n), PAD)
    for b, length in enumerate(lengths):
        ids[b, 0] = BOS
        ids[b, 1:length - 1] = torch.randint(4, 50, (length - 2,), generator=g)
        ids[b, length - 1] = EOS
    mask = (torch.arange(n) < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def inputs(batch=3, lengths=(5, 2, 9), seed=0):
    ids, mask = text_batch(list(lengths)[:batch], seed)
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return CLIPModel(tiny_config()).eval()


def run(model, **kw):
    with torch.no_grad():
        return model(**kw)


def pruning(**kw):
    return madtp.MADTPConfig(num_alignment_tokens=8, temperature=kw.pop("temperature", 1.0), **kw)


# ------------------------------------------------------------------ pruning off: the original model

@pytest.mark.parametrize("execution", ["ragged", "padded"])
def test_clip_model_unchanged_without_pruning(clip, execution):
    model = copy.deepcopy(clip)
    x = inputs()
    ref = run(model, **x)
    madtp.apply(model, madtp.MADTPConfig(num_alignment_tokens=8, execution=execution))
    out = run(model, **x)
    for name in ("logits_per_image", "text_embeds", "image_embeds"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=1e-5, rtol=1e-5)
    valid = x["attention_mask"].bool()
    torch.testing.assert_close(out.text_model_output.last_hidden_state[valid],
                               ref.text_model_output.last_hidden_state[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.vision_model_output.last_hidden_state,
                               ref.vision_model_output.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_towers_unchanged_without_pruning(clip):
    x = inputs(batch=2, lengths=(7, 3))
    vision = CLIPVisionModel(clip.config.vision_config).eval()
    text = CLIPTextModel(clip.config.text_config).eval()
    ref_v = run(vision, pixel_values=x["pixel_values"]).pooler_output
    ref_t = run(text, input_ids=x["input_ids"], attention_mask=x["attention_mask"]).pooler_output
    madtp.apply(vision, madtp.MADTPConfig(num_alignment_tokens=4))
    madtp.apply(text, madtp.MADTPConfig(num_alignment_tokens=4))
    torch.testing.assert_close(run(vision, pixel_values=x["pixel_values"]).pooler_output, ref_v,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(text, input_ids=x["input_ids"], attention_mask=x["attention_mask"]).pooler_output,
                               ref_t, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ pruning on

def test_kept_counts_differ_between_samples(clip):
    model = madtp.apply(copy.deepcopy(clip), pruning())
    run(model, **inputs(batch=3, lengths=(9, 9, 9)))
    report = madtp.pruning_report(model)
    vision = {k: v for k, v in report.items() if k.startswith("vision_model.")}
    assert len(vision) == 3 and all(v.shape == (3,) for v in vision.values())
    assert any(len(set(v.tolist())) > 1 for v in report.values()), report
    first = vision["vision_model.encoder.layers.0"]
    assert bool((first < 17).all()), "the first layer dropped nothing"   # 16 patches + CLS
    counts = list(vision.values())
    assert all(bool((b <= a).all()) for a, b in zip(counts, counts[1:], strict=False)), "rows grew between layers"


def test_text_keeps_cls_and_eot(clip):
    model = madtp.apply(copy.deepcopy(clip), pruning(temperature=100.0))
    x = inputs(batch=3, lengths=(9, 2, 6))
    out = run(model, **x)
    for name, kept in madtp.pruning_report(model).items():
        if name.startswith("text_model."):
            assert bool((kept >= 2).all()), (name, kept)
    # The pooled output is the final state of EOT at its original position, which must have survived.
    hidden = out.text_model_output.last_hidden_state
    eot = (x["input_ids"] == EOS).int().argmax(-1)
    assert bool((hidden[torch.arange(3), eot].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("lengths", [(9, 2, 6), (2,), (9, 9, 3, 2, 5)])
def test_ragged_equals_padded(clip, lengths):
    model = madtp.apply(copy.deepcopy(clip), pruning(prune_layers=(0, 2)))
    x = inputs(batch=len(lengths), lengths=lengths, seed=len(lengths))
    outs, reports = {}, {}
    for execution in ("ragged", "padded"):
        madtp.set_execution(model, execution)
        outs[execution] = run(model, **x)
        reports[execution] = madtp.pruning_report(model)
    assert set(reports["ragged"]) == {"vision_model.encoder.layers.0", "vision_model.encoder.layers.2",
                                      "text_model.encoder.layers.0"}
    for name, kept in reports["ragged"].items():
        assert torch.equal(kept, reports["padded"][name]), name
    for name in ("logits_per_image", "text_embeds", "image_embeds"):
        torch.testing.assert_close(getattr(outs["ragged"], name), getattr(outs["padded"], name),
                                   atol=1e-5, rtol=1e-5)


def test_gradients_match_between_executions(clip):
    model = madtp.apply(copy.deepcopy(clip).train(), pruning())
    x = inputs()
    grads = {}
    for execution in ("ragged", "padded"):
        madtp.set_execution(model, execution)
        model.zero_grad()
        out = model(**x, return_loss=True)
        loss = out.loss + madtp.alignment_loss(model)
        loss.backward()
        grads[execution] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "madtp.alignment.tokens" in grads["ragged"]
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in grads["ragged"]
    assert grads["ragged"].keys() == grads["padded"].keys()
    for name, g in grads["ragged"].items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, grads["padded"][name], atol=1e-4, rtol=1e-4, msg=name)


def test_alignment_loss(clip):
    model = madtp.apply(copy.deepcopy(clip), madtp.MADTPConfig(num_alignment_tokens=8))
    run(model, **inputs())   # inference: no training work, nothing for the loss
    assert all(r.pooled is None and not r.summaries for r in model.madtp.records.values())
    with pytest.raises(ValueError, match="did not record the vision and text branch"):
        madtp.alignment_loss(model)
    with torch.no_grad():   # trained tokens are far from their 0.02 init, where all pooled features look alike
        model.madtp.alignment.tokens.normal_(0, 0.3)
    x = inputs()
    seen, hooks = oracle.capture(model)
    with madtp.recording(model):
        run(model, **x)
    for h in hooks:
        h.remove()
    # The oracle, from the formula: pruning off, each layer scores the rows that enter its layer_norm2.
    state = model.madtp
    ids, lengths = x["input_ids"], x["attention_mask"].sum(1).tolist()
    eot = (ids == EOS).int().argmax(-1).tolist()
    layouts = {"vision": ("vision_model", [17] * 3, [False] * 51),
               "text": ("text_model", lengths, [j == eot[b] for b, n in enumerate(lengths) for j in range(n)])}
    features = {}
    for branch, (tower, lens, protected) in layouts.items():
        pool = 0
        for i in range(len(getattr(model, tower).encoder.layers)):
            a, mapped = oracle.alignment_scores(state.alignment, oracle.packed(seen[(tower, i, "layer_norm2")], lens),
                                                branch)
            pool = pool + oracle.pooled(a, mapped, lens, protected, state.alignment.dim)
        torch.testing.assert_close(oracle.d(state.records[branch].pooled), pool, atol=2e-5, rtol=2e-5)
        features[branch] = pool
    loss = madtp.alignment_loss(model)
    assert loss.ndim == 0
    torch.testing.assert_close(oracle.d(loss), oracle.alignment_loss(features["vision"], features["text"]),
                               atol=1e-6, rtol=1e-5)
    # widths differ (96 vision, 64 text): the text branch has its own map into the tokens' width
    assert set(state.alignment.maps) == {"text"} and state.alignment.tokens.shape == (8, 96)
    vision_only = madtp.apply(CLIPVisionModel(clip.config.vision_config).eval(), madtp.MADTPConfig())
    with madtp.recording(vision_only):
        run(vision_only, pixel_values=inputs()["pixel_values"])
    with pytest.raises(ValueError, match="did not record the text branch"):
        madtp.alignment_loss(vision_only)


def test_flops_drop_and_ragged_counts_less_than_padded(clip):
    model = copy.deepcopy(clip)
    x = inputs(batch=4, lengths=(9, 2, 6, 4))
    dense = madtp.count_flops(model, **x)
    assert dense["vision"] > 0 and dense["text"] > 0 and dense["total"] >= dense["vision"]
    madtp.apply(model, pruning())
    pruned = madtp.count_flops(model, **x)
    madtp.set_execution(model, "padded")
    padded = madtp.count_flops(model, **x)
    assert pruned["vision"] < 0.9 * dense["vision"], (pruned, dense)
    assert pruned["vision"] < padded["vision"], (pruned, padded)
    madtp.set_execution(model, "ragged")
    madtp.sparsify(model)
    sparse = madtp.count_flops(model, **x)
    assert sparse["vision"] < 0.75 * pruned["vision"], (sparse, pruned)


# ------------------------------------------------------------------ remove, bad input, sparsify

def test_remove_restores_exactly(clip):
    model = copy.deepcopy(clip)
    x = inputs()
    before = run(model, **x).logits_per_image
    keys = set(model.state_dict())
    madtp.apply(model, pruning())
    run(model, **x)
    madtp.remove(model)
    assert not hasattr(model, "madtp") and set(model.state_dict()) == keys
    assert all("forward" not in vars(m) for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(run(model, **x).logits_per_image, before)
    with pytest.raises(ValueError, match="has not been called"):
        madtp.remove(model)


def test_bad_input_leaves_model_untouched(clip):
    with pytest.raises(TypeError, match="supported classes: .*CLIPModel"):
        madtp.apply(torch.nn.Linear(4, 4), madtp.MADTPConfig())
    with pytest.raises(TypeError, match="config"):
        madtp.apply(copy.deepcopy(clip), {"temperature": 1.0})
    empty = CLIPVisionModel(tiny_config(vision_layers=0).vision_config)
    with pytest.raises(ValueError, match="no CLIPEncoderLayer"):
        madtp.apply(empty, madtp.MADTPConfig())
    assert not hasattr(empty, "madtp") and all("forward" not in vars(m) for m in empty.modules())
    assert all(not m._forward_pre_hooks for m in empty.modules())
    model = madtp.apply(copy.deepcopy(clip), madtp.MADTPConfig())
    with pytest.raises(ValueError, match="already called"):
        madtp.apply(model, madtp.MADTPConfig())
    with pytest.raises(ValueError, match="vision: expected None .*or a finite number > 0"):
        madtp.set_temperature(model, vision=-1.0)
    with pytest.raises(ValueError, match="text: expected None .*or a finite number > 0"):
        madtp.set_temperature(model, text=float("nan"))
    with pytest.raises(TypeError, match="vision: expected None or a number > 0, got bool"):
        madtp.set_temperature(model, vision=True)  # would prune at 1.0
    assert model.madtp.temperature["vision"] is not True
    with pytest.raises(ValueError, match="execution"):
        madtp.set_execution(model, "dense")
    with pytest.raises(ValueError, match="prune_layers"):
        madtp.MADTPConfig(prune_layers=(-1,))


def test_sparsify_swaps_encoder_linears(clip):
    model = copy.deepcopy(clip)
    x = inputs()
    masked = copy.deepcopy(clip)
    for name, module in masked.named_modules():
        if isinstance(module, torch.nn.Linear) and "encoder" in name:
            module.weight.data *= madtp_kernels.prune_2to4(module.weight)
    madtp.sparsify(model)
    swapped = [n for n, m in model.named_modules() if isinstance(m, madtp_kernels.SparseLinear)]
    assert len(swapped) == (3 + 2) * 6           # q, k, v, out, fc1, fc2 in every layer of both towers
    assert isinstance(model.visual_projection, torch.nn.Linear)   # heads outside the towers stay dense
    torch.testing.assert_close(run(model, **x).logits_per_image, run(masked, **x).logits_per_image,
                               atol=1e-4, rtol=1e-4)
    only_mlp = madtp.sparsify(copy.deepcopy(clip), filter_fn=lambda module, fqn: ".mlp." in fqn)
    assert sum(isinstance(m, madtp_kernels.SparseLinear) for m in only_mlp.modules()) == 5 * 2
    with pytest.raises(ValueError, match="pattern"):
        madtp.sparsify(copy.deepcopy(clip), pattern="4:8")


def test_layer_summaries_match_the_original_hidden_states(clip):
    """What layer-wise distillation compares: per layer, vision CLS and text EOT states, as HF's hidden_states."""
    model = copy.deepcopy(clip)
    x = inputs()
    # each layer's output, read by hooks (transformers 5.0 returns no hidden_states here)
    states = {"vision": [], "text": []}
    hooks = [layer.register_forward_hook(lambda m, a, out, key=key: states[key].append(out))
             for key, tower in (("vision", model.vision_model), ("text", model.text_model))
             for layer in tower.encoder.layers]
    run(model, **x)
    for hook in hooks:
        hook.remove()
    vision_states, text_states = states["vision"], states["text"]
    madtp.apply(model, madtp.MADTPConfig(num_alignment_tokens=4))
    with madtp.recording(model):
        run(model, **x)
    records = model.madtp.records
    eot = (x["input_ids"] == EOS).int().argmax(-1)
    assert len(records["vision"].summaries) == len(vision_states) == 3
    for mine, theirs in zip(records["vision"].summaries, vision_states, strict=True):
        torch.testing.assert_close(mine, theirs[:, 0], atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(records["text"].summaries, text_states, strict=True):
        torch.testing.assert_close(mine, theirs[torch.arange(3), eot], atol=1e-5, rtol=1e-5)


def test_deepcopy_of_an_applied_model_is_independent(clip):
    model = madtp.apply(copy.deepcopy(clip), pruning())
    x = inputs()
    expected = run(model, **x).logits_per_image
    twin = copy.deepcopy(model)
    model.madtp.records.clear()
    torch.testing.assert_close(run(twin, **x).logits_per_image, expected, atol=0, rtol=0)
    assert not model.madtp.records and set(twin.madtp.records) == {"vision", "text"}
    madtp.set_temperature(twin, vision=None, text=None)
    madtp.remove(twin)
    assert all("forward" not in vars(m) for m in twin.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in twin.modules())
    torch.testing.assert_close(run(model, **x).logits_per_image, expected, atol=0, rtol=0)   # untouched
    assert madtp.pruning_report(model)
