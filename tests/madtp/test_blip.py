"""MADTP on Hugging Face BLIP (retrieval, VQA, captioning): the original model is the oracle with pruning off; with
pruning on, every sample of a batch must compute what it computes alone (pruning is per sample, so a batch that
leaked padding into an attention, self or cross, would differ), padded execution must equal ragged execution,
and remove() must give back the original model exactly."""
import copy

import madtp
import pytest
import torch
from madtp.patch import find_towers
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

BOS, SEP, PAD = 1, 2, 0
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_config(text_width=64, vision_width=96):
    # encoder_hidden_size (the text cross-attention's key width) is set to the vision width by BlipConfig.
    return BlipConfig(
        text_config=dict(hidden_size=text_width, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=2 * text_width, vocab_size=100, max_position_embeddings=32,
                         bos_token_id=BOS, sep_token_id=SEP, eos_token_id=SEP, pad_token_id=PAD),
        vision_config=dict(hidden_size=vision_width, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                           patch_size=8, intermediate_size=2 * vision_width),
        image_text_hidden_size=32)


def build(cls, seed=0, **widths):
    torch.manual_seed(seed)
    model = cls(tiny_config(**widths)).eval()
    with torch.no_grad():   # off the init (LayerNorms at 1/0, zero biases), so every path leaves a trace
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Models this small gain nothing from a second intra-op thread; on a loaded 2-core machine it costs ~5x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def itr():
    return build(BlipForImageTextRetrieval)


@pytest.fixture(scope="module")
def vqa():
    # HF's answer decoder cross-attends to the question with keys of the vision width: VQA needs equal widths
    return build(BlipForQuestionAnswering, seed=1, vision_width=64)


@pytest.fixture(scope="module")
def captioner():
    return build(BlipForConditionalGeneration, seed=2)


