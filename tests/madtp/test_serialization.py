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


# ------------------------------------------------------------------ integrity and modes

def _sha256(path):
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def export(clip, tmp_path_factory):
    model = madtp.apply(copy.deepcopy(clip), madtp.MADTPConfig(num_alignment_tokens=4, temperature=1.0))
    madtp.sparsify(model)
    out = serialization.save(model, tmp_path_factory.mktemp("export") / "model")
    (out / "tokenizer.json").write_text('{"version": "1.0"}')
    serialization.add_files(out, ["tokenizer.json"])
    return out


def test_manifest_records_a_hash_per_file(export):
    from madtp.integrity import SEAL_KEY, seal

    meta = json.loads((export / "madtp.json").read_text())
    assert meta["format"] == serialization.FORMAT
    assert meta["files"] == {name: {"size": (export / name).stat().st_size, "sha256": _sha256(export / name)}
                             for name in ("config.json", "model.safetensors", "tokenizer.json")}
    assert meta[SEAL_KEY] == seal(meta)[SEAL_KEY]


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "madtp.json"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_load_names_the_damaged_file(export, tmp_path, name, damage):
    import shutil

    from madtp.integrity import IntegrityError

    d = shutil.copytree(export, tmp_path / "m")
    f = d / name
    if damage == "delete":
        f.unlink()
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-3])
    elif name == "madtp.json":   # a value flipped: still valid JSON
        f.write_text(f.read_text().replace('"vision": 1.0', '"vision": 1.5', 1))
    elif name == "config.json":  # a digit of a size: still valid JSON and a valid config
        f.write_text(f.read_text().replace('"projection_dim": 32', '"projection_dim": 33', 1))
    else:                        # one bit of the last tensor (or the tokenizer's last byte)
        data = bytearray(f.read_bytes())
        data[-2] ^= 0x01
        f.write_bytes(bytes(data))
    assert damage == "delete" or f.read_bytes() != (export / name).read_bytes()
    if name == "madtp.json" and damage != "flip":
        # a manifest gone is a plain Hugging Face directory (whose weights then do not fit a dense CLIP);
        # a truncated one is no longer JSON
        with pytest.raises(ValueError, match=r"model\.safetensors: does not match|madtp\.json: malformed JSON"):
            serialization.load(d)
        return
    with pytest.raises(IntegrityError, match=rf"/m/{name.replace('.', '[.]')}: "):
        serialization.load(d)


def test_old_exports_without_hashes_load_with_a_warning(export, tmp_path):
    import shutil

    from madtp.integrity import SEAL_KEY

    d = shutil.copytree(export, tmp_path / "m")
    meta = json.loads((d / "madtp.json").read_text())
    del meta["files"], meta[SEAL_KEY]
    meta["format"] = "madtp-compressed/1"
    (d / "madtp.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no file hashes"):
        model = serialization.load(d)
    assert model.madtp.temperature["vision"] == 1.0
    with pytest.raises(ValueError, match="no file hashes to add"):
        serialization.add_files(d, ["tokenizer.json"])
    serialization.save(model, d)   # saving again adds them
    assert "files" in json.loads((d / "madtp.json").read_text())


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_export_modes_follow_the_umask(clip, tmp_path, mask):
    import os
    import stat

    old = os.umask(mask)
    try:
        out = serialization.save(clip, tmp_path / "m")
        serialization.add_files(out, [])
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f.name


def test_importance_is_saved_and_an_export_without_it_loads_as_minmax(clip, tmp_path):
    import shutil

    from madtp.integrity import SEAL_KEY

    model = madtp.apply(copy.deepcopy(clip), madtp.MADTPConfig(num_alignment_tokens=8, temperature=1.0,
                                                               importance="official"))
    x = inputs()
    expected = run(model, **x).logits_per_image
    out = serialization.save(model, tmp_path / "official")
    assert json.loads((out / "madtp.json").read_text())["madtp"]["config"]["importance"] == "official"
    loaded = serialization.load(out)
    assert loaded.madtp.config.importance == "official"
    torch.testing.assert_close(run(loaded, **x).logits_per_image, expected, atol=0, rtol=0)
    # an export written before the option existed (no 'importance' key) ran the min-max formula
    d = shutil.copytree(out, tmp_path / "old")
    meta = json.loads((d / "madtp.json").read_text())
    del meta["madtp"]["config"]["importance"], meta["files"], meta[SEAL_KEY]
    meta["format"] = "madtp-compressed/1"
    (d / "madtp.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no file hashes"):
        assert serialization.load(d).madtp.config.importance == "minmax"
    meta["madtp"]["config"]["importance"] = "fvcore"
    (d / "madtp.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'madtp.config': importance: expected one of"), \
            pytest.warns(UserWarning, match="no file hashes"):
        serialization.load(d)
