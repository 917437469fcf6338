"""The MADTP++ compression pipeline (madtp.compress.pipeline) and the `madtp` command line (madtp.cli) on tiny
CLIP models and generated shapes data, on CPU.

The convergence test follows Liger-Kernel's test/convergence: the same training run with and without the
patches, losses compared. Here "the patches" are the compression modules (token pruning, SR-STE 2:4 weights) and
the run is the pipeline's own: the same distillation objective, teacher, data order and steps in both."""
import copy
import dataclasses
import json
import math
import re

import madtp
import pytest
import torch
from madtp import cli, serialization
from madtp.compress import make_teacher
from madtp.compress.pipeline import CompressConfig, DistillationTask, compress, plan_targets
from madtp.data import ShapesConfig, ShapesDataset
from madtp.data import tokenizer as tok
from madtp.data.annotations import write_shapes_annotations
from madtp.tasks import ClipRetrieval, RetrievalCollate
from madtp.train import TrainConfig, Trainer
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel

from madtp_kernels import SparseLinear

PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["--temperatures", "0.01", "0.1", "1", "10", "--calibration-batches", "2", "--latency-repeats", "1",
        "--settle-steps", "2", "--micro-batch-size", "8", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_clip(seed=0, width=32):
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(**tok.text_config_kwargs(), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    return CLIPModel(config)


def mean_of(path, key, first=None, last=None):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    values = [r[key] for r in rows]
    values = values[:first] if first else values[-last:]
    return sum(values) / len(values)


# ------------------------------------------------------------------ mini-model convergence (CONVENTIONS 9)

def test_compressed_mini_clip_converges_like_the_dense_one_and_meets_its_gflops_target(tmp_path):
    """A 2-layer, width-32 CLIP is trained on 96 generated shapes pairs (200 steps, dense), then trained 60 more
    steps twice from there with the same distillation objective (make_teacher of the trained model, task loss +
    MAG alignment + layer-summary MSE + T^2 KL), the same data order and learning rate:
      without: madtp.apply with pruning off, dense weights;
      with:    madtp.compress.pipeline.compress at a 45% GFLOPs reduction: token pruning held at its GFLOPs target
               by the controller, SR-STE 2:4 weights, export to SparseLinear.

    Tolerance on the loss: the compressed run's final task loss (mean of its last 10 steps' InfoNCE, and the loss
    over the training set in eval mode) within 30% of the uncompressed run's. The two cannot be equal: compression
    removes ~45% of the work of a model this small (2:4 halves every encoder Linear, the pruned image keeps ~40% of
    its tokens after layer 0 of 2) and restarts it from a loss ~0.6 above the dense model's, with 60 steps to
    recover. Measured here: 1.75 vs 1.53 (last 10 steps) and 1.66 vs 1.46 (train set), ratios ~1.14; over three
    init seeds the ratio was 1.13 to 1.53 (the slowest seed still falling fast at step 60), so 1.3 is a bound
    this seed meets with room and that a broken training path (no recovery: ratio >= 1.6, the loss right after
    compression) does not. The compressed run must also fall by 20% from its first 10 steps (it trains through
    the masks and the pruning) and end no worse than 10% above the dense model it was compressed from.

    GFLOPs: the compressed model's GFLOPs per sample on 64 held-out pairs (madtp.count_flops, 2:4 at half) within
    5% of (1 - 0.55) x the dense model's (measured 1.002x; the issue's "done when")."""
    cfg = ShapesConfig(image_size=32)
    train_set = ShapesDataset(96, cfg, seed=1, num_negatives=2)
    train_items = [train_set[i] for i in range(len(train_set))]
    eval_set = ShapesDataset(64, cfg, seed=2, num_negatives=2)
    collate, task = RetrievalCollate(), ClipRetrieval()
    eval_batches = [collate([eval_set[i] for i in range(s, s + 16)]) for s in range(0, 64, 16)]
    train_batches = [collate(train_items[s:s + 16]) for s in range(0, 96, 16)]

    def train_loss(model):
        model.eval()
        with torch.no_grad():
            return sum(float(task.loss(model, b)["loss"]) for b in train_batches) / len(train_batches)

    model = tiny_clip()
    Trainer(model, task, train_items, TrainConfig(output_dir=str(tmp_path / "dense"), max_steps=200,
                                                  micro_batch_size=16, lr=3e-4, warmup_steps=20, progress=False,
                                                  checkpoint_at_end=False), collate_fn=collate).fit()
    dense_loss = train_loss(model)
    assert dense_loss < 0.8 * math.log(16 + 2)   # it learned: chance is log(batch + negatives)

    stage = dict(max_steps=60, micro_batch_size=16, lr=3e-4, schedule="constant", seed=1, progress=False,
                 checkpoint_at_end=False)
    # 0.55: with the dense attention counted (count_flops), the 2:4 layers plus the least pruning already pass 50%
    config = CompressConfig(target_gflops_reduction=0.55, num_alignment_tokens=4, temperatures=(0.01, 0.1, 1.0, 10.0),
                            calibration_batches=2, settle_steps=4, latency_repeats=1,
                            train=TrainConfig(output_dir=str(tmp_path / "unused"), **stage))

    without = madtp.apply(copy.deepcopy(model), config.madtp_config())
    objective = DistillationTask(task, make_teacher(model), alpha=config.alpha, beta_v=config.beta_v,
                                 beta_t=config.beta_t, gamma=config.gamma, kd_temperature=config.kd_temperature)
    Trainer(without, objective, train_items, TrainConfig(output_dir=str(tmp_path / "without"), **stage),
            collate_fn=collate).fit()

    result = compress(copy.deepcopy(model), task, train_items, eval_batches, config, collate, tmp_path / "with",
                      verbose=False)
    compressed = result.model
    assert sum(isinstance(m, SparseLinear) for m in compressed.modules()) == 24   # every encoder Linear
    loss_with, loss_without = mean_of(tmp_path / "with/metrics.jsonl", "task", last=10), \
        mean_of(tmp_path / "without/metrics.jsonl", "task", last=10)
    first_with = mean_of(tmp_path / "with/metrics.jsonl", "task", first=10)
    train_with, train_without = train_loss(compressed), train_loss(without)
    numbers = dict(dense=dense_loss, last10_with=loss_with, last10_without=loss_without, first10_with=first_with,
                   train_with=train_with, train_without=train_without)
    assert loss_with <= 1.3 * loss_without, numbers
    assert train_with <= 1.3 * train_without, numbers
    assert loss_with <= 0.8 * first_with, numbers
    assert train_with <= 1.1 * dense_loss, numbers

    target = result.targets[0]
    budget = (1 - 0.55) * result.dense.gflops["total"]
    assert target.budget_gflops == pytest.approx(budget)
    assert target.measurement.gflops["total"] == pytest.approx(budget, rel=0.05), (target.measurement.gflops, budget)
    assert target.achieved_gflops_reduction == pytest.approx(0.55, abs=0.05 * 0.45)
    assert target.gflops_vs_budget == pytest.approx(1.0, abs=0.05)
    assert target.temperatures["vision"] is not None   # token pruning carries part of the budget
    assert compressed.madtp.temperature == target.temperatures
    report = json.loads(result.report_json.read_text())
    assert report["compressed"][0]["measurement"]["gflops"]["total"] == target.measurement.gflops["total"]
    assert report["compressed"][0]["sensitivity"]["vision"]


def test_plan_gives_the_slack_back_to_the_pruned_branches():
    from test_compress import synthetic_table

    table = synthetic_table()   # of 10 GFLOPs: vision 8 -> 7 (t=1) -> 5 (t=2); text 2 -> 1 -> 0.5
    # Only vision pruned, at t=2 (7 in all); a budget of 7.6: vision gets the 0.6 back, and its start temperature
    # is interpolated in log T between t=1 (7) and t=2 (5).
    targets, starts = plan_targets(table, {"vision": 2.0, "text": None}, 7.6, None)
    assert targets == pytest.approx({"vision": 5.6})
    assert starts["vision"] == pytest.approx(2 ** 0.7)
    # Both pruned at t=2 (5.5): the 1.0 of slack in proportion to what each saves (3 and 1.5).
    targets, _ = plan_targets(table, {"vision": 2.0, "text": 2.0}, 6.5, None)
    assert targets == pytest.approx({"vision": 5 + 2 / 3, "text": 0.5 + 1 / 3})
    # With 2:4 the slack is in effective GFLOPs (the eligible Linear work at half): the total lands on the budget.
    targets, _ = plan_targets(table, {"vision": 2.0, "text": 2.0}, 4.0, "2:4")
    effective = sum(g * (1 - 0.5 * e.linear[b] / e.gflops[b])
                    for b, g in targets.items() for e in [table.entry(b, 2.0)])
    assert effective == pytest.approx(4.0)
    # Never above the least pruning of the grid (t=1): the controller could not get there.
    targets, _ = plan_targets(table, {"vision": 2.0, "text": 2.0}, 9.9, None)
    assert targets == pytest.approx({"vision": 7.0, "text": 1.0})


# ------------------------------------------------------------------ the command line

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    config = ShapesConfig(image_size=32)
    write_shapes_annotations(root, 48, config, seed=0, split="train", num_negatives=2)
    write_shapes_annotations(root, 16, config, seed=1, split="val", num_negatives=2)
    return root


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def compress_args(data, output, *extra, target="0.55"):  # 2:4 alone reaches 0.45 (dense attention counted)
    return ["compress", "--preset", "tiny-clip", "--task", "clip-retrieval", "--data", data,
            "--target-gflops-reduction", target, "--output", output, *FAST, *extra]


def test_cli_compress_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    code, out, err = run_cli(capsys, *compress_args(data, tmp_path / "out", "--generate-data", 48, "--max-steps", 3))
    assert code == 0, err
    assert (data / "retrieval_train.json").is_file() and (data / "retrieval_val.json").is_file()
    out_dir = tmp_path / "out"
    model = serialization.load(out_dir / "model")
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 24
    assert model.madtp.temperature["vision"] is not None
    assert (out_dir / "model" / "tokenizer.json").is_file()
    report = json.loads((out_dir / "report.json").read_text())
    (entry,) = report["compressed"]
    assert entry["target_gflops_reduction"] == 0.55 and entry["steps"] == 3
    assert entry["measurement"]["gflops"]["total"] < report["dense"]["gflops"]["total"]
    assert set(entry["measurement"]["latency_ms"]) == {"padded", "ragged"} and "dense" in report["dense"]["latency_ms"]
    assert report["device"].startswith("CPU")
    assert "| dense |" in (out_dir / "report.md").read_text()
    assert (out_dir / "accuracy_vs_gflops.png").read_bytes()[:8] == PNG
    assert "GFLOPs/sample" in out and "CPU ms ragged" in out and "accuracy_vs_gflops.png" in out

    code, out, err = run_cli(capsys, "eval", "--model", out_dir / "model", "--task", "clip-retrieval", "--data", data,
                             "--threads", 1, "--json", tmp_path / "eval.json")
    assert code == 0, err
    assert "i2t_r1" in out and "GFLOPs/sample total" in out
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["gflops"]["total"] == pytest.approx(entry["measurement"]["gflops"]["total"], rel=0.2)

    code, out, err = run_cli(capsys, "bench", "--model", out_dir / "model", "--repeats", 1, "--batch-size", 4,
                             "--threads", 1, "--json", tmp_path / "bench.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["execution"] for r in rows] == ["dense", "padded", "ragged"]
    assert rows[2]["gflops"]["total"] <= rows[1]["gflops"]["total"] < rows[0]["gflops"]["total"]
    assert "CPU ms" in out


def test_cli_resume_continues_a_killed_run(data_dir, tmp_path, capsys):
    args = compress_args(data_dir, tmp_path / "out", "--max-steps", 4, "--checkpoint-every", 2)
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    first = load_file(tmp_path / "out" / "model" / "model.safetensors")
    ckpt = tmp_path / "out" / "checkpoints"
    # "kill" it after step 2: the step-4 checkpoint and the model never got written
    import shutil

    shutil.rmtree(ckpt / "step_00000004")
    (ckpt / "latest").write_text("step_00000002")
    shutil.rmtree(tmp_path / "out" / "model")
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    assert re.search(r"resumed from .*step_00000002 \(step 2\)", err)
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    again = load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert again.keys() == first.keys()
    for name in first:
        torch.testing.assert_close(again[name], first[name], atol=1e-6, rtol=1e-6, msg=name)
    # --resume with no checkpoint yet starts from step 0
    code, _, err = run_cli(capsys, *compress_args(data_dir, tmp_path / "fresh", "--max-steps", 1, "--resume"))
    assert code == 0 and "starting from step 0" in err


def test_cli_several_targets_one_point_each(data_dir, tmp_path, capsys):
    code, out, err = run_cli(capsys, *compress_args(data_dir, tmp_path / "out", "--max-steps", 1, "--quiet",
                                                    target="0.44"), "--target-gflops-reduction", "0.44", "0.46")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["target_gflops_reduction"] for r in report["compressed"]] == [0.44, 0.46]
    for t in ("0.44", "0.46"):
        assert (tmp_path / "out" / f"target-{t}" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "accuracy_vs_gflops.png").read_bytes()[:8] == PNG
    assert out.count("compressed (2:4)") == 2 and "[madtp compress" not in err   # --quiet


def one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[-1], (needle, err)
    return lines


@pytest.mark.parametrize("target", ["1.0", "1.5", "0", "-0.2"])
def test_cli_target_out_of_range(data_dir, tmp_path, capsys, target):
    code, _, err = run_cli(capsys, *compress_args(data_dir, tmp_path / "out", target=target))
    lines = one_line_error(code, err, "--target-gflops-reduction", "(0, 1)")
    assert len(lines) == 1
    assert not (tmp_path / "out").exists()


def test_cli_unreachable_target_names_the_best_reachable(data_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, *compress_args(data_dir, tmp_path / "out", "--max-steps", 1, "--quiet",
                                                  target="0.95"))
    one_line_error(code, err, "--target-gflops-reduction", "cannot be met", "best reachable")


def test_cli_bad_data(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, _, err = run_cli(capsys, *compress_args(missing, tmp_path / "out"))
    assert len(one_line_error(code, err, "--data", str(missing))) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, *compress_args(empty, tmp_path / "out"))
    assert len(one_line_error(code, err, str(empty / "retrieval_train.json"))) == 1
    code, _, err = run_cli(capsys, "eval", "--model", tmp_path / "no-model", "--task", "vqa", "--data", empty)
    one_line_error(code, err, str(empty / "vqa_val.json"))


def test_cli_bad_model_and_options(data_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, *compress_args(data_dir, tmp_path / "out", "--preset", "no-such-model"))
    assert len(one_line_error(code, err, "--preset", "no-such-model")) == 1
    code, _, err = run_cli(capsys, *compress_args(data_dir, tmp_path / "out", "--weight-sparsity", "4:8"))
    assert len(one_line_error(code, err, "--weight-sparsity", "4:8", "--allow-unaccelerated")) == 1
    code, _, err = run_cli(capsys, *compress_args(data_dir, tmp_path / "out", "--weight-sparsity", "2-4"))
    one_line_error(code, err, "--weight-sparsity", "2-4")
    code, _, err = run_cli(capsys, "compress", "--model", tmp_path / "no-model", "--task", "clip-retrieval",
                           "--data", data_dir, "--target-gflops-reduction", "0.4", "--output", tmp_path / "out")
    one_line_error(code, err, "--model", str(tmp_path / "no-model"))
    code, _, err = run_cli(capsys, *compress_args(data_dir, tmp_path / "out", "--task", "vqa"))
    one_line_error(code, err, "--task", "BlipForQuestionAnswering", "CLIPModel")
    code, _, err = run_cli(capsys, *compress_args(data_dir, tmp_path / "out", "--lr", "-1"))
    one_line_error(code, err, "--lr")
    code, _, err = run_cli(capsys, *compress_args(data_dir, tmp_path / "out", "--epochs", "1", "--max-steps", "2"))
    one_line_error(code, err, "--epochs", "--max-steps")


def test_cli_help_lists_every_option(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for name in cli.COMMANDS:
        assert name in out
    for name, command in cli.COMMANDS.items():
        code, out, _ = run_cli(capsys, name, "--help")
        assert code == 0, name
        text = " ".join(out.split())
        parser = cli.argparse.ArgumentParser()
        command.add_arguments(parser)
        for action in parser._actions:
            for option in action.option_strings:
                assert option in out, (name, option)
            assert action.help and action.help.strip(), (name, action.dest)   # a description for each
        if name == "compress":
            for preset in cli.available_presets():
                assert preset in text
    code, _, err = run_cli(capsys)
    assert code == 2 and "COMMAND" in err
    defaults = {f.name: f.default for f in dataclasses.fields(CompressConfig)}
    assert cli.COMPRESS_DEFAULTS == {k: defaults[k] for k in cli.COMPRESS_DEFAULTS}


@pytest.mark.parametrize("importance", ["minmax", "official"])
def test_importance_option_reaches_the_model_config(importance, tmp_path):
    args = cli.build_parser().parse_args([str(a) for a in compress_args(tmp_path / "d", tmp_path / "o",
                                                                         "--importance", importance)])
    config, _ = cli._configs(args)
    assert config.importance == importance and config.madtp_config().importance == importance
    demo_args = cli.build_parser().parse_args(["demo", "--importance", importance])
    assert demo_args.importance == importance
    with pytest.raises(ValueError, match="importance: expected one of"):
        CompressConfig(importance="fvcore")
