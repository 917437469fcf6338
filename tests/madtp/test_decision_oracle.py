"""The pruning decision (importance, threshold, keep, compaction, merged row) against an independent float64 oracle
(_decision_oracle.py, written from the formulas): the op on random ragged inputs on every backend that runs
here, and an applied CLIP whose every pruning layer is recomputed from the hidden states it recorded."""
import _decision_oracle as oracle
import madtp
import pytest
import torch
from test_clip import EOS, inputs, tiny_config
from transformers import CLIPModel

import madtp_kernels

# A float32 decision may differ from the float64 one only for a token whose TIS is this close to theta (the TIS
# are sums of three min-max normalised terms in [0, 1], computed in fp32 from fp32 statistics: ~1e-6 off).
AMBIGUOUS = 1e-4
# fp32 rows of one layer recomputed in fp64 from the same fp32 input (widths <= 192): ~1e-6 apart.
TOL = dict(atol=2e-5, rtol=2e-5)


def random_case(seed, lengths, heads=3, dim=8, width=12, tokens=5):
    g = torch.Generator().manual_seed(seed)
    rows = sum(lengths)
    received = torch.rand(rows, heads, generator=g) * 3
    cls = torch.rand(rows, heads, generator=g)
    attn_out = torch.randn(rows, heads, dim, generator=g)
    align = torch.randn(rows, tokens, generator=g) * 2
    x = torch.randn(rows, width, generator=g)
    protected = torch.rand(rows, generator=g) < 0.15
    headmax = torch.rand(rows, generator=g) * 3
    return x, received, cls, attn_out, align, protected, headmax


def backends():
    return [b for b in ("torch", "triton") if b in madtp_kernels.available_backends()]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("importance", ["minmax", "official"])
def test_score_and_prune_matches_the_oracle(backend, seed, merge, importance):
    g = torch.Generator().manual_seed(100 + seed)
    lengths = [int(n) for n in torch.randint(0, 40, (5,), generator=g)] + [0, 1, 2, 3, 4]
    x, received, cls, attn_out, align, protected, headmax = random_case(seed, lengths)
    protected[-10:] = False   # the short samples have candidates: one (TIS 0, theta 0), two, and
    for t in (received, cls, align, headmax, attn_out):   # the last sample's candidates all alike (every term
        t[-3:] = t[-1]                                     # constant)
    temperature = [0.05, 0.3, 1.0, 4.0][seed]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with madtp_kernels.use_backend(backend):
        out = madtp_kernels.score_and_prune(x, cu, madtp_kernels.AttentionStats(received, cls, headmax), attn_out,
                                            align, temperature=temperature, protected=protected, merge=merge,
                                            importance=importance)
    got_lengths = out.layout.lengths()
    start_in, start_out = 0, 0
    for b, n in enumerate(lengths):
        s = slice(start_in, start_in + n)
        args = (x[s], received[s], cls[s], attn_out[s], align[s], protected[s].tolist(), temperature, merge)
        kw = dict(importance=importance, headmax=headmax[s])
        dec = oracle.decide(*args, **kw)
        # A token within AMBIGUOUS of theta may go either way in fp32: follow the op there, nowhere else.
        got = set(out.kept_index[start_out:start_out + got_lengths[b]].tolist())
        flip = frozenset(i for i in dec.ambiguous(AMBIGUOUS) if (start_in + i in got) != (i in dec.kept))
        if flip:
            dec = oracle.decide(*args, flip=flip, **kw)
        assert abs(float(out.threshold[b]) - dec.theta) <= 1e-5, (b, float(out.threshold[b]), dec.theta)
        for i, t in dec.tis.items():
            assert abs(float(out.importance[start_in + i]) - t) <= 1e-5, (b, i)
        expect = [start_in + i for i in dec.kept] + ([-1] if dec.merged is not None else [])
        assert got_lengths[b] == len(expect), (b, got_lengths[b], expect)
        seg = slice(start_out, start_out + len(expect))
        assert out.kept_index[seg].tolist() == expect, b
        kept_rows = [start_in + i for i in dec.kept]
        torch.testing.assert_close(out.x[seg][:len(kept_rows)], x[kept_rows], atol=0, rtol=0)
        if dec.merged is not None:
            torch.testing.assert_close(out.x[start_out + len(expect) - 1].double(), dec.merged, **TOL)
        assert out.protected[seg].tolist() == [bool(protected[i]) if i >= 0 else False for i in expect]
        start_in, start_out = start_in + n, start_out + len(expect)
    assert start_out == out.x.shape[0]


# ------------------------------------------------------------------ an applied CLIP, layer by layer

