"""benchmarks/report.py: measured tables with same-run speedups, predictions labelled and from the roofline."""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _bench(name, group, backend, median, bytes_moved, flops):
    return {"name": name, "group": group, "stats": {"median": median},
            "extra_info": {"backend": backend, "device": "cpu", "bytes": bytes_moved, "flops": flops}}


def test_report_tables_and_predictions(report, tmp_path):
    data = {"machine_info": {"cpu": {"brand_raw": "Test CPU"}}, "benchmarks": [
        _bench("a", "sparse_linear x", "dense", 2e-3, 3_000_000, 8_000_000_000),
        _bench("b", "sparse_linear x", "madtp-torch", 1e-3, 1_500_000, 8_000_000_000),
    ]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "BENCHMARKS.md"
    assert report.main([str(path), "-o", str(out)]) == 0
    text = out.read_text()
    assert "| madtp-torch | cpu | 1.000 | 2.00x | 1.50 | 8000.0 |" in text
    assert "not measured" in text and "Test CPU" in text
    _, rows = report.load(str(path))
    dense, sparse = rows
    # H100 SXM datasheet: 3.35 TB/s, 989 TFLOP/s dense fp16/bf16, 1979 with 2:4 sparsity
    assert dense.predicted_h100_s == pytest.approx(max(3e6 / 3.35e12, 8e9 / 989e12))
    assert sparse.predicted_h100_s == pytest.approx(max(1.5e6 / 3.35e12, 8e9 / 1979e12))
    assert "3.35 TB/s" in text and "989 TFLOP/s" in text and "1979 TFLOP/s" in text and "datasheet" in text


def _model(impl, median, fraction, keep, budget=None, temperature=None, lo=None, hi=None):
    group = "model tiny-vit, batch 2, float32"
    info = {"backend": impl, "device": "cpu", "bytes": 1_000_000, "flops": int(fraction * 4e9),
            "gflops_fraction": fraction, "keep_fraction": keep}
    if budget is not None:
        info.update(execution=impl.split("@")[0].removeprefix("madtp-"), budget=budget, temperature=temperature)
    return {"name": impl, "fullname": f"benchmarks/bench_models.py::test_clip_vision_tower[{impl}]", "group": group,
            "stats": {"median": median, "min": lo or median, "max": hi or median, "rounds": 3}, "extra_info": info}


MODEL_RUN = {
    "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}, "python_version": "3.11.7"},
    "commit_info": {"id": "0123456789abcdef", "dirty": False}, "datetime": "2026-01-02T03:04:05+00:00",
    "version": "5.3.1",
    "benchmarks": [
        _model("dense", 1.0, 1.0, 1.0, lo=0.9, hi=1.2),
        _model("madtp-ragged@50%", 0.625, 0.5, 0.45, 0.5, 1.0),
        _model("madtp-padded@50%", 0.8, 0.5, 0.45, 0.5, 1.0),
        # the 30% target is not reachable: it ends at the temperature and fraction the 40% one found
        _model("madtp-ragged@40%", 0.5, 0.42, 0.40, 0.4, 9.0),
        _model("madtp-padded@40%", 0.6, 0.42, 0.40, 0.4, 9.0),
        _model("madtp-ragged@30%", 0.55, 0.42, 0.40, 0.3, 9.0),
        _model("madtp-padded@30%", 0.66, 0.42, 0.40, 0.3, 9.0),
    ]}


@pytest.fixture()
def model_report(report, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(MODEL_RUN))
    out = tmp_path / "BENCHMARKS.md"
    assert report.main([str(path), "-o", str(out), "--plots", str(tmp_path / "plots")]) == 0
    return out.read_text(), tmp_path


def _row(text, label, budget):
    rows = [line for line in text.splitlines() if line.startswith(f"| {label} | {budget}")]
    assert len(rows) == 1, (label, budget, rows)
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_model_table_speedups_and_fractions(model_report):
    text, _ = model_report
    measured = text[text.index("## Measured: models"):text.index("## Predicted")]
    # label by the measured GFLOPs fraction; columns: label, target, kept, median, min-max, speedup, share, r/p
    ragged = _row(measured, "madtp-ragged @ 50.0% GFLOPs", "50%")
    assert ragged[2:] == ["45.0%", "625.0", "625.0–625.0", f"{1 / 0.625:.2f}x", f"{1 / 0.625 * 0.5:.0%}",
                          f"{0.8 / 0.625:.2f}x"]
    padded = _row(measured, "madtp-padded @ 50.0% GFLOPs", "50%")
    assert padded[5:] == [f"{1 / 0.8:.2f}x", f"{1 / 0.8 * 0.5:.0%}", "-"]
    # a target the temperature could not reach is labelled by what it reached, and said to be missed
    missed = _row(measured, "madtp-ragged @ 42.0% GFLOPs", "30% (not reached)")
    assert missed[5:] == [f"{1 / 0.55:.2f}x", f"{0.42 / 0.55:.0%}", f"{0.66 / 0.55:.2f}x"]
    reached = _row(measured, "madtp-ragged @ 42.0% GFLOPs", "40%")
    assert reached[7] == f"{0.6 / 0.5:.2f}x"   # paired with the padded row of its own budget
    assert "one configuration timed twice" in measured
    dense = _row(measured, "dense", "-")
    assert dense[3:6] == ["1000.0", "900.0–1200.0", "1.00x"]


def test_model_plots_written_and_linked(model_report):
    text, tmp_path = model_report
    png = tmp_path / "plots" / "model-tiny-vit-batch-2-float32.png"
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](plots/model-tiny-vit-batch-2-float32.png)" in text


