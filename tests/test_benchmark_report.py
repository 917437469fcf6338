"""benchmarks/report.py: measured tables with same-run speedups, predictions labelled and from the roofline."""
import importlib.util
import json
import pathlib
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
    assert dense.predicted_h100_s == pytest.approx(max(3e6 / 3.0e12, 8e9 / 800e12))
    assert sparse.predicted_h100_s == pytest.approx(max(1.5e6 / 3.0e12, 8e9 / 1600e12))  # 2:4 at 2x
