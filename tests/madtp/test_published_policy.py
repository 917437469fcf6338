"""execution="published": the published code's batch policy, against a float64 oracle written from the official
code (double125/MADTP models/vit.py Block.Reduce_token; models/med.py for text), per pruning layer:

    idx = Importance_score > threshold                  # per sample
    topk_num = max over the batch of idx.sum(1)         # one host read
    reduce_num = token_num - topk_num
    if topk_num < 1 or reduce_num <= 1: the layer does not prune
    every sample keeps its topk_num highest-TIS tokens; the rest merge into one token,
        sum_d TIS_d x_d / (sum_d TIS_d + 1e-8)

Candidates are each sample's rows but the first (CLS) and the protected ones (CLIP text's EOT), as in our policy.
On ragged text (the official pads every sample to one length) a sample keeps min(topk_num, its candidates), the
layer is skipped where no sample would drop more than one token, and a sample that would drop exactly one keeps it.
The TIS and theta are those of our decision op (same formula, so only the policy differs): in the model tests
they come from _decision_oracle, in the policy tests they are given.
"""
import functools
import math
from types import SimpleNamespace

import _decision_oracle as oracle
import madtp
import pytest
import torch
from madtp import pruning
from madtp.models import clip as clip_spec
from madtp.patch import ATTRIBUTE
from madtp.pruning import Layout
from test_clip import EOS, inputs, tiny_config
from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModel

import madtp_kernels as mk
from madtp_kernels.tools.launches import LaunchCounter

# as in test_decision_oracle: fp32 TIS are ~1e-6 from the fp64 ones; fp32 rows of a layer ~1e-6 from fp64
AMBIGUOUS = 1e-4
TOL = dict(atol=2e-5, rtol=2e-5)
EPS = 1e-8   # the official merged token's denominator: sum TIS + 1e-8


def candidates(lengths, protected):
    """Per sample, its candidate rows (local indices): all but the first and the protected ones."""
    starts = [sum(lengths[:b]) for b in range(len(lengths))]
    return starts, [[i for i in range(1, n) if not protected[s + i]] for s, n in zip(starts, lengths, strict=True)]


def above(lengths, protected, tis, theta, margin=0.0):
    """Per sample, how many of its candidates have TIS > theta + margin (the official `idx.sum(dim=1)`)."""
    starts, cands = candidates(lengths, protected)
    return [sum(1 for i in c if tis[s + i] > theta[b] + margin)
            for b, (s, c) in enumerate(zip(starts, cands, strict=True))]


def official_policy(lengths, protected, tis, theta, x, merge, topk_num=None):
    """The official batch policy on packed rows. lengths: list[int]; protected: list[bool] over the rows; tis:
    list[float] over the rows (read on candidates only); theta: list[float] per sample; x [T, C] float64;
    topk_num: given instead of counted (to follow a float32 count on a TIS at theta).
    -> None (the layer does not prune) or (new lengths, kept_index list (-1: merged), rows [T', C])."""
    starts, cands = candidates(lengths, protected)
    if topk_num is None:
        topk_num = max(above(lengths, protected, tis, theta), default=0)
    drops = [len(c) - min(topk_num, len(c)) for c in cands]
    drops = [0 if d == 1 else d for d in drops]   # dropping exactly one token saves nothing: it stays
    if topk_num < 1 or max(drops, default=0) <= 1:
        return None
    new_lengths, kept_index, rows = [], [], []
    for b, (s, n, c) in enumerate(zip(starts, lengths, cands, strict=True)):
        ranked = sorted(c, key=lambda i, s=s: (-tis[s + i], i))   # highest TIS first; ties: the earlier row
        stay = len(c) - drops[b]
        keep = set(ranked[:stay])
        kept = [i for i in range(n) if i not in c or i in keep]
        dropped = [i for i in c if i not in keep]
        kept_index += [s + i for i in kept]
        rows += [x[s + i] for i in kept]
        if merge and dropped:
            total = sum(tis[s + i] for i in dropped)
            rows.append(sum(tis[s + i] * x[s + i] for i in dropped) / (total + EPS))
            kept_index.append(-1)
        new_lengths.append(len(kept) + (merge and bool(dropped)))
    return new_lengths, kept_index, torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])


# ------------------------------------------------------------------ the policy alone, on given TIS and theta

