"""Captioning generate paths that expand or reorder the batch (beam search, num_return_sequences, sampling) with a
pruned BLIP image: every sample of a batch must generate, and score, what it generates alone.

The oracle is the image alone: a batch of one has no padding rows (its image output is exactly its kept rows), so
nothing of madtp's masking is involved, and HF's own generate runs on it. In a batch the image output is padded to
the longest sample; HF's generate expands it (repeat_interleave) for num_beams / num_return_sequences before the
first decoder step, so a decoder that attended the padding rows would score, and here choose, differently.
"""
import copy
import io
import threading

import madtp
import pytest
import torch
from madtp.models import blip as madtp_blip
from test_blip import PAD, TOL, build, pruning
from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering

STEPS = 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny models: a second intra-op thread only costs time on a loaded machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def captioner():
    return build(BlipForConditionalGeneration, seed=2)


def images(batch, seed=6):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(model, pixels, prompt=None, **kw):
    x = dict(pixel_values=pixels)
    if prompt is not None:
        x["input_ids"] = prompt.clone()   # BlipForConditionalGeneration.generate writes BOS into input_ids
    return model.generate(**x, max_new_tokens=STEPS, return_dict_in_generate=True, output_logits=True, **kw)


def image_rows(model):
    return madtp.pruning_report(model)["vision_model.encoder.layers.1"]


def assert_sample_matches(batched, alone, b, per_sample):
    """Rows b*per_sample .. of the batched result against the sample's own run (right-padded with PAD)."""
    rows = slice(b * per_sample, (b + 1) * per_sample)
    seqs, own = batched.sequences[rows], alone.sequences
    assert seqs.shape[0] == own.shape[0] == per_sample
    assert torch.equal(seqs[:, :own.shape[1]], own), (b, seqs.tolist(), own.tolist())
    assert bool((seqs[:, own.shape[1]:] == PAD).all()), b
    if getattr(alone, "sequences_scores", None) is not None:
        torch.testing.assert_close(batched.sequences_scores[rows], alone.sequences_scores, **TOL)
    for step, own_logits in enumerate(alone.logits):   # every step's raw logits, beams included
        k = own_logits.shape[0]
        got = batched.logits[step].unflatten(0, (-1, k))[b]
        torch.testing.assert_close(got, own_logits, **TOL, msg=f"sample {b}, step {step}")


CALLS = {
    "beams3": dict(num_beams=3, do_sample=False),
    "beams3_return2": dict(num_beams=3, num_return_sequences=2, do_sample=False),
    # the sampling loop, expanded by num_return_sequences; top_k=1 makes the draw the argmax, so a batch and its
    # samples can be compared draw for draw (a random draw depends on the rows drawn before it)
    "sample_return2": dict(do_sample=True, top_k=1, num_return_sequences=2),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_batch_equals_samples_alone(captioner, call):
    kw = CALLS[call]
    per_sample = kw.get("num_return_sequences", 1)
    model = madtp.apply(copy.deepcopy(captioner), pruning())
    pixels = images(6)
    prompt = torch.tensor([[1, 7, 9, 2]]).repeat(6, 1)
    prompt[:, 1] = torch.arange(10, 16)   # different words per sample: the prompt rows are expanded too
    outs = {}
    for execution in ("ragged", "padded"):
        madtp.set_execution(model, execution)
        for name, p in (("caption", None), ("prompt", prompt)):
            out = generate(model, pixels, p, **kw)
            rows = image_rows(model)
            # the decoder's image is padded: the samples keep different numbers of rows
            assert len(set(rows.tolist())) > 2, rows
            assert out.sequences.shape[0] == 6 * per_sample and out.sequences.shape[1] >= 3
            for b in range(6):
                alone = generate(model, pixels[b:b + 1], None if p is None else p[b:b + 1], **kw)
                assert int(image_rows(model)[0]) == int(rows[b])
                assert_sample_matches(out, alone, b, per_sample)
            outs[execution, name] = out
    for name in ("caption", "prompt"):   # same decisions, same outputs: only the time differs
        assert torch.equal(outs["ragged", name].sequences, outs["padded", name].sequences)


def test_beam_search_without_pruning_is_hf(captioner):
    """Pruning off (temperature None): the wrapped generate runs HF's, bit for bit, beams and VQA included."""
    pixels = images(4, seed=3)
    vqa = build(BlipForQuestionAnswering, seed=1, vision_width=64)
    question = dict(input_ids=torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0], [1, 4, 0, 0], [1, 3, 3, 3]]),
                    attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]))
    for model, kw in ((captioner, {}), (vqa, question)):
        ref = copy.deepcopy(model)
        applied = madtp.apply(copy.deepcopy(model), madtp.MADTPConfig(num_alignment_tokens=8))
        with torch.no_grad():
            for beams in dict(num_beams=3, num_return_sequences=2), dict(num_beams=1):
                want = ref.generate(pixel_values=pixels, max_new_tokens=STEPS, **kw, **beams)
                assert torch.equal(applied.generate(pixel_values=pixels, max_new_tokens=STEPS, **kw, **beams),
                                   want)


