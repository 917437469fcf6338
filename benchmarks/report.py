"""Turn pytest-benchmark JSON into BENCHMARKS.md: measured tables and plots, and H100 predictions kept apart.

    pytest benchmarks/ --benchmark-only --benchmark-json=build/bench.json
    python benchmarks/report.py build/bench.json [-o BENCHMARKS.md] [--plots DIR | --no-plots] [--info INFO.json]

Each benchmark records the bytes and FLOPs its op must move and do (conftest.record). Measured rows show the
median time, the speedup over the group's baseline timed in the same run, and achieved GB/s and GFLOP/s. Model
groups (bench_models.py, named "model ...") get their own table: speedup over dense beside the GFLOPs fraction
that `madtp.count_flops` measured, the token-layers kept, how much of the ideal speedup (1 / GFLOPs fraction)
became time, and ragged over padded at the same budget; and a PNG of speedup against GFLOPs fraction.

The prediction for an H100 is a lower bound on time, never a measurement: for ops the roofline
max(bytes / 3.0 TB/s, FLOPs / 800 TFLOP/s), for models FLOPs / 800 TFLOP/s (dense fp16/bf16 tensor cores;
2:4 sparse GEMMs at up to 2x).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

H100_BYTES_PER_S = 3.0e12        # device copy bandwidth measured on an H100
H100_DENSE_FLOPS = 800e12        # dense bf16/fp16 GEMM
BASELINES = ("baseline", "dense", "padded-sdpa")
MODEL_PREFIX = "model "
NOT_REACHED = 0.05               # a measured GFLOPs fraction this far from its target did not reach it


@dataclass(frozen=True)
class Row:
    group: str
    impl: str
    device: str
    median_s: float
    bytes: int
    flops: int
    info: dict = field(default_factory=dict, compare=False, repr=False)   # the rest of extra_info
    min_s: float = float("nan")
    max_s: float = float("nan")
    rounds: int = 0
    source: str = ""             # the benchmark file, from pytest's node id

    @property
    def is_model(self) -> bool:
        return self.group.startswith(MODEL_PREFIX)

    @property
    def dtype(self) -> str:
        """Recorded, else named in the group, else the suites' rule: fp16 on a GPU, fp32 on CPU."""
        if "dtype" in self.info:
            return str(self.info["dtype"]).removeprefix("torch.")
        named = re.search(r"\b(float16|bfloat16|float32|float64)\b", self.group)
        if named:
            return named.group(1)
        return "float16" if self.device.startswith("cuda") else "float32"

    @property
    def sparse(self) -> bool:
        return bool(self.info.get("sparse")) or ("sparse_linear" in self.group and self.impl.startswith("madtp"))

    @property
    def predicted_h100_s(self) -> float:
        compute = self.flops / (H100_DENSE_FLOPS * (2 if self.sparse else 1))
        return compute if self.is_model else max(self.bytes / H100_BYTES_PER_S, compute)


def load_json(path: str) -> tuple[dict, list[Row]]:
    """(everything but the benchmarks: machine_info, commit_info, datetime, version; the rows)."""
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = dict(b["extra_info"])
        impl = info["backend"] + ("+stats" if info.get("stats") else "")
        stats = b["stats"]
        rows.append(Row(b["group"] or b["name"], impl, info.pop("device"), stats["median"], info.pop("bytes"),
                        info.pop("flops", 0), info, stats.get("min", float("nan")), stats.get("max", float("nan")),
                        stats.get("rounds", 0), b.get("fullname", "").split("::")[0]))
    return {k: v for k, v in data.items() if k != "benchmarks"}, rows