def test_predictions_kept_apart_and_provenance(model_report):
    text, _ = model_report
    measured, predicted = text.split("## Predicted H100 time")
    assert "not measured" in predicted.splitlines()[0]
    assert "predicted" not in measured.split("## How these numbers")[1].lower()
    # models: max(bytes / 3.35 TB/s, FLOPs / 989 TFLOP/s) (no 2:4 here), with the dtype the run used
    assert "| model tiny-vit, batch 2, float32 | dense | float32 | 1.0 | 4.0 | " \
           f"{max(1e6 / 3.35e12, 4e9 / 989e12) * 1e3:.3f} | compute | lower bound |" in predicted
    how = text[text.index("## How these numbers"):text.index("## Measured")]
    assert "pytest benchmarks/bench_models.py --benchmark-only" in how
    assert "Test CPU, 2 logical CPUs" in how and "threads" in how and "scaled down" in how
    assert "commit 0123456789" in how and "2026-01-02 03:04 UTC" in how


def test_op_groups_without_keep_ratio_get_no_plot(report, tmp_path):
    data = {"machine_info": {}, "benchmarks": [
        _bench("a", "varlen_attention x", "padded-sdpa", 2e-3, 3_000_000, 8_000_000),
        _bench("b", "varlen_attention x", "madtp-torch", 1e-3, 3_000_000, 8_000_000)]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    assert report.main([str(path), "-o", str(tmp_path / "B.md"), "--plots", str(tmp_path / "plots")]) == 0
    assert not (tmp_path / "plots").exists()
    assert "| varlen_attention x | madtp-torch | float32 |" in (tmp_path / "B.md").read_text()


@pytest.mark.parametrize("smi", [None, "broken"])
def test_gpu_sh_fails_fast_without_a_gpu(tmp_path, smi):
    if smi is None:
        fake = tmp_path / "absent" / "nvidia-smi"
    else:   # present but no driver behind it
        fake = tmp_path / "nvidia-smi"
        fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
        fake.chmod(0o755)
    results = tmp_path / "results"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(results)], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "NVIDIA_SMI": str(fake)})
    assert proc.returncode == 2
    assert "gpu.sh: no" in proc.stderr and "NVIDIA GPU" in proc.stderr
    assert not results.exists()   # failed before writing anything


def test_gpu_sh_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed")
    subprocess.run([shellcheck, str(ROOT / "benchmarks" / "gpu.sh")], check=True)


