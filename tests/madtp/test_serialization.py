"""Compressed models save to safetensors + JSON and load back without the original: same outputs, no pickle."""
import copy
import json

import madtp
import pytest
import torch
from madtp import serialization
from test_clip import inputs, run, tiny_config
from transformers import CLIPModel

import madtp_kernels


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return CLIPModel(tiny_config()).eval()


def test_compressed_round_trip(clip, tmp_path):
    model = madtp.apply(copy.deepcopy(clip), madtp.MADTPConfig(num_alignment_tokens=8, temperature=1.0,
                                                               prune_layers=(0, 2)))
    madtp.set_temperature(model, text=0.5)
    madtp.sparsify(model)
    x = inputs()
    expected = run(model, **x).logits_per_image
    out = serialization.save(model, tmp_path / "compressed")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "madtp.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    meta = json.loads((out / "madtp.json").read_text())
    assert meta["madtp"]["temperature"] == {"vision": 1.0, "text": 0.5} and len(meta["sparse_layers"]) == 30
    loaded = serialization.load(out)
    assert isinstance(loaded.vision_model.encoder.layers[0].mlp.fc1, madtp_kernels.SparseLinear)
    assert loaded.madtp.config.prune_layers == (0, 2)
    torch.testing.assert_close(run(loaded, **x).logits_per_image, expected, atol=0, rtol=0)
    assert madtp.pruning_report(loaded).keys() == madtp.pruning_report(model).keys()
    serialization.save(loaded, out)   # overwrite in place
    torch.testing.assert_close(run(serialization.load(out), **x).logits_per_image, expected, atol=0, rtol=0)


def test_dense_round_trip_and_bad_directories(clip, tmp_path):
    out = serialization.save(clip, tmp_path / "dense")
    torch.testing.assert_close(run(serialization.load(out), **inputs()).logits_per_image,
                               run(clip, **inputs()).logits_per_image, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        serialization.load(tmp_path)
    (out / "madtp.json").write_text("{not json")
    with pytest.raises(ValueError, match="madtp.json: malformed JSON"):
        serialization.load(out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        serialization.save(clip, tmp_path / "file")


def test_task_heads_round_trip(clip, tmp_path):
    from madtp.tasks import ImageTextMatching

    model = ImageTextMatching().prepare(copy.deepcopy(clip))
    model.matching_head.bias.data.fill_(0.25)
    loaded = serialization.load(serialization.save(model, tmp_path / "m"))
    assert float(loaded.matching_head.bias) == 0.25