def load(path: str) -> tuple[dict, list[Row]]:
    meta, rows = load_json(path)
    return meta.get("machine_info", {}), rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _ms_model(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds >= 0.1 else _ms(seconds)


def slug(group: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", group.lower()).strip("-")


# ------------------------------------------------------------------------------------------------ model groups

@dataclass(frozen=True)
class ModelResult:
    """One row of a model table, with every figure derived from the measured rows of the same run."""
    row: Row
    label: str
    fraction: float              # GFLOPs of dense, as measured
    target: float | None
    keep: float | None
    speedup: float | None        # over dense
    ideal_share: float | None    # speedup / (1 / fraction)
    ragged_over_padded: float | None


def model_results(members: list[Row]) -> list[ModelResult]:
    dense = next((r for r in members if r.impl == "dense"), None)
    padded = {(r.info.get("budget"), r.info.get("gflops_fraction")): r for r in members
              if r.info.get("execution") == "padded"}
    order = {"dense": 0, "ragged": 1, "padded": 2}
    out = []
    for r in sorted(members, key=lambda r: (-r.info.get("gflops_fraction", 1.0), -r.info.get("budget", 1.0),
                                             order.get(r.info.get("execution", r.impl), 3), r.impl)):
        fraction = float(r.info.get("gflops_fraction", 1.0))
        execution = r.info.get("execution")
        label = r.impl if execution is None else f"madtp-{execution} @ {fraction:.1%} GFLOPs"
        speedup = dense.median_s / r.median_s if dense else None
        pair = padded.get((r.info.get("budget"), r.info.get("gflops_fraction"))) if execution == "ragged" else None
        out.append(ModelResult(r, label, fraction, r.info.get("budget"), r.info.get("keep_fraction"), speedup,
                               speedup * fraction if speedup is not None else None,
                               pair.median_s / r.median_s if pair else None))
    return out


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}%}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _target(m: ModelResult) -> str:
    if m.target is None:
        return "-"
    missed = abs(m.fraction - m.target) > NOT_REACHED
    return f"{m.target:.0%}" + (" (not reached)" if missed else "")


def model_table(members: list[Row]) -> list[str]:
    results = model_results(members)
    rounds = sorted({r.rounds for r in members if r.rounds})
    out = ["| implementation | target GFLOPs | token-layers kept | median ms | min–max ms | speedup over dense | "
           "share of ideal speedup | ragged over padded |", "|---|---|---|---|---|---|---|---|"]
    for m in results:
        out.append(f"| {m.label} | {_target(m)} | {_pct(m.keep)} | {_ms_model(m.row.median_s)} | "
                   f"{_ms_model(m.row.min_s)}–{_ms_model(m.row.max_s)} | {_x(m.speedup)} | "
                   f"{_pct(m.ideal_share, 0) if m.row.impl != 'dense' else '-'} | {_x(m.ragged_over_padded)} |")
    out.append("")
    if rounds:
        out.append(f"Median of {'/'.join(map(str, rounds))} rounds per row.")
    # Two targets that ended at the same temperature are one configuration timed twice: say so, since the
    # difference between such rows is the run's noise, not an effect of the budget.
    same: dict[tuple, list[ModelResult]] = defaultdict(list)
    for m in results:
        if m.target is not None:
            same[(m.fraction, m.row.info.get("temperature"))].append(m)
    for (fraction, _), ms in sorted(same.items(), key=lambda kv: -kv[0][0]):
        targets = sorted({m.target for m in ms}, reverse=True)
        if len(targets) > 1:
            times = "; ".join(f"madtp-{execution}: " + " vs ".join(_ms_model(m.row.median_s) for m in ms
                                                                    if m.row.info.get("execution") == execution)
                              for execution in sorted({m.row.info.get("execution") for m in ms}, reverse=True))
            out.append(f"The {' and '.join(f'{t:.0%}' for t in targets)} targets both ended at {fraction:.1%} "
                       f"GFLOPs (same temperature), so their rows are one configuration timed twice ({times} ms): "
                       "the difference is run-to-run variation.")
    return out + [""]


# ------------------------------------------------------------------------------------------------------- plots

def plottable(members: list[Row]) -> str | None:
    """The extra_info key to plot speedup against, if the group varies one and has a baseline; else None."""
    if not any(r.impl in BASELINES for r in members):
        return None
    for key in ("gflops_fraction", "keep_fraction"):
        if len({r.info[key] for r in members if key in r.info}) >= 2:
            return key
    return None


