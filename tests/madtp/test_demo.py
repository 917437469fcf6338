"""`madtp demo --quick`: the main job's pipeline at toy sizes, on a small random CLIP saved as the shipped one is."""
import json

import torch
from madtp import cli
from madtp.data.tokenizer import save_tokenizer, text_config_kwargs
from madtp.pretrained import save_clip
from transformers import CLIPConfig, CLIPModel


def test_quick_demo_writes_table_json_and_plot(tmp_path, capsys):
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, **text_config_kwargs()),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    model_dir = tmp_path / "model"
    save_clip(CLIPModel(config), model_dir)
    save_tokenizer(model_dir)
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    try:
        status = cli.main(["demo", "--quick", "--model", str(model_dir), "--output", str(out), "--targets", "0.3",
                           "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    table = capsys.readouterr().out
    for column in ("GFLOPs/sample", "hard_negative_acc", "non-zero", "CPU ms dense", "CPU ms padded", "CPU ms ragged"):
        assert column in table, column
    report = json.loads((out / "report.json").read_text())
    assert report["metric_name"] == "hard_negative_acc"
    (target,) = report["compressed"]
    assert target["gflops_vs_budget"] <= 1.05   # not over its GFLOPs budget
    assert target["measurement"]["nonzero"] < report["dense"]["nonzero"]
    assert (out / "accuracy_vs_gflops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the two token-pruning policies on the same compressed model, each measured in this run
    assert "published: the batch's largest keep count" in table and "CPU ms published" in table
    ours, published = report["policies"]
    assert (ours["policy"], published["policy"]) == ("ours", "published")
    assert set(ours["latency_ms"]) == {"padded", "ragged"} and set(published["latency_ms"]) == {"published"}
    assert 0 < published["reduction"] < 1 and "hard_negative_acc" in published["metric"]
    assert "## Token-pruning policies" in (out / "report.md").read_text()


def test_demo_bad_target_exits_2(capsys):
    assert cli.main(["demo", "--targets", "1.5"]) == 2
    assert "--targets" in capsys.readouterr().err


def test_quick_demo_on_the_shipped_model(tmp_path, capsys):
    # what `madtp demo` runs, on the shipped checkpoint, at toy sizes; both default targets
    threads = torch.get_num_threads()
    try:
        assert cli.main(["demo", "--quick", "--output", str(tmp_path), "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dense"]["metric"]["hard_negative_acc"] >= 0.9     # the shipped model, not a random one
    assert [t["target_gflops_reduction"] for t in report["compressed"]] == [0.5, 0.8]
    for t in report["compressed"]:
        assert 0.45 <= t["achieved_gflops_reduction"] <= 0.85, t["achieved_gflops_reduction"]
        # 10 candidates: chance is 0.1, and on the 32 held-out samples a model at chance reaches 13/32 with
        # probability ~1e-5. Measured (2 threads): 0.84 at the 0.5 target, 0.66 at 0.8; a 2:4 mask that keeps
        # the two smallest |w| per group scores 0.0.
        acc = t["measurement"]["metric"]["hard_negative_acc"]
        assert acc >= 0.4, (t["target_gflops_reduction"], acc)
    assert "hard_negative_acc" in capsys.readouterr().out