def text_batch(lengths, seed=0):
    """Right-padded ids: BOS, random words (lengths count BOS)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD)
    for b, length in enumerate(lengths):
        ids[b, 0] = BOS
        ids[b, 1:length] = torch.randint(4, 100, (length - 1,), generator=g)
    return ids, (ids != PAD).long()


def inputs(lengths=(6, 3, 9), seed=0):
    ids, mask = text_batch(lengths, seed)
    pixels = torch.randn(len(lengths), 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def sample(x, b):
    """Sample b of a batch, alone and without padding."""
    n = int(x["attention_mask"][b].sum())
    return dict(input_ids=x["input_ids"][b:b + 1, :n], attention_mask=x["attention_mask"][b:b + 1, :n],
                pixel_values=x["pixel_values"][b:b + 1])


def pruning(**kw):
    return madtp.MADTPConfig(num_alignment_tokens=8, temperature=kw.pop("temperature", 1.0), **kw)


@torch.no_grad()
def retrieval(model, x):
    """(ITM logits, ITC similarities, the text encoder's last state)."""
    itm = model(**x)
    itc = model(**x, use_itm_head=False)
    return itm.itm_score, itc.itm_score, itm.question_embeds


@torch.no_grad()
def generate(model, x, **kw):
    x = {k: v.clone() for k, v in x.items()}   # BlipForConditionalGeneration.generate writes BOS into input_ids
    return model.generate(**x, max_new_tokens=5, do_sample=False, num_beams=1, **kw)


def test_towers_found_by_class(itr, vqa, captioner):
    assert [t.name for t in find_towers(itr)] == ["vision_model", "text_encoder"]
    # The decoders (and VQA's question encoder, which feeds the answer decoder at every row) are not pruned.
    assert [t.name for t in find_towers(vqa)] == ["vision_model"]
    assert [t.name for t in find_towers(captioner)] == ["vision_model"]
    state = madtp.apply(copy.deepcopy(itr), madtp.MADTPConfig(num_alignment_tokens=8)).madtp
    # widths differ (96 vision, 64 text): the text branch has its own map into the tokens' width
    assert set(state.alignment.maps) == {"text"} and state.alignment.tokens.shape == (8, 96)


# ------------------------------------------------------------------ pruning off: the original model

@pytest.mark.parametrize("execution", ["ragged", "padded"])
@pytest.mark.parametrize("lengths", [(6, 3, 9), (5,)])
def test_retrieval_unchanged_without_pruning(itr, execution, lengths):
    model = copy.deepcopy(itr)
    x = inputs(lengths)
    ref = retrieval(model, x)
    ref_image = model.vision_model(pixel_values=x["pixel_values"])
    madtp.apply(model, madtp.MADTPConfig(num_alignment_tokens=8, execution=execution))
    out = retrieval(model, x)
    torch.testing.assert_close(out[0], ref[0], **TOL)
    torch.testing.assert_close(out[1], ref[1], **TOL)
    valid = x["attention_mask"].bool()
    torch.testing.assert_close(out[2][valid], ref[2][valid], **TOL)   # padding rows: zeros (not tokens)
    with torch.no_grad():
        image = model.vision_model(pixel_values=x["pixel_values"])
    torch.testing.assert_close(image.last_hidden_state, ref_image.last_hidden_state, **TOL)
    torch.testing.assert_close(image.pooler_output, ref_image.pooler_output, **TOL)


def test_generation_unchanged_without_pruning(vqa, captioner):
    x = inputs((6, 3, 9), seed=3)
    prompt = dict(pixel_values=x["pixel_values"], input_ids=x["input_ids"][:, :3])
    for model, call in ((vqa, x), (captioner, dict(pixel_values=x["pixel_values"])), (captioner, prompt)):
        model = copy.deepcopy(model)
        ref = generate(model, call)
        madtp.apply(model, madtp.MADTPConfig(num_alignment_tokens=8))
        assert torch.equal(generate(model, call), ref)
        assert ref.shape[1] >= 2   # generated something
    model = copy.deepcopy(vqa)
    labels = text_batch((3, 4, 2), seed=4)[0]
    with torch.no_grad():
        ref = model(**x, labels=labels).loss
        madtp.apply(model, madtp.MADTPConfig(num_alignment_tokens=8))
        torch.testing.assert_close(model(**x, labels=labels).loss, ref, **TOL)


# ------------------------------------------------------------------ pruning on

@pytest.mark.parametrize("execution", ["ragged", "padded"])
def test_retrieval_batch_equals_samples_alone(itr, execution):
    model = madtp.apply(copy.deepcopy(itr), pruning(execution=execution))
    x = inputs((6, 3, 9, 9))
    itm, itc, _ = retrieval(model, x)
    report = madtp.pruning_report(model)   # of the ITC call: both towers ran
    assert len(report) == 4 and all(v.shape == (4,) for v in report.values())
    image_rows = report["vision_model.encoder.layers.1"]
    assert len(set(image_rows.tolist())) > 1, report   # the image output the text cross-attends to has padding
    assert bool((report["vision_model.encoder.layers.0"] < 17).all())   # 16 patches + CLS: something dropped
    for b in range(4):
        one = sample(x, b)
        itm_b, _, _ = retrieval(model, one)
        torch.testing.assert_close(itm_b[0], itm[b], **TOL)
        for name, kept in madtp.pruning_report(model).items():
            assert int(kept[0]) == int(report[name][b]), (name, b)
    # ITC: image b against every text; the similarity matrix of the batch from the samples' own features
    feats = [retrieval(model, sample(x, b))[1] for b in range(4)]
    assert itc.shape == (4, 4) and torch.isfinite(itc).all()
    torch.testing.assert_close(torch.stack([f[0, 0] for f in feats]), itc.diagonal(), **TOL)


def test_ragged_equals_padded(itr, vqa, captioner):
    x = inputs((6, 3, 9), seed=5)
    caption_x = dict(pixel_values=x["pixel_values"], input_ids=x["input_ids"][:, :4])
    for model, call in ((itr, None), (vqa, x), (captioner, dict(pixel_values=x["pixel_values"]))):
        model = madtp.apply(copy.deepcopy(model), pruning(prune_layers=(1,) if model is itr else None))
        outs, reports = {}, {}
        for execution in ("ragged", "padded"):
            madtp.set_execution(model, execution)
            outs[execution] = retrieval(model, x) if call is None else generate(model, call)
            reports[execution] = madtp.pruning_report(model)
        assert reports["ragged"].keys() == reports["padded"].keys() and reports["ragged"]
        for name, kept in reports["ragged"].items():
            assert torch.equal(kept, reports["padded"][name]), name
        if call is None:
            assert set(reports["ragged"]) == {"vision_model.encoder.layers.1",
                                              "text_encoder.encoder.layer.1"}
            for r, p in zip(outs["ragged"][:2], outs["padded"][:2], strict=True):
                torch.testing.assert_close(r, p, **TOL)
        else:
            assert torch.equal(outs["ragged"], outs["padded"])
        if model.__class__ is BlipForConditionalGeneration:
            logits = {}
            for execution in ("ragged", "padded"):
                madtp.set_execution(model, execution)
                with torch.no_grad():
                    logits[execution] = model(**caption_x).logits
            torch.testing.assert_close(logits["ragged"], logits["padded"], **TOL)


def test_decoder_reads_only_kept_image_rows(captioner):
    """Captioning with a pruned image: the batch (image rows padded to the longest sample) generates and scores
    what each image does alone (no padding): the decoder's cross-attention never sees the padding."""
    model = madtp.apply(copy.deepcopy(captioner), pruning())
    x = inputs((4, 4, 4), seed=6)
    prompt = dict(pixel_values=x["pixel_values"], input_ids=x["input_ids"])
    tokens = generate(model, dict(pixel_values=x["pixel_values"]))
    rows = madtp.pruning_report(model)["vision_model.encoder.layers.1"]
    assert len(set(rows.tolist())) > 1, rows
    with torch.no_grad():
        logits = model(**prompt).logits
    for b in range(3):
        alone = generate(model, dict(pixel_values=x["pixel_values"][b:b + 1]))
        assert torch.equal(alone[0], tokens[b, :alone.shape[1]]), b
        assert bool((tokens[b, alone.shape[1]:] == PAD).all())
        with torch.no_grad():
            one = model(pixel_values=x["pixel_values"][b:b + 1], input_ids=x["input_ids"][b:b + 1]).logits
        torch.testing.assert_close(one[0], logits[b], **TOL)
    # Without the mask (the image layout not recognised) the padding is read and the scores move:
    image = model.vision_model(pixel_values=x["pixel_values"]).last_hidden_state
    with torch.no_grad():
        masked = model.text_decoder(input_ids=x["input_ids"], encoder_hidden_states=image).logits
        unmasked = model.text_decoder(input_ids=x["input_ids"], encoder_hidden_states=image.clone()).logits
    torch.testing.assert_close(masked, logits, **TOL)
    assert not torch.allclose(unmasked, logits, atol=1e-4)


def test_vqa_question_encoder_reads_only_kept_image_rows(vqa):
    model = madtp.apply(copy.deepcopy(vqa), pruning())
    x = inputs((6, 3, 9), seed=7)
    seen = []
    handle = model.text_encoder.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    tokens = generate(model, x)
    report = madtp.pruning_report(model)
    assert tokens.shape[0] == 3 and set(report) == {"vision_model.encoder.layers.0", "vision_model.encoder.layers.1"}
    assert len(set(report["vision_model.encoder.layers.1"].tolist())) > 1, report   # the image rows are padded
    for b in range(3):
        generate(model, sample(x, b))
        n = int(x["attention_mask"][b].sum())
        torch.testing.assert_close(seen[-1][0], seen[0][b, :n], **TOL)
    handle.remove()
    labels = text_batch((3, 4, 2), seed=8)[0]
    loss = model(**x, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and model.vision_model.encoder.layers[0].self_attn.qkv.weight.grad is not None


def test_gradients_match_between_executions(itr):
    model = madtp.apply(copy.deepcopy(itr), pruning())
    x = inputs((6, 3, 9))
    grads = {}
    for execution in ("ragged", "padded"):
        madtp.set_execution(model, execution)
        model.zero_grad()
        loss = model(**x).itm_score.logsumexp(-1).sum() + madtp.alignment_loss(model)
        loss.backward()
        grads[execution] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name in ("madtp.alignment.tokens", "madtp.alignment.maps.text.weight",
                 "vision_model.encoder.layers.0.self_attn.qkv.weight",
                 "text_encoder.encoder.layer.0.crossattention.self.key.weight"):
        assert name in grads["ragged"], name
    assert grads["ragged"].keys() == grads["padded"].keys()
    for name, g in grads["ragged"].items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, grads["padded"][name], atol=1e-4, rtol=1e-4, msg=name)
    assert float(grads["ragged"]["madtp.alignment.tokens"].abs().sum()) > 0


def test_image_layout_recorded_weakly(itr):
    model = madtp.apply(copy.deepcopy(itr), pruning())
    state = model.madtp
    with torch.no_grad():
        image = model.vision_model(pixel_values=inputs()["pixel_values"]).last_hidden_state
    rows = madtp.pruning_report(model)["vision_model.encoder.layers.1"]
    layout = state.output_layout(image)
    assert layout is not None and torch.equal(layout.valid.sum(1), rows.long()) and layout.padded
    assert state.output_layout(image.clone()) is None   # derived tensors are not recognised (documented)
    count = len(state._outputs)
    del image
    assert len(state._outputs) == count - 1              # nothing pinned: the entry dies with the tensor


# ------------------------------------------------------------------ remove, bad input

@pytest.mark.parametrize("which", ["itr", "captioner"])
def test_remove_restores_exactly(itr, captioner, which):
    model = copy.deepcopy(itr if which == "itr" else captioner)
    x = inputs()
    before = retrieval(model, x) if which == "itr" else (generate(model, dict(pixel_values=x["pixel_values"])),)
    keys = set(model.state_dict())
    madtp.apply(model, pruning())
    retrieval(model, x) if which == "itr" else generate(model, dict(pixel_values=x["pixel_values"]))
    madtp.remove(model)
    assert not hasattr(model, "madtp") and set(model.state_dict()) == keys
    assert all("forward" not in vars(m) for m in model.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    after = retrieval(model, x) if which == "itr" else (generate(model, dict(pixel_values=x["pixel_values"])),)
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a, b)


def test_bad_input(itr):
    model = madtp.apply(copy.deepcopy(itr), pruning())
    x = inputs()
    with pytest.raises(ValueError, match="attention_mask: expected a 2-D"):
        model(**{**x, "attention_mask": x["attention_mask"][:, None, None, :]})
    with pytest.raises(ValueError, match="is_decoder"):
        model.text_encoder(input_ids=x["input_ids"], is_decoder=True)