def plot_group(group: str, members: list[Row], key: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in members if r.impl in BASELINES)
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in members:
        if r is base or key not in r.info:
            continue
        name = r.info.get("execution") or r.impl
        series[name].append((float(r.info[key]), base.median_s / r.median_s))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    lowest = min(x for pts in series.values() for x, _ in pts)
    if key == "gflops_fraction":
        xs = [lowest + (1 - lowest) * i / 50 for i in range(51)]
        ax.plot(xs, [1 / x for x in xs], "k--", lw=1, label="ideal: 1 / GFLOPs fraction")
    for name, pts in sorted(series.items(), key=lambda kv: kv[0] != "ragged"):
        # one configuration timed twice (two targets ending at one temperature): every timing as a dot, the line
        # through their mean
        at: dict[float, list[float]] = defaultdict(list)
        for x, y in pts + [(1.0, 1.0)]:
            at[x].append(y)
        xs = sorted(at)
        line, = ax.plot(xs, [sum(at[x]) / len(at[x]) for x in xs], "-", label=name)
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o", color=line.get_color())
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("GFLOPs fraction of dense (measured)" if key == "gflops_fraction" else "keep fraction")
    ax.set_ylabel(f"speedup over {base.impl} (same run)")
    ax.set_title(group, fontsize=9)
    ax.invert_xaxis()            # read left to right as more pruning
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def write_plots(groups: dict[str, list[Row]], plots_dir: str) -> dict[str, str]:
    """Plot every group that has the data for it; returns group -> PNG path."""
    written = {}
    for group, members in sorted(groups.items()):
        key = plottable(members)
        if key:
            os.makedirs(plots_dir, exist_ok=True)
            path = os.path.join(plots_dir, slug(group) + ".png")
            plot_group(group, members, key, path)
            written[group] = path
    return written


# -------------------------------------------------------------------------------------------------- the report

def provenance(meta: dict, rows: list[Row], bench_command: str | None, report_command: str | None,
               install: dict | None) -> list[str]:
    machine = meta.get("machine_info", {})
    cpu = machine.get("cpu", {})
    torch_info = machine.get("torch", {})   # filled by a pytest_benchmark_update_machine_info hook, if any
    devices = sorted({r.device for r in rows})
    if bench_command is None:
        sources = sorted({r.source for r in rows if r.source})
        where = " ".join(sources) if sources and len(sources) < 4 else "benchmarks/"
        bench_command = f"pytest {where} --benchmark-only --benchmark-json=<file>"
    threads = torch_info.get("threads")
    cpu_line = (f"{cpu.get('brand_raw', 'unknown CPU')}, {cpu.get('count', '?')} logical CPUs"
                + (f" at {cpu['hz_advertised_friendly']}" if cpu.get("hz_advertised_friendly") else "")
                + (f"; torch used {threads} threads" if threads else
                   "; torch threads not recorded in the JSON (torch's default: one per physical core)"))
    gpus = [g for g in (install or {}).get("gpus", [])] or ([torch_info["gpu"]] if torch_info.get("gpu") else [])
    out = ["## How these numbers were obtained", "",
           f"- Benchmarks: `{bench_command}`",
           f"- Report: `{report_command or 'python benchmarks/report.py <file>'}`",
           f"- Device: {', '.join(devices)}" + (f"; GPU: {', '.join(map(_gpu, gpus))}" if gpus else ""),
           f"- CPU: {cpu_line}",
           f"- Software: Python {machine.get('python_version', '?')}"
           + (f", torch {torch_info['version']}" if torch_info.get("version") else "")
           + (f", pytest-benchmark {meta['version']}" if meta.get("version") else "")]
    if install:
        out.append(f"- Install (`python -P -m madtp_kernels.tools.info --json`): madtp_kernels "
                   f"{install.get('madtp_kernels')}, torch {install.get('torch')} (CUDA {install.get('torch_cuda')}), "
                   f"triton {install.get('triton')}, `_C` built: {install.get('cuda_extension_built')}, "
                   f"cuSPARSELt {install.get('cusparselt')}")
    when = meta.get("datetime")
    commit = meta.get("commit_info") or {}
    if when or commit.get("id"):
        stamp = datetime.fromisoformat(when).strftime("%Y-%m-%d %H:%M UTC") if when else "?"
        dirty = " with uncommitted changes" if commit.get("dirty") else ""
        out.append(f"- Run: {stamp}, commit {str(commit.get('id', '?'))[:10]}{dirty}")
    out.append("- Timing: median of the pytest-benchmark rounds; every speedup is over a baseline timed in the "
               "same run.")
    if any(d == "cpu" for d in devices):
        out.append("- Sizes: the CPU run is scaled down (benchmarks/conftest.py) so the suite fits in minutes on "
                   "2 cores: op-level batch 8 instead of 64 (`MADTP_BENCH_BATCH` overrides), model batches and "
                   "layer counts as named in each model group (ViT-L/14-336: 6 of its 24 layers); token counts, "
                   "widths and heads are the real models'. CPU runs are fp32, GPU runs fp16.")
    return out + [""]