def _match(rows_model, sample_args, start_model, count, mid, temperature, merge, **formula):
    """The oracle's decision for one sample that the model's `count` output rows (from start_model) match,
    allowing a float32 decision to differ on tokens within AMBIGUOUS of theta. -> (decision, error or None).
    formula: importance= and headmax= for oracle.decide."""
    base = oracle.decide(*sample_args, temperature, merge, **formula)
    unsure = base.ambiguous(AMBIGUOUS)
    options = [frozenset()] + [frozenset([i]) for i in unsure] + ([frozenset(unsure)] if len(unsure) > 1 else [])
    errors = []
    for flip in options:
        dec = base if not flip else oracle.decide(*sample_args, temperature, merge, flip=flip, **formula)
        n_out = len(dec.kept) + (dec.merged is not None)
        if n_out != count:
            errors.append(f"flip {sorted(flip)}: oracle keeps {n_out} rows, the model {count}")
            continue
        got = oracle.d(rows_model[start_model:start_model + count])
        want = torch.stack([mid[i] for i in dec.kept] + ([dec.merged] if dec.merged is not None else []))
        if torch.allclose(got, want, **TOL):
            return dec, None
        errors.append(f"flip {sorted(flip)}: rows differ by {float((got - want).abs().max()):.3g}")
    return base, "; ".join(errors)


def _check_tower(model, seen, tower, lengths, protected, causal, branch, temperature, merge,
                 importance="minmax"):
    report = madtp.pruning_report(model)
    alignment = model.madtp.alignment
    layers = getattr(model, tower).encoder.layers
    pruned_layers, pool = 0, 0
    for i, layer in enumerate(layers):
        name = f"{tower}.encoder.layers.{i}"
        x_in = oracle.packed(seen[(tower, i, "layer_norm1")], lengths)
        mid, received, cls, o, headmax = oracle.clip_attention(layer, x_in, lengths, causal, with_headmax=True)
        align, mapped = oracle.alignment_scores(alignment, mid, branch)
        pool = pool + oracle.pooled(align, mapped, lengths, protected, alignment.dim)
        counts = report[name].tolist()
        out = oracle.packed(seen[(tower, i, "layer_norm2")], counts)
        start, start_out, new_protected = 0, 0, []
        for b, n in enumerate(lengths):
            s = slice(start, start + n)
            args = (mid[s], received[s], cls[s], o[s], align[s], protected[start:start + n])
            dec, err = _match(out, args, start_out, counts[b], mid[s], temperature, merge, importance=importance,
                              headmax=headmax[s] if importance == "official" else None)
            assert err is None, f"{name}, sample {b}: {err}"
            new_protected += [protected[start + k] for k in dec.kept] + [False] * (dec.merged is not None)
            start, start_out = start + n, start_out + counts[b]
        pruned_layers += counts != lengths
        lengths, protected = counts, new_protected
    # the pooled alignment features: scored on each layer's rows before its pruning, over its candidates
    torch.testing.assert_close(oracle.d(model.madtp.records[branch].pooled), pool, **TOL)
    return pruned_layers


@pytest.mark.parametrize("importance", ["minmax", "official"])
@pytest.mark.parametrize("execution", ["ragged", "padded"])
@pytest.mark.parametrize("seed,merge,temperature", [(0, True, 0.5), (1, True, 0.05), (2, False, 2.0)])
def test_clip_pruning_layers_match_the_oracle(execution, seed, merge, temperature, importance):
    torch.manual_seed(seed)
    model = CLIPModel(tiny_config()).eval()
    madtp.apply(model, madtp.MADTPConfig(num_alignment_tokens=6, temperature=temperature, merge_pruned=merge,
                                         execution=execution, importance=importance))
    with torch.no_grad():   # trained alignment tokens are far from their 0.02 init: make the min over k matter
        model.madtp.alignment.tokens.normal_(0, 0.3)
    x = inputs(batch=4, lengths=(9, 2, 6, 5), seed=seed)
    seen, hooks = oracle.capture(model)
    with torch.no_grad(), madtp.recording(model):
        model(**x)
    for h in hooks:
        h.remove()
    batch, patches = x["pixel_values"].shape[0], (32 // 8) ** 2 + 1
    pruned = _check_tower(model, seen, "vision_model", [patches] * batch, [False] * (batch * patches),
                          causal=False, branch="vision", temperature=temperature, merge=merge,
                          importance=importance)
    assert pruned == 3, "every vision layer should drop tokens here"
    ids, mask = x["input_ids"], x["attention_mask"]
    lengths = mask.sum(1).tolist()
    eot = [int((ids[b] == EOS).int().argmax()) for b in range(batch)]
    protected = [j == eot[b] for b, n in enumerate(lengths) for j in range(n)]
    # CLIP's causal text tower never merges (models/clip.py TEXT: EOT cannot see a merged row)
    _check_tower(model, seen, "text_model", lengths, protected, causal=True, branch="text",
                 temperature=temperature, merge=False, importance=importance)