def test_launch_section_reports_per_layer_deltas_and_the_prediction(report):
    rows = [dict(model="clip-vit-b16", backend="triton", batch=2, layers=4, execution=e, launches=n, syncs=s,
                 gflops=g, predicted_ms=p) for e, n, s, g, p in
            (("dense", 60, 0, 70.0, 0.37), ("ragged", 100, 4, 20.0, 0.62))]
    text = "\n".join(report.launch_section(rows))
    assert "| clip-vit-b16 | triton | 2 | 4 | ragged | 100 | 4 | +10.0 | +1.00 | 20.0 | 0.62 |" in text
    assert "| clip-vit-b16 | triton | 2 | 4 | dense | 60 | 0 | +0.0 | +0.00 | 70.0 | 0.37 |" in text
    assert "an estimate, not a lower bound and not a measurement" in text   # launch and sync costs are typical


def _op(impl, group, median, **info):
    return {"name": impl, "group": group, "stats": {"median": median},
            "extra_info": {"backend": impl, "device": "cpu", "bytes": 1_000_000, "flops": 4_000_000, **info}}


def _render(report, tmp_path, benchmarks, machine=None):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"machine_info": machine or {}, "benchmarks": benchmarks}))
    out = tmp_path / "B.md"
    assert report.main([str(path), "-o", str(out), "--plots", str(tmp_path / "plots")]) == 0
    return out.read_text()


def _cells(text, start):
    rows = [line for line in text.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, rows)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_statistics_rows_are_compared_with_the_baseline_that_computes_statistics(report, tmp_path):
    group = "varlen_attention vit-b16 batch 32"
    text = _render(report, tmp_path, [
        _op("padded-sdpa", group, 4e-3, stats=False, baseline=True),
        _op("eager-softmax", group, 9e-3, stats=True, baseline=True),
        _op("madtp-torch", group, 2e-3, stats=False, baseline=False),
        _op("madtp-torch", group, 3e-3, stats=True, baseline=False),
        _op("flex-attention", group, 8e-3, stats=False, baseline=False, compile_s=81.5, block_mask_s=8.25)])
    plain = _cells(text, "| madtp-torch | cpu | 2.000")
    assert plain[3] == f"{4 / 2:.2f}x" and plain[6] == "padded-sdpa"
    stats = _cells(text, "| madtp-torch+stats | cpu")
    assert stats[3] == f"{9 / 3:.2f}x" and stats[6] == "eager-softmax+stats"   # not 4/3 over plain SDPA
    assert _cells(text, "| eager-softmax+stats | cpu")[6] == "(baseline)"
    assert "flex-attention: compile and first call 81.50 s and block mask 8.25 s, paid once per shape outside the " \
           "timed region" in text


def test_a_statistics_row_without_its_baseline_gets_no_speedup(report, tmp_path):
    group = "varlen_attention x"
    text = _render(report, tmp_path, [_op("padded-sdpa", group, 4e-3, stats=False, baseline=True),
                                      _op("madtp-torch", group, 3e-3, stats=True, baseline=False)])
    stats = _cells(text, "| madtp-torch+stats | cpu")
    assert stats[3] == "-" and stats[6] == "-"


def test_provenance_sizes_and_threads_come_from_the_json(report, tmp_path):
    text = _render(report, tmp_path, [
        _op("padded-sdpa", "varlen_attention a batch 32", 4e-3, batch=32, heads=12, head_dim=64, lengths="20-197",
            baseline=True),
        _op("padded-sdpa", "varlen_attention b batch 8", 4e-3, batch=8, heads=16, head_dim=64, lengths="58-577",
            baseline=True),
        _op("dense", "sparse_linear s", 1e-3, tokens=64, in_features=768, out_features=3072, baseline=True,
            dtype="bfloat16")],
        machine={"cpu": {"brand_raw": "Test CPU", "count": 16}, "torch": {"threads": 3, "version": "9.9"}})
    how = text[text.index("## How these numbers"):text.index("### ")]
    assert "torch used 3 threads" in how and "16 logical CPUs" in how
    assert "  - varlen_attention a batch 32: batch 32, heads 12, head dim 64, lengths 20-197" in how
    assert "  - varlen_attention b batch 8: batch 8, heads 16, head dim 64, lengths 58-577" in how
    assert "  - sparse_linear s: tokens 64, in features 768, out features 3072" in how
    assert "cpu: bfloat16, float32" in how
    assert "batch 8 instead of 64" not in how and "fp32, GPU runs fp16" not in how   # the old hard-coded text


