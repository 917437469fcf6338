"""The shipped shapes CLIP (madtp/assets/shapes_clip) and the script that trains it (madtp.train_shapes)."""
import json
from pathlib import Path

import pytest
import torch
from madtp import pretrained, train_shapes
from madtp.data import shapes
from madtp.data import tokenizer as tok
from safetensors.torch import load_file
from transformers import CLIPModel

SOURCE_ASSETS = Path(__file__).resolve().parents[2] / "python" / "madtp" / "assets" / "shapes_clip"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "metrics.json")
MAX_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def shipped():
    return pretrained.load_shapes_clip()


@pytest.mark.parametrize("directory", [SOURCE_ASSETS, pretrained.SHAPES_CLIP_DIR], ids=["source-tree", "package"])
def test_checkpoint_files_and_size(directory):
    for name in FILES:
        assert (directory / name).is_file(), name
    assert sum((directory / name).stat().st_size for name in FILES) <= MAX_BYTES
    metrics = json.loads((directory / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.9 and metrics["eval"]["k"] == 10 and metrics["eval"]["n"] >= 1000


def test_loads_from_the_source_tree_and_the_package(shipped):
    model, tokenizer = shipped
    assert isinstance(model, CLIPModel) and not model.training
    assert tokenizer.get_vocab() == tok.build_tokenizer().get_vocab()
    again, _ = pretrained.load_shapes_clip(SOURCE_ASSETS)
    state = load_file(str(SOURCE_ASSETS / "model.safetensors"))
    for name, value in again.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
        if name in state:
            assert torch.equal(value, state[name].float()), name
    # the config matches what the tokenizer and the data need
    assert model.config.text_config.vocab_size == tok.VOCAB_SIZE
    assert model.config.text_config.max_position_embeddings == tok.CONTEXT_LENGTH
    assert model.config.text_config.eos_token_id == tok.EOS_ID
    vision = model.config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 >= 64        # enough patches for token pruning
    hf_model, hf_tok = pretrained.load_shapes_clip(hf_tokenizer=True)
    ids = hf_tok(["a small red circle"], padding="max_length", max_length=tok.CONTEXT_LENGTH, return_tensors="pt")
    assert torch.equal(ids["input_ids"], tok.encode(["a small red circle"])[0])


def test_held_out_accuracy(shipped):
    # Full figure (metrics.json): 0.9870 top-1 among 10 on 1000 samples of TEST_SEED.
    model, tokenizer = shipped
    acc = pretrained.evaluate_retrieval(model, n=200, seed=pretrained.TEST_SEED, k=10, tokenizer=tokenizer)
    assert acc >= 0.88, acc


def test_evaluation_uses_negatives_for(shipped):
    model, _ = shipped
    cfg = pretrained.shapes_config(model)
    loader = pretrained.retrieval_loader(6, seed=3, k=10, config=cfg, batch_size=6)
    batch = next(iter(loader))
    for i in range(6):
        assert batch["negatives"][i] == shapes.negatives_for(i, 9, cfg, 3)
        assert len(set(batch["negatives"][i]) | {batch["captions"][i]}) == 10
    # a model that scores every candidate alike gets nothing right (ties count as misses)
    scores = torch.zeros(4, 10)
    assert not pretrained.retrieval_correct(scores).any()


TINY = ["--steps", "3", "--batch-size", "8", "--image-size", "32", "--vision-width", "32", "--vision-layers", "1",
        "--text-width", "32", "--text-layers", "1", "--projection-dim", "16", "--warmup", "1", "--eval-samples",
        "20", "--val-samples", "10", "--threads", "1", "--no-progress", "--grid", "4", "--patch-weight", "0.5",
        "--bag-weight", "0.5"]


def test_training_script_writes_everything_and_is_deterministic(tmp_path):
    runs = []
    for name in ("a", "b"):
        metrics = train_shapes.main([*TINY, "--out", str(tmp_path / name), "--seed", "7"])
        for f in FILES:
            assert (tmp_path / name / f).is_file(), f
        assert metrics["steps"] == 3 and metrics["seed"] == 7 and metrics["threads"] == 1
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["eval"]["n"] == 20
        runs.append(load_file(str(tmp_path / name / "model.safetensors")))
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    other = train_shapes.main([*TINY, "--out", str(tmp_path / "c"), "--seed", "8"])
    assert other["seed"] == 8
    weights = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert any(not torch.equal(weights[k], runs[0][k]) for k in weights)
    # what it wrote loads through the public loader, tokenizer included
    model, tokenizer = pretrained.load_shapes_clip(tmp_path / "a")
    assert model.config.vision_config.image_size == 32
    assert not any(k.startswith(("patch_heads", "bag_head")) for k in runs[0])   # training-only heads not saved
    # the data it trained on is recorded with the model, and the evaluation uses it
    data = pretrained.shapes_config(model)
    assert data.grid == 4 and data.image_size == 32 and data.shapes == train_shapes.DATA_DEFAULTS["shapes"]
    assert tokenizer.get_vocab() == tok.build_tokenizer().get_vocab()


def test_patch_labels():
    cfg = shapes.ShapesConfig(image_size=64, grid=8, small=(0.25, 0.25), large=(0.375, 0.375))
    data = train_shapes.PatchLabelled(shapes.ShapesDataset(40, cfg, seed=5), patch_size=8)
    seen = set()
    for i in range(len(data)):
        item, scene = data[i], data.dataset.scene(i)
        labels = item["patch_labels"].view(4, 8, 8)
        for j, o in enumerate(scene.objects):   # the centre patch of each object: its attributes and relation
            r, c = (o.y + o.side // 2) // 8, (o.x + o.side // 2) // 8
            relation = (0 if scene.relation is None else 1 + shapes.RELATIONS.index(
                scene.relation if j == 0 else shapes.INVERSE_RELATION[scene.relation]))
            assert labels[:, r, c].tolist() == [cfg.shapes.index(o.shape) + 1, cfg.colours.index(o.colour) + 1,
                                                shapes.SIZES.index(o.size) + 1, relation]
            seen.add(relation)
        covered = sum((o.side // 8) ** 2 for o in scene.objects)
        assert 0 < (labels[0] > 0).sum() <= covered and ((labels > 0).any(0) == (labels[0] > 0)).all()
    assert seen == {0, 1, 2, 3, 4}


def test_claim_bag_tells_every_caption_from_its_hard_negatives():
    cfg = shapes.ShapesConfig(image_size=64, grid=8, small=(0.25, 0.25), large=(0.375, 0.375))
    bag = train_shapes.ClaimBag(cfg)
    batch = shapes.generate(60, cfg, seed=4)
    for i, (caption, scene) in enumerate(zip(batch.captions, batch.scenes, strict=True)):
        (own,) = bag.labels([caption])
        assert own.sum() == 3 * len(scene.objects)
        for restated in scene.description.restatements():
            assert torch.equal(bag.labels([restated.caption])[0], own)
        negatives = shapes.negatives_for(i, 9, cfg, 4)
        assert all(not torch.equal(row, own) for row in bag.labels(negatives)), caption


def test_script_help(capsys):
    with pytest.raises(SystemExit) as e:
        train_shapes.main(["--help"])
    assert e.value.code == 0
    assert "--seed" in capsys.readouterr().out
