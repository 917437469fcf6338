"""Issue 15 B5: CLIP's causal text tower drops tokens without a merged row.

A merged row appended after a sample's tokens is hidden from EOT (the row CLIP pools) by the causal mask, so it
only costs a row in every later layer. The decision each pruning step made is read from the op's own outputs
(each row's importance, each sample's threshold): a sample keeps its first row, its protected rows and the
candidates whose importance exceeds its threshold, and nothing else.
"""
import copy

import madtp
import madtp.pruning
import pytest
import torch
from test_clip import EOS, text_batch, tiny_config
from transformers import CLIPModel

TEXT_WIDTH, VISION_WIDTH = 64, 96


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    config = tiny_config(text_width=TEXT_WIDTH, vision_width=VISION_WIDTH)
    config.text_config.num_hidden_layers = 4
    return CLIPModel(config).eval()


def _spy(monkeypatch):
    """Record every pruning step: (width of the rows, input cu_seqlens, input protected, output)."""
    steps = []
    real = madtp.pruning.score_and_prune

    def spy(x, layout, *args, protected=None, **kwargs):
        out = real(x, layout, *args, protected=protected, **kwargs)
        steps.append((x.shape[1], layout.offsets, protected, out))
        return out

    monkeypatch.setattr(madtp.pruning, "score_and_prune", spy)
    return steps


def _decided(offsets, protected, out) -> list[int]:
    """The input rows the decision keeps, in order: first + protected + candidates with importance > threshold."""
    rows = offsets[-1]
    first = torch.zeros(rows, dtype=torch.bool)
    first[[a for a, b in zip(offsets[:-1], offsets[1:], strict=True) if b > a]] = True
    fixed = first | (protected if protected is not None else torch.zeros(rows, dtype=torch.bool))
    sample = torch.repeat_interleave(torch.arange(len(offsets) - 1), torch.tensor(offsets).diff())
    keep = fixed | (~fixed & (out.importance > out.threshold[sample]))
    return keep.nonzero().squeeze(1).tolist()


@pytest.mark.parametrize("execution", ["ragged", "padded"])
def test_text_prunes_without_a_merged_row(clip, monkeypatch, execution):
    model = madtp.apply(copy.deepcopy(clip), madtp.MADTPConfig(num_alignment_tokens=8, temperature=1.0,
                                                              execution=execution))
    ids, mask = text_batch([16, 11, 2, 7], seed=3)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    steps = _spy(monkeypatch)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    text = [s for s in steps if s[0] == TEXT_WIDTH]
    vision = [s for s in steps if s[0] == VISION_WIDTH]
    assert len(text) == 4 and len(vision) == 3
    dropped = 0
    for _, offsets, protected, res in text:
        lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        assert bool((res.kept_index >= 0).all()), f"a merged row in the text tower: {res.kept_index.tolist()}"
        # Without a merged row every dropped token saves a row: the rows are exactly the decided ones.
        assert res.kept_index.tolist() == _decided(offsets, protected, res), lengths
        got = res.layout.lengths()
        dropped += sum(n - g for g, n in zip(got, lengths, strict=True))
    assert dropped >= 2, "the text tower dropped nothing: the test does not test"
    report = madtp.pruning_report(model)
    text_names = [k for k in report if k.startswith("text_model.")]
    assert [report[k].tolist() for k in text_names] == [s[3].layout.lengths() for s in text]
    # The vision tower still merges (bidirectional: every row sees the merged one).
    assert any(bool((s[3].kept_index < 0).any()) for s in vision)
    # EOT survived at its position and carries the pooled feature.
    hidden = out.text_model_output.last_hidden_state
    eot = (ids == EOS).int().argmax(-1)
    assert bool((hidden[torch.arange(4), eot].abs().sum(-1) > 0).all())