def test_a_mask_outside_generate_is_left_to_hf(captioner):
    """Only a generate handed a recognised pruned image masks expanded states: a caller's own encoder mask on a
    plain decoder call (HF 5.x drops it in the cross-attention) is not taken for an image's rows, in any thread,
    even while another thread is inside such a generate."""
    model = madtp.apply(copy.deepcopy(captioner), pruning())
    pixels = images(3)
    with torch.no_grad():
        image = model.vision_model(pixel_values=pixels).last_hidden_state
    mask = torch.ones(image.shape[:2], dtype=torch.long)
    mask[:, 2:] = 0
    ids = torch.tensor([[1, 9, 8]]).repeat(3, 1)
    with torch.no_grad():   # the original model: what HF does with this mask
        hf = captioner.text_decoder(input_ids=ids, encoder_hidden_states=image, encoder_attention_mask=mask).logits
    seen = []

    def other_thread_call():
        with torch.no_grad():
            seen.append(model.text_decoder(input_ids=ids, encoder_hidden_states=image.clone(),
                                           encoder_attention_mask=mask).logits)

    def at_first_step(module, args, kwargs):
        if not seen and threading.current_thread() is threading.main_thread():
            assert id(module) in madtp_blip._generating.decoders   # this thread is inside the masked generate
            worker = threading.Thread(target=other_thread_call)
            worker.start()
            worker.join()

    handle = model.text_decoder.register_forward_pre_hook(at_first_step, with_kwargs=True)
    try:
        generate(model, pixels, num_beams=3)
    finally:
        handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], hf, **TOL)
    with torch.no_grad():   # and in this thread, outside generate
        mine = model.text_decoder(input_ids=ids, encoder_hidden_states=image.clone(), encoder_attention_mask=mask)
    torch.testing.assert_close(mine.logits, hf, **TOL)
    assert madtp_blip._generating.decoders == set()


def test_copies_generate_with_their_own_state_and_remove_restores(captioner):
    model = madtp.apply(copy.deepcopy(captioner), pruning())
    pixels = images(4)
    want = generate(model, pixels, num_beams=3).sequences
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        wrapper = vars(clone.text_decoder)["generate"]
        assert wrapper.args[0] is clone.madtp and wrapper.args[1] is clone.text_decoder
        assert wrapper.args[2].args[0] is clone.text_decoder   # the replaced method is the clone's
        assert torch.equal(generate(clone, pixels, num_beams=3).sequences, want)
    ref = generate(captioner, pixels, num_beams=3).sequences
    madtp.remove(model)
    assert all("generate" not in vars(m) and "forward" not in vars(m) for m in model.modules())
    assert torch.equal(generate(model, pixels, num_beams=3).sequences, ref)


def test_bad_encoder_mask_is_named(captioner):
    model = madtp.apply(copy.deepcopy(captioner), pruning())
    with torch.no_grad():
        image = model.vision_model(pixel_values=images(3)).last_hidden_state
    assert len(set(image_rows(model).tolist())) > 1   # a padded image: the wrapper takes over
    bos = torch.ones(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="encoder_attention_mask: expected"):
        model.text_decoder.generate(input_ids=bos, encoder_hidden_states=image,
                                    encoder_attention_mask=torch.ones(3, image.shape[1] + 1, dtype=torch.long),
                                    max_new_tokens=2, num_beams=2)