def run_policy(monkeypatch, lengths, protected, tis, theta, x, merge):
    """pruning.published_step with the decision op's TIS and theta replaced by the given ones."""
    monkeypatch.setattr(pruning, "_score", lambda *a, **k: SimpleNamespace(
        importance=torch.tensor(tis, dtype=torch.float64), threshold=torch.tensor(theta, dtype=torch.float64)))
    cu = torch.tensor([0] + [sum(lengths[:b + 1]) for b in range(len(lengths))], dtype=torch.int32)
    prot = torch.tensor(protected, dtype=torch.bool)
    layout = Layout(mk.RaggedLayout.from_cu_seqlens(cu), prot, torch.arange(x.shape[0]))
    # stats, attn_out and the alignment scores only reach the (replaced) op
    return pruning.published_step(x, layout, None, None, None, 1.0, merge)


def check_policy(monkeypatch, lengths, protected, tis, theta, merge, seed=0):
    x = torch.randn(sum(lengths), 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = run_policy(monkeypatch, lengths, protected, tis, theta, x, merge)
    want = official_policy(lengths, protected, tis, theta, x, merge)
    if want is None:
        assert got is None, f"the layer should not prune, it kept {got[1].ragged.lengths()}"
        return None
    assert got is not None, "the layer should prune"
    y, layout = got
    new_lengths, kept_index, rows = want
    assert layout.ragged.lengths() == new_lengths
    assert torch.equal(layout.ragged.cu_seqlens, torch.tensor([0] + [sum(new_lengths[:b + 1]) for b in
                                                                     range(len(new_lengths))], dtype=torch.int32))
    assert layout.steps[-1].tolist() == kept_index
    assert layout.protected.tolist() == [i >= 0 and protected[i] for i in kept_index]
    torch.testing.assert_close(y, rows, atol=1e-12, rtol=1e-12)
    return new_lengths


def random_policy_case(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    rows = sum(lengths)
    protected = (torch.rand(rows, generator=g) < 0.2).tolist()
    # Rows that are not candidates get high TIS: they must neither count towards topk_num nor take a top-k slot.
    tis = torch.rand(rows, generator=g, dtype=torch.float64).tolist()
    starts = [sum(lengths[:b]) for b in range(len(lengths))]
    for s in starts:
        if s < rows:
            tis[s] = 5.0
    tis = [5.0 if p else t for p, t in zip(protected, tis, strict=True)]
    theta = (0.5 + 0.45 * torch.rand(len(lengths), generator=g, dtype=torch.float64)).tolist()
    return protected, tis, theta


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_policy_matches_the_official_code(monkeypatch, seed, merge):
    lengths = [9, 3, 0, 12, 1, 7, 2]
    protected, tis, theta = random_policy_case(seed, lengths)
    new = check_policy(monkeypatch, lengths, protected, tis, theta, merge, seed)
    assert new is not None and new != lengths, "the case should prune"


def test_every_sample_keeps_the_batch_max(monkeypatch):
    # Four images of 1 + 8 tokens; TIS > theta for 5, 2, 0 and 3 of their candidates: every one keeps 5, the
    # first sample's 5 above its theta, the others' 5 highest (below theta or not).
    lengths = [9] * 4
    above = [5, 2, 0, 3]
    tis, theta = [], []
    for b, k in enumerate(above):
        values = [0.9 - 0.1 * i for i in range(8)]                 # descending, distinct
        theta.append(values[k - 1] - 0.05 if k else 1.0)          # exactly k above theta
        tis += [0.0] + values[::-1] if b % 2 else [0.0] + values  # order within the sample must not matter
    new = check_policy(monkeypatch, lengths, [False] * 36, tis, theta, merge=True)
    assert new == [1 + 5 + 1] * 4


@pytest.mark.parametrize("case,prunes", [
    # (lengths, TIS > theta per sample) -> whether the layer prunes. 1 + 8 tokens per image unless said.
    (([9, 9], [0, 0]), False),           # topk_num = 0: nothing is above any theta
    (([9, 9], [7, 7]), False),           # reduce_num = 1 (vit.py: reduce_num <= 1)
    (([9, 9], [6, 3]), True),            # reduce_num = 2
    (([9, 4], [7, 1]), False),           # ragged: 1 and 0 would drop (3 candidates: min(7, 3) stay)
    (([9, 5], [5, 1]), True),            # ragged: 3 and 0 would drop
    (([9, 8], [6, 2]), True),            # the second would drop exactly 1: it keeps it, the first drops 2
])
def test_skip_rule(monkeypatch, case, prunes):
    lengths, above = case
    tis, theta = [], []
    for n, k in zip(lengths, above, strict=True):
        values = [0.9 - 0.1 * i for i in range(n - 1)]
        theta.append(values[k - 1] - 0.05 if k else 1.0)
        tis += [0.0] + values
    new = check_policy(monkeypatch, lengths, [False] * sum(lengths), tis, theta, merge=True)
    assert (new is not None) == prunes, new
    if lengths == [9, 8]:
        assert new == [1 + 6 + 1, 8], "the sample that would drop one token keeps all its rows"


def test_ties_keep_the_earlier_row_and_zero_weights_merge_to_zero(monkeypatch):
    # One candidate above theta in sample 0 (topk_num = 1); sample 1's candidates all tie at TIS 0: it keeps
    # the first, and its dropped tokens, weighted 0 / (0 + 1e-8), merge into a zero row (not their mean).
    lengths = [5, 5]
    tis = [0.0, 0.1, 0.9, 0.2, 0.3] + [0.0] * 5
    theta = [0.5, 0.5]
    check_policy(monkeypatch, lengths, [False] * 10, tis, theta, merge=True)
    x = torch.randn(10, 6, dtype=torch.float64)
    y, layout = run_policy(monkeypatch, lengths, [False] * 10, tis, theta, x, merge=True)
    assert layout.steps[-1].tolist() == [0, 2, -1, 5, 6, -1]
    assert torch.equal(y[5], torch.zeros(6, dtype=torch.float64))


# ------------------------------------------------------------------ an applied CLIP, layer by layer

def _check_tower(model, seen, tower, lengths, protected, causal, branch, temperature, merge):
    """-> [(counts after the layer, whether the oracle prunes it)] per layer."""
    report = madtp.pruning_report(model)
    alignment = model.madtp.alignment
    out = []
    for i, layer in enumerate(getattr(model, tower).encoder.layers):
        name = f"{tower}.encoder.layers.{i}"
        x_in = oracle.packed(seen[(tower, i, "layer_norm1")], lengths)
        mid, received, cls, o = oracle.clip_attention(layer, x_in, lengths, causal)
        align, _ = oracle.alignment_scores(alignment, mid, branch)
        tis, theta, start = [], [], 0
        for n in lengths:
            s = slice(start, start + n)
            dec = oracle.decide(mid[s], received[s], cls[s], o[s], align[s], protected[start:start + n],
                                temperature, merge)
            tis += [dec.tis.get(j, 0.0) for j in range(n)]
            theta.append(dec.theta)
            start += n
        # topk_num as counted in float64 first; a float32 count may differ by the TIS within AMBIGUOUS of theta
        # (at a low temperature theta is the TIS of one token, which then sits exactly at it)
        exact = max(above(lengths, protected, tis, theta), default=0)
        lo = max(above(lengths, protected, tis, theta, AMBIGUOUS), default=0)
        hi = max(above(lengths, protected, tis, theta, -AMBIGUOUS), default=0)
        counts = report[name].tolist()
        rows = oracle.d(oracle.packed(seen[(tower, i, "layer_norm2")], counts))
        errors = []
        for k in [exact] + [k for k in range(lo, hi + 1) if k != exact]:
            want = official_policy(lengths, protected, tis, theta, mid, merge, topk_num=k)
            new_lengths, kept_index, want_rows = (lengths, list(range(len(protected))), mid) if want is None else want
            if counts != new_lengths:
                errors.append(f"topk_num {k}: the official policy keeps {new_lengths}, the model {counts}")
            elif not torch.allclose(rows, want_rows, **TOL):
                errors.append(f"topk_num {k}: rows differ by {float((rows - want_rows).abs().max()):.3g}")
            else:
                break
        else:
            raise AssertionError(f"{name}: " + "; ".join(errors))
        out.append((counts, want is not None))
        protected = [j >= 0 and protected[j] for j in kept_index]
        lengths = counts
    return out


CLIP_CASES = [(0, True, 0.5), (1, True, 0.05), (2, False, 2.0), (3, True, 1.0)]


@pytest.mark.parametrize("seed,merge,temperature", CLIP_CASES)
def test_clip_layers_match_the_official_policy(seed, merge, temperature):
    vision, _ = clip_case(seed, merge, temperature)
    assert any(pruned for _, pruned in vision), "a vision layer should prune here"
    for counts, _ in vision:
        assert len(set(counts)) == 1, f"every image keeps the batch's count: {counts}"


def test_clip_cases_cover_text_pruning_and_a_skipped_layer():
    # The cases above must exercise what they claim: a pruned text layer and a layer the skip rule leaves.
    results = [clip_case(*case) for case in CLIP_CASES]
    assert any(pruned for _, text in results for _, pruned in text), "no text layer pruned"
    assert any(not pruned for vision, text in results for _, pruned in vision + text), "no layer was skipped"


@functools.cache
def clip_case(seed, merge, temperature):
    """An applied tiny CLIP in the published execution, every layer of both towers checked against the oracle.
    -> (vision, text): per layer (counts after it, whether it pruned)."""
    torch.manual_seed(seed)
    model = CLIPModel(tiny_config()).eval()
    madtp.apply(model, madtp.MADTPConfig(num_alignment_tokens=6, temperature=temperature, merge_pruned=merge,
                                         execution="published"))
    with torch.no_grad():   # trained alignment tokens are far from their 0.02 init: make the min over k matter
        model.madtp.alignment.tokens.normal_(0, 0.3)
    x = inputs(batch=4, lengths=(9, 2, 6, 5), seed=seed)
    seen, hooks = oracle.capture(model)
    with torch.no_grad():
        model(**x)
    for h in hooks:
        h.remove()
    batch, patches = x["pixel_values"].shape[0], (32 // 8) ** 2 + 1
    vision = _check_tower(model, seen, "vision_model", [patches] * batch, [False] * (batch * patches),
                          causal=False, branch="vision", temperature=temperature, merge=merge)
    ids, mask = x["input_ids"], x["attention_mask"]
    lengths = mask.sum(1).tolist()
    eot = [int((ids[b] == EOS).int().argmax()) for b in range(batch)]
    protected = [j == eot[b] for b, n in enumerate(lengths) for j in range(n)]
    # a tower spec may turn the merged row off (CLIP text: causal attention hides it from EOT)
    text_merge = merge and getattr(clip_spec.TEXT, "merge", True)
    text = _check_tower(model, seen, "text_model", lengths, protected, causal=True, branch="text",
                        temperature=temperature, merge=text_merge)
    return vision, text


def test_published_differs_from_ours_and_leaves_ragged_and_padded_as_they_were():
    torch.manual_seed(0)
    model = madtp.apply(CLIPModel(tiny_config()).eval(), madtp.MADTPConfig(num_alignment_tokens=8, temperature=1.0))
    x = inputs(batch=4, lengths=(9, 2, 6, 5), seed=0)
    outs, reports = {}, {}
    for execution in ("ragged", "published", "padded", "ragged"):   # published between: no state left behind
        madtp.set_execution(model, execution)
        with torch.no_grad():
            outs.setdefault(execution, []).append(model(**x))
        reports.setdefault(execution, []).append({k: v.tolist() for k, v in madtp.pruning_report(model).items()})
    assert reports["ragged"][0] == reports["ragged"][1] == reports["padded"][0]
    for a, b in ((outs["ragged"][0], outs["ragged"][1]), (outs["ragged"][0], outs["padded"][0])):
        torch.testing.assert_close(a.logits_per_image, b.logits_per_image, atol=1e-5, rtol=1e-5)
    ours = reports["ragged"][0]["vision_model.encoder.layers.0"]
    published = reports["published"][0]["vision_model.encoder.layers.0"]
    assert len(set(ours)) > 1 and published == [max(ours)] * 4, (ours, published)


def test_published_adds_one_host_read_per_pruning_layer_to_padded():
    # The official code reads topk_num once per layer; the decision op already reads its new offsets once.
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                             num_hidden_layers=2, image_size=64, patch_size=16)).eval()
    model = madtp.apply(tower, madtp.MADTPConfig(num_alignment_tokens=8, temperature=1.0, prune_text=False))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    syncs = {}
    for execution in ("padded", "published"):
        madtp.set_execution(model, execution)
        with torch.no_grad(), mk.use_backend("torch"):
            model(pixel_values=x)
            with LaunchCounter() as counter:
                model(pixel_values=x)
        syncs[execution] = counter.syncs
    kept = madtp.pruning_report(model)
    assert len(kept) == 2 and all(int(v[0]) < 17 for v in kept.values()), kept   # both layers pruned
    assert syncs["published"] <= syncs["padded"] + 2, syncs


def test_execution_name_is_checked_and_saved(tmp_path):
    from madtp.serialization import load, save

    with pytest.raises(ValueError, match="execution: expected one of .*'published'"):
        madtp.MADTPConfig(execution="official")
    torch.manual_seed(0)
    model = madtp.apply(CLIPModel(tiny_config()).eval(),
                        madtp.MADTPConfig(num_alignment_tokens=8, temperature=1.0, execution="published"))
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert getattr(loaded, ATTRIBUTE).execution == "published"
    assert getattr(loaded, ATTRIBUTE).config.execution == "published"
    x = inputs(batch=2, lengths=(9, 4), seed=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits_per_image, model(**x).logits_per_image)


def test_training_forward_gives_finite_gradients():
    torch.manual_seed(0)
    model = madtp.apply(CLIPModel(tiny_config()).train(),
                        madtp.MADTPConfig(num_alignment_tokens=8, temperature=1.0, execution="published"))
    out = model(**inputs(batch=3, lengths=(9, 2, 6), seed=0), return_loss=True)
    (out.loss + madtp.alignment_loss(model)).backward()
    grads = [p.grad for p in model.vision_model.encoder.layers[0].parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert math.isfinite(float(out.loss.detach()))


# ------------------------------------------------------------------ a batch of one: the policies coincide

def test_a_batch_of_one_gives_our_outputs_on_clip():
    # One sample: topk_num is its own count and its top-k are exactly its tokens above theta; the merged row's
    # weights differ by the 1e-8 only. So where the published execution keeps our counts in every layer of a
    # tower (it does not where ours drops one token, or every candidate: it skips those layers), that tower's
    # output is ours.
    torch.manual_seed(0)
    model = madtp.apply(CLIPModel(tiny_config()).eval(), madtp.MADTPConfig(num_alignment_tokens=8, temperature=1.0))
    agree = {"vision_model": 0, "text_model": 0}
    for b, length in enumerate((9, 2, 6, 5, 8, 7)):
        x = inputs(batch=1, lengths=(length,), seed=b)
        outs, reports = {}, {}
        for execution in ("padded", "published"):
            madtp.set_execution(model, execution)
            with torch.no_grad():
                outs[execution] = model(**x)
            reports[execution] = {k: v.tolist() for k, v in madtp.pruning_report(model).items()}
        for tower, output in (("vision_model", "image_embeds"), ("text_model", "text_embeds")):
            if any(reports["published"][k] != v for k, v in reports["padded"].items() if k.startswith(tower)):
                continue
            agree[tower] += 1
            torch.testing.assert_close(getattr(outs["published"], output), getattr(outs["padded"], output),
                                       atol=1e-5, rtol=1e-5)
    assert agree["vision_model"] >= 4 and agree["text_model"] >= 1, f"too few samples kept the same counts: {agree}"


def test_blip_runs_the_published_policy():
    # BLIP: the image tower (compact output, read by the text layers' cross-attention and the decoders) and the
    # text tower (merged rows on) prune; every image keeps the batch's count.
    from test_blip import build
    from test_blip import inputs as blip_inputs
    from transformers import BlipForImageTextRetrieval, BlipForQuestionAnswering

    x = blip_inputs(lengths=(6, 3, 9, 5))
    for cls in (BlipForImageTextRetrieval, BlipForQuestionAnswering):
        model = madtp.apply(build(cls, vision_width=64), madtp.MADTPConfig(num_alignment_tokens=8, temperature=1.0,
                                                                           execution="published"))
        with torch.no_grad():
            if cls is BlipForImageTextRetrieval:
                out = model(**x).itm_score
            else:
                out = model.generate(**{k: v.clone() for k, v in x.items()}, max_new_tokens=3, do_sample=False)
        assert out.shape[0] == 4 and (out.dtype != torch.float32 or bool(torch.isfinite(out).all()))
        report = madtp.pruning_report(model)
        vision = [v.tolist() for k, v in report.items() if k.startswith("vision_model.")]
        assert vision and all(len(set(v)) == 1 for v in vision), report
        assert any(v[0] < 17 for v in vision), "no image layer pruned"