def _gpu(g) -> str:
    if isinstance(g, dict):
        return f"{g.get('name')} (sm_{str(g.get('capability', '')).replace('.', '')}, {g.get('memory_gib')} GiB)"
    return str(g)


def render(machine: dict, rows: list[Row], *, meta: dict | None = None, plots: dict[str, str] | None = None,
           output_dir: str = ".", bench_command: str | None = None, report_command: str | None = None,
           install: dict | None = None, launches: list[dict] | None = None) -> str:
    meta = dict(meta or {}, machine_info=machine)
    plots = plots or {}
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[r.group].append(r)
    models = {g: m for g, m in groups.items() if g.startswith(MODEL_PREFIX)}
    ops = {g: m for g, m in groups.items() if g not in models}
    devices = sorted({r.device for r in rows})
    cpu = machine.get("cpu", {}).get("brand_raw", "unknown CPU")
    out = ["# Benchmarks", "",
           f"Measured on {', '.join(devices)} ({cpu}); median of the "
           "pytest-benchmark rounds. Speedup is over the group's baseline timed in the same run. "
           "Generated by `python benchmarks/report.py`. Predictions for an H100 are in their own section at the "
           "end and are not measurements.", ""]
    out += provenance(meta, rows, bench_command, report_command, install)

    def figure(group):
        if group in plots:
            rel = os.path.relpath(plots[group], output_dir).replace(os.sep, "/")
            out.extend([f"![speedup over the baseline against the fraction kept: {group}]({rel})", ""])

    if models:
        out += ["## Measured: models", "",
                "Dense is the Hugging Face model as it is; madtp-ragged runs the pruned token sets packed "
                "(varlen kernels), madtp-padded pads each layer to the batch's longest sample and masks (what the "
                "published code runs). Budgets are labelled by the GFLOPs fraction `madtp.count_flops` measured "
                "on the benchmark batch, which may differ from the target. Token-layers kept: tokens processed "
                "summed over layers, relative to dense. Share of ideal speedup: speedup ÷ (1 / GFLOPs fraction); "
                "100% means time fell as much as GFLOPs did. Ragged over padded: padded time ÷ ragged time at "
                "the same budget.", ""]
        for group, members in sorted(models.items()):
            out += [f"### {group}", ""] + model_table(members)
            figure(group)
    out += ["## Measured: ops", ""] if models and ops else []
    for group, members in sorted(ops.items()):
        base = next((r for r in members if r.impl in BASELINES), None)
        out += [f"### {group}", "", "| implementation | device | median ms | speedup | GB/s | GFLOP/s |",
                "|---|---|---|---|---|---|"]
        for r in members:
            speedup = f"{base.median_s / r.median_s:.2f}x" if base else "-"
            gflops = f"{r.flops / r.median_s / 1e9:.1f}" if r.flops else "-"
            out.append(f"| {r.impl} | {r.device} | {_ms(r.median_s)} | {speedup} | "
                       f"{r.bytes / r.median_s / 1e9:.2f} | {gflops} |")
        out.append("")
        figure(group)
    if ops and not any(g in plots for g in ops):
        out += ["No op-level group records a keep ratio that varies within it, so the op tables have no plots.",
                ""]

    if launches:
        out += launch_section(launches)
    out += ["## Predicted H100 time (lower bound, not measured)", "",
            "Computed from the bytes and FLOPs recorded for the sizes of the measured run, not timed: the best "
            "any implementation could do there on an H100, not what ours does. The rates are those of fp16/bf16 "
            "tensor cores; the run dtype is listed because a CPU run is fp32 (its bytes are twice a GPU run's, "
            "which uses fp16).", ""]
    if models:
        out += ["### Models: FLOPs / 800 TFLOP/s", "",
                "| group | implementation | run dtype | GFLOP | predicted ms |", "|---|---|---|---|---|"]
        for group, members in sorted(models.items()):
            for m in model_results(members):
                out.append(f"| {group} | {m.label} | {m.row.dtype} | {m.row.flops / 1e9:.1f} | "
                           f"{m.row.predicted_h100_s * 1e3:.3f} |")
        out.append("")
    if ops:
        out += [f"### Ops: max(bytes / {H100_BYTES_PER_S / 1e12:.1f} TB/s, FLOPs / "
                f"{H100_DENSE_FLOPS / 1e12:.0f} TFLOP/s; 2:4 sparse GEMMs at up to 2x)", "",
                "| group | implementation | run dtype | MB moved | GFLOP | predicted µs | bound |",
                "|---|---|---|---|---|---|---|"]
        for group, members in sorted(ops.items()):
            for r in members:
                bound = "memory" if r.bytes / H100_BYTES_PER_S >= r.predicted_h100_s else "compute"
                out.append(f"| {group} | {r.impl} | {r.dtype} | {r.bytes / 1e6:.1f} | {r.flops / 1e9:.2f} | "
                           f"{r.predicted_h100_s * 1e6:.1f} | {bound} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def launch_section(records: list[dict]) -> list[str]:
    """The launch and sync budget (benchmarks/launch_budget.py): counted exactly on CPU, with a GPU time that is
    a prediction from those counts."""
    out = ["## Counted: kernel launches and host syncs per forward", "",
           "Counted, not timed, by `python benchmarks/launch_budget.py` (`madtp_kernels.tools.launches`): every aten "
           "op that does work, every Triton launch (under TRITON_INTERPRET on CPU) and everything inside "
           "madtp_kernels' custom ops; host syncs are `.item()`/`bool()`/`.tolist()` and value-dependent sizes "
           "(`nonzero`). Per layer: (this row - dense) / pruning layers (every layer prunes). Random weights; the "
           "Triton configs are cut down (the interpreter is slow): per-layer counts do not depend on batch or image "
           "size, except the torch backend's attention, which loops over the batch's sequences.", "",
           "Predicted GPU ms (a prediction, not a measurement; no GPU has run this): FLOPs / 989 TFLOP/s (H100 SXM "
           "dense fp16) + launches x 5 us + syncs x 15 us.", "",
           "| model | backend | batch | layers | execution | launches | syncs | per layer: +launches | +syncs "
           "| GFLOPs | predicted GPU ms |", "|" + "---|" * 11]
    dense = {}
    for r in records:
        key = (r["model"], r["backend"])
        if r["execution"] == "dense":
            dense[key] = r
        d = dense.get(key, r)
        out.append(f"| {r['model']} | {r['backend']} | {r['batch']} | {r['layers']} | {r['execution']} | "
                   f"{r['launches']} | {r['syncs']} | {(r['launches'] - d['launches']) / r['layers']:+.1f} | "
                   f"{(r['syncs'] - d['syncs']) / r['layers']:+.2f} | {r['gflops']:.1f} | {r['predicted_ms']:.2f} |")
    return out + [""]


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def default_plots_dir(output: str) -> str:
    """benchmarks/plots beside a BENCHMARKS.md at the repository root, else plots/ beside the output."""
    here = os.path.dirname(os.path.abspath(output))
    if os.path.isfile(os.path.join(here, "benchmarks", "report.py")):
        return os.path.join(here, "benchmarks", "plots")
    return os.path.join(here, "plots")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a pytest-benchmark --benchmark-json file")
    parser.add_argument("-o", "--output", default="BENCHMARKS.md")
    plots = parser.add_mutually_exclusive_group()
    plots.add_argument("--plots", metavar="DIR", help="where the PNGs go (default: benchmarks/plots beside a "
                       "BENCHMARKS.md at the repository root, else plots/ beside the output)")
    plots.add_argument("--no-plots", action="store_true", help="write no PNGs")
    parser.add_argument("--info", metavar="FILE", help="output of `python -P -m madtp_kernels.tools.info --json` "
                        "for the install that ran the benchmarks")
    parser.add_argument("--bench-command", help="the command that produced the JSON (default: inferred from it)")
    parser.add_argument("--launches", metavar="FILE", help="the JSON of benchmarks/launch_budget.py --json")
    args = parser.parse_args(argv)
    meta, rows = load_json(args.json)
    if not rows:
        parser.error(f"{args.json} holds no benchmarks")
    install = None
    if args.info:
        with open(args.info) as f:
            install = json.load(f)
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[r.group].append(r)
    written = {} if args.no_plots else write_plots(groups, args.plots or default_plots_dir(args.output))
    report_command = "python benchmarks/report.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = render(meta.get("machine_info", {}), rows, meta=meta, plots=written,
                  output_dir=os.path.dirname(os.path.abspath(args.output)), bench_command=args.bench_command,
                  report_command=report_command, install=install,
                  launches=_read_json(args.launches) if args.launches else None)
    with open(args.output, "w") as f:
        f.write(text)
    print(f"wrote {args.output}: {len(rows)} results in {len(groups)} groups, {len(written)} plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