def test_model_control_and_decision_rows(report, tmp_path):
    group = "model tiny-vit, batch 2, float32"
    rows = [_model("dense", 1.0, 1.0, 1.0), _model("madtp-ragged@50%", 0.625, 0.5, 0.45, 0.5, 1.0)]
    control = _model("madtp-control", 1.1, 1.0, 1.0)
    control["extra_info"]["execution"] = "control"
    decision = {"name": "decision-only", "group": group, "stats": {"median": 0.004, "min": 0.003, "max": 0.005},
                "extra_info": {"backend": "decision-only", "device": "cpu", "bytes": 2_000_000, "flops": 0,
                               "kind": "decision", "batch": 2, "tokens": 197, "width": 768, "heads": 12,
                               "pruning_layers": 6}}
    text = _render(report, tmp_path, rows + [control, decision])
    measured = text[text.index("## Measured: models"):text.index("## Predicted")]
    assert _cells(measured, "| madtp-control (applied, pruning off) |")[5] == f"{1 / 1.1:.2f}x"
    cells = _cells(measured, "| decision only (score_and_prune, one layer) |")
    assert cells[3] == "4.000" and cells[5] == "-" and cells[6] == "-"
    assert "+10.0% over dense" in measured
    assert f"= {6 * 0.004 / 1.0:.1%} of the dense forward" in measured
    predicted = text[text.index("## Predicted"):]
    # a decision row records bytes only: its floor is the bytes over the bandwidth
    assert f"| decision only (score_and_prune, one layer) | float32 | 2.0 | 0.0 | {2e6 / 3.35e12 * 1e3:.3f} | " \
           "memory | lower bound |" in predicted


def _spread(execution, spread, median, cv, flops, **info):
    return {"name": f"{execution}-{spread}", "group": "ragged gain vs length spread: tiny, batch 8, float32",
            "stats": {"median": median}, "extra_info": {
                "backend": execution, "device": "cpu", "bytes": 1000, "flops": flops, "execution": execution,
                "spread": spread, "cv": cv, "cv_target": cv, "min_len": 10, "max_len": 90, **info}}


def test_spread_table_and_plot(report, tmp_path):
    runs = [_spread("padded", "cv 0.0", 1.0, 0.0, 100), _spread("ragged", "cv 0.0", 1.0, 0.0, 100, paired_gain=0.99),
            _spread("padded", "cv 0.5", 1.0, 0.5, 200), _spread("ragged", "cv 0.5", 0.5, 0.5, 100, paired_gain=1.9),
            _spread("padded", "trained", 1.0, 0.15, 150),
            _spread("ragged", "trained", 0.8, 0.15, 100, trained_cv=0.15, trained_layer_cvs=[0.1, 0.2],
                    trained_temperature=0.3, trained_gflops_fraction=0.5, trained_scenes=64)]
    text = _render(report, tmp_path, runs)
    section = text[text.index("## Measured: ragged over padded"):text.index("## Predicted")]
    assert _cells(section, "| cv 0.5 |")[4:] == ["1000.0", "500.0", "2.00x", "1.90x", "2.00x"]
    assert _cells(section, "| cv 0.0 |")[6:] == ["1.00x", "0.99x", "1.00x"]
    assert _cells(section, "| trained model |")[6] == f"{1 / 0.8:.2f}x"
    assert "keep-count CV per pruning layer 0.100, 0.200, mean 0.150" in section
    png = tmp_path / "plots" / "ragged-gain-vs-length-spread-tiny-batch-8-float32.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](plots/ragged-gain-vs-length-spread-tiny-batch-8-float32.png)" in section
