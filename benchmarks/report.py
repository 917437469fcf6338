"""Turn pytest-benchmark JSON into BENCHMARKS.md: measured tables and plots, and H100 predictions kept apart.

    pytest benchmarks/ --benchmark-only --benchmark-json=build/bench.json
    python benchmarks/report.py build/bench.json [-o BENCHMARKS.md] [--plots DIR | --no-plots] [--info INFO.json]

Each benchmark records the bytes and FLOPs its op must move and do (conftest.record). Measured rows show the
median time, the speedup over the group's baseline timed in the same run, and achieved GB/s and GFLOP/s. Model
groups (bench_models.py, named "model ...") get their own table: speedup over dense beside the GFLOPs fraction
that `madtp.count_flops` measured, the token-layers kept, how much of the ideal speedup (1 / GFLOPs fraction)
became time, and ragged over padded at the same budget; and a PNG of speedup against GFLOPs fraction.

The prediction for an H100 is never a measurement: for ops the roofline max(bytes / 3.35 TB/s, FLOPs / 989 TFLOP/s),
for models FLOPs / 989 TFLOP/s (the H100 SXM datasheet's peaks: HBM3 bandwidth, dense fp16/bf16 tensor cores; 2:4
sparse GEMMs at its 1979 TFLOP/s with sparsity). Peaks over the work an op must do make it a lower bound on time,
and only such rows are labelled so; the launch budget's GPU times add typical launch and sync costs and are
estimates. Op rows are compared with the baseline of their kind (`extra_info["baseline"]`; the statistics rows with
the baseline that computes statistics), and the run's sizes, shapes and threads are read from the JSON.
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

# NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: GPU memory bandwidth 3.35 TB/s; FP16 and BF16 Tensor Core
# 1,979 TFLOPS "with sparsity" (2:4), half that dense.
H100_SOURCE = ("NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: 3.35 TB/s GPU memory bandwidth, 989 TFLOP/s dense "
               "FP16/BF16 Tensor Core, 1979 TFLOP/s with 2:4 sparsity")
H100_BYTES_PER_S = 3.35e12
H100_DENSE_FLOPS = 989e12
H100_SPARSE_FLOPS = 1979e12
BASELINES = ("baseline", "dense", "padded-sdpa")   # rows of older JSON that record no "baseline" flag
SPREAD_PREFIX = "ragged gain vs length spread"
# extra_info keys that describe a run's sizes, in the order the provenance lists them
SIZE_KEYS = ("batch", "tokens", "layers", "width", "heads", "head_dim", "lengths", "in_features", "out_features",
             "mean_len", "pruning_layers")
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
    def is_baseline(self) -> bool:
        flag = self.info.get("baseline")
        return bool(flag) if flag is not None else self.impl in BASELINES

    @property
    def predicted_h100_s(self) -> float:
        # Both terms are floors: the weights (models) or operands (ops) must cross HBM once, the FLOPs must run.
        compute = self.flops / (H100_SPARSE_FLOPS if self.sparse else H100_DENSE_FLOPS)
        return max(self.bytes / H100_BYTES_PER_S, compute)

    @property
    def bound(self) -> str:
        return "memory" if self.bytes / H100_BYTES_PER_S >= self.predicted_h100_s else "compute"

    @property
    def prediction_kind(self) -> str:
        """"lower bound" where the prediction is the datasheet's peaks over recorded work, which is what the op
        must do (conftest.record); otherwise "estimate". A row that records neither bytes nor FLOPs predicts 0 s,
        which bounds nothing worth stating."""
        return "lower bound" if (self.bytes > 0 or self.flops > 0) else "estimate"


def baseline_for(row: Row, members: list[Row]) -> Row | None:
    """The row `row`'s speedup is over: a baseline of the group that computes what it computes (the statistics rows
    of attention: the baseline that also computes them); None if the group has none of its kind."""
    bases = [m for m in members if m.is_baseline]
    stats = bool(row.info.get("stats"))
    same = [m for m in bases if bool(m.info.get("stats")) == stats]
    return same[0] if same else None


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
    order = {"dense": 0, "control": 1, "decision": 2, "ragged": 3, "padded": 4}
    out = []
    for r in sorted(members, key=lambda r: (-r.info.get("gflops_fraction", 1.0), -r.info.get("budget", 1.0),
                                             order.get(_kind(r), 5), r.impl)):
        fraction = float(r.info.get("gflops_fraction", 1.0))
        execution = r.info.get("execution")
        if _kind(r) == "control":
            label = "madtp-control (applied, pruning off)"
        elif _kind(r) == "decision":
            label = "decision only (score_and_prune, one layer)"
        else:
            label = r.impl if execution is None else f"madtp-{execution} @ {fraction:.1%} GFLOPs"
        speedup = dense.median_s / r.median_s if dense and _kind(r) != "decision" else None
        pair = padded.get((r.info.get("budget"), r.info.get("gflops_fraction"))) if execution == "ragged" else None
        out.append(ModelResult(r, label, fraction, r.info.get("budget"), r.info.get("keep_fraction"), speedup,
                               speedup * fraction if speedup is not None else None,
                               pair.median_s / r.median_s if pair else None))
    return out


def _kind(r: Row) -> str:
    """dense, control (applied, pruning off), decision (the pruning op alone), or the execution of a pruned row."""
    return r.info.get("kind") or r.info.get("execution") or r.impl


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
        pruned = _kind(m.row) not in ("dense", "control", "decision")
        out.append(f"| {m.label} | {_target(m)} | {_pct(m.keep) if _kind(m.row) != 'decision' else '-'} | "
                   f"{_ms_model(m.row.median_s)} | {_ms_model(m.row.min_s)}–{_ms_model(m.row.max_s)} | "
                   f"{_x(m.speedup)} | {_pct(m.ideal_share, 0) if pruned else '-'} | {_x(m.ragged_over_padded)} |")
    out.append("")
    out += _overhead_notes(members)
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


def _overhead_notes(members: list[Row]) -> list[str]:
    """What the control and decision-only rows say, relative to dense, in words."""
    dense = next((r for r in members if _kind(r) == "dense"), None)
    out = []
    control = next((r for r in members if _kind(r) == "control"), None)
    if dense and control:
        out.append(f"Control (MADTP applied, temperature None, ragged): {_ms_model(control.median_s)} ms, "
                   f"{control.median_s / dense.median_s - 1:+.1%} over dense: what the executor costs when nothing "
                   "is pruned.")
    decision = next((r for r in members if _kind(r) == "decision"), None)
    if decision:
        i = decision.info
        layers = i.get("pruning_layers")
        shapes = ", ".join(f"{k.replace('_', ' ')} {i[k]}" for k in ("batch", "tokens", "width", "heads") if k in i)
        line = f"Decision only: score_and_prune alone at the first pruning layer's shapes ({shapes}): " \
               f"{_ms(decision.median_s)} ms"
        if dense and layers:
            line += (f"; x {layers} pruning layers (an upper estimate: later layers decide on fewer rows) = "
                     f"{layers * decision.median_s / dense.median_s:.1%} of the dense forward")
        out.append(line + ".")
    return out + ([""] if out else [])


# ------------------------------------------------------------------------------- ragged gain vs length spread

@dataclass(frozen=True)
class SpreadResult:
    spread: str
    cv: float                    # realised, over the batch
    cv_target: float
    lengths: str
    padded_s: float
    ragged_s: float
    gain: float                  # padded time / ragged time (medians)
    paired_gain: float | None    # the same over interleaved rounds
    ideal: float                 # padded FLOPs / ragged FLOPs: the gain if time followed FLOPs


def spread_results(members: list[Row]) -> list[SpreadResult]:
    by_spread: dict[str, dict[str, Row]] = defaultdict(dict)
    for r in members:
        by_spread[r.info.get("spread", "?")][r.info.get("execution", r.impl)] = r
    out = []
    for spread, pair in by_spread.items():
        if "ragged" not in pair or "padded" not in pair:
            continue
        ragged, padded = pair["ragged"], pair["padded"]
        out.append(SpreadResult(spread, float(ragged.info.get("cv", 0.0)), float(ragged.info.get("cv_target", 0.0)),
                                f"{ragged.info.get('min_len', '?')}–{ragged.info.get('max_len', '?')}",
                                padded.median_s, ragged.median_s, padded.median_s / ragged.median_s,
                                ragged.info.get("paired_gain"), padded.flops / ragged.flops if ragged.flops else 1.0))
    return sorted(out, key=lambda s: (s.cv, s.spread))


def spread_table(members: list[Row]) -> list[str]:
    results = spread_results(members)
    out = ["| spread | target CV | realised CV | lengths | padded ms | ragged ms | ragged over padded | paired | "
           "FLOPs ratio (ideal) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = "trained model" if r.spread == "trained" else r.spread
        out.append(f"| {name} | {r.cv_target:.3f} | {r.cv:.3f} | {r.lengths} | {_ms_model(r.padded_s)} | "
                   f"{_ms_model(r.ragged_s)} | {_x(r.gain)} | {_x(r.paired_gain)} | {_x(r.ideal)} |")
    out.append("")
    trained = next((m for m in members if "trained_cv" in m.info), None)
    if trained is not None:
        i = trained.info
        out.append("Trained model: the shipped shapes CLIP (python/madtp/assets/shapes_clip) on "
                   f"{i.get('trained_scenes')} "
                   f"held-out scenes at temperature {i.get('trained_temperature', float('nan')):.3g} "
                   f"({i.get('trained_gflops_fraction', float('nan')):.1%} GFLOPs): keep-count CV per pruning layer "
                   f"{', '.join(f'{c:.3f}' for c in i.get('trained_layer_cvs', []))}, mean "
                   f"{i['trained_cv']:.3f}.")
        out.append("")
    return out


def plot_spread(group: str, members: list[Row], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = spread_results(members)
    drawn = [r for r in results if r.spread != "trained"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([r.cv for r in drawn], [r.gain for r in drawn], "o-", label="ragged over padded (medians)")
    if any(r.paired_gain for r in drawn):
        ax.plot([r.cv for r in drawn if r.paired_gain], [r.paired_gain for r in drawn if r.paired_gain], "s--",
                label="ragged over padded (paired rounds)")
    ax.plot([r.cv for r in drawn], [r.ideal for r in drawn], "k:", lw=1, label="FLOPs ratio (ideal)")
    for r in results:
        if r.spread == "trained":
            ax.plot([r.cv], [r.gain], "*", ms=12, color="C3", label=f"trained model's spread (CV {r.cv:.2f})")
            if r.paired_gain:
                ax.plot([r.cv], [r.paired_gain], "*", ms=12, color="C3", mfc="none")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("coefficient of variation of the lengths in a batch (realised)")
    ax.set_ylabel("padded time / ragged time (same run)")
    ax.set_title(group, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


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
        if r is base or key not in r.info or _kind(r) in ("control", "decision"):
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
        if group.startswith(SPREAD_PREFIX):
            if spread_results(members):
                os.makedirs(plots_dir, exist_ok=True)
                written[group] = os.path.join(plots_dir, slug(group) + ".png")
                plot_spread(group, members, written[group])
            continue
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
    dtypes = defaultdict(set)
    for r in rows:
        dtypes[r.device].add(r.dtype)
    out.append("- Dtypes: " + "; ".join(f"{d}: {', '.join(sorted(ts))}" for d, ts in sorted(dtypes.items())))
    if any(d == "cpu" for d in devices):
        out.append("- The CPU run is scaled down from the GPU sizes (benchmarks/conftest.py; `MADTP_BENCH_BATCH` "
                   "overrides the op-level batch): the sizes below are the ones this run used, as its JSON records "
                   "them; the model groups' names say which layers of a tower ran.")
    out.append("- Sizes per group (from the JSON's extra_info):")
    out += [f"  - {group}: {text}" for group, text in group_sizes(rows)]
    return out + [""]


def group_sizes(rows: list[Row]) -> list[tuple[str, str]]:
    """(group, "batch 32, heads 12, ...") for every group: each size key's values over the group's rows, as
    recorded; "not recorded" where a group records none."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[r.group].append(r)
    out = []
    for group, members in sorted(groups.items()):
        parts = []
        for key in SIZE_KEYS:
            values = sorted({str(r.info[key]) for r in members if r.info.get(key) is not None},
                            key=lambda v: (len(v), v))
            if values:
                parts.append(f"{key.replace('_', ' ')} {'/'.join(values)}")
        out.append((group, ", ".join(parts) if parts else "sizes not recorded"))
    return out


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
    spreads = {g: m for g, m in groups.items() if g.startswith(SPREAD_PREFIX)}
    ops = {g: m for g, m in groups.items() if g not in models and g not in spreads}
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
    if spreads:
        out += ["## Measured: ragged over padded against the spread of lengths", "",
                "One layer stack at ViT-B/16 widths run packed (madtp_kernels.varlen_attention, Linear layers on the "
                "packed rows) and padded (every sample padded to the batch's longest, SDPA with a key mask) on "
                "lengths drawn at one mean and a given coefficient of variation (std / mean over the batch); the "
                "last point is the spread the shipped trained model's keep counts have on held-out scenes. Ragged "
                "over padded: padded time ÷ ragged time; paired: the same over rounds that alternate the two; "
                "FLOPs ratio: padded FLOPs ÷ ragged FLOPs, the gain if time followed FLOPs.", ""]
        for group, members in sorted(spreads.items()):
            out += [f"### {group}", ""] + spread_table(members)
            figure(group)
    out += ["## Measured: ops", ""] if (models or spreads) and ops else []
    for group, members in sorted(ops.items()):
        paired = any("paired_speedup" in r.info for r in members)
        out += [f"### {group}", "", "| implementation | device | median ms | speedup | GB/s | GFLOP/s | over |"
                + (" paired speedup |" if paired else ""), "|---|---|---|---|---|---|---|" + ("---|" if paired else "")]
        for r in members:
            base = baseline_for(r, members)
            speedup = f"{base.median_s / r.median_s:.2f}x" if base else "-"
            gflops = f"{r.flops / r.median_s / 1e9:.1f}" if r.flops else "-"
            over = "-" if base is None else ("(baseline)" if base is r else base.impl)
            out.append(f"| {r.impl} | {r.device} | {_ms(r.median_s)} | {speedup} | "
                       f"{r.bytes / r.median_s / 1e9:.2f} | {gflops} | {over} |"
                       + (f" {_x(r.info.get('paired_speedup'))} |" if paired else ""))
        out.append("")
        out += _apart_notes(members)
        figure(group)
    if ops and not any(g in plots for g in ops):
        out += ["No op-level group records a keep ratio that varies within it, so the op tables have no plots.",
                ""]

    if launches:
        out += launch_section(launches)
    kinds = sorted({r.prediction_kind for r in rows})
    out += [f"## Predicted H100 time ({' / '.join(kinds)}, not measured)", "",
            f"Ceilings: {H100_SOURCE}. Computed from the bytes and FLOPs each row records for the sizes of the "
            "measured run (what the op or model must move and do), not timed: max(bytes / "
            f"{H100_BYTES_PER_S / 1e12:.2f} TB/s, FLOPs / {H100_DENSE_FLOPS / 1e12:.0f} TFLOP/s; 2:4 sparse GEMMs "
            f"at {H100_SPARSE_FLOPS / 1e12:.0f} TFLOP/s). Peaks over required work: a lower bound on what any "
            "implementation could take there on an H100, not what ours takes. The rates are those of fp16/bf16 "
            "tensor cores, above every fp32 rate, so a row stays a lower bound in the run dtype, which is listed: "
            "a CPU run is fp32, its bytes twice an fp16 run's.", ""]
    if models or spreads:
        out += ["### Models and layer stacks", "",
                "| group | implementation | run dtype | MB moved | GFLOP | predicted ms | bound | kind |",
                "|---|---|---|---|---|---|---|---|"]
        for group, members in sorted(models.items()):
            for m in model_results(members):
                out.append(f"| {group} | {m.label} | {m.row.dtype} | {m.row.bytes / 1e6:.1f} | "
                           f"{m.row.flops / 1e9:.1f} | {m.row.predicted_h100_s * 1e3:.3f} | {m.row.bound} | "
                           f"{m.row.prediction_kind} |")
        for group, members in sorted(spreads.items()):
            for r in sorted(members, key=lambda r: (r.info.get("cv", 0), r.impl)):
                out.append(f"| {group} | {r.impl} @ {r.info.get('spread', '?')} | {r.dtype} | {r.bytes / 1e6:.1f} | "
                           f"{r.flops / 1e9:.1f} | {r.predicted_h100_s * 1e3:.3f} | {r.bound} | "
                           f"{r.prediction_kind} |")
        out.append("")
    if ops:
        out += ["### Ops", "",
                "| group | implementation | run dtype | MB moved | GFLOP | predicted µs | bound | kind |",
                "|---|---|---|---|---|---|---|---|"]
        for group, members in sorted(ops.items()):
            for r in members:
                out.append(f"| {group} | {r.impl} | {r.dtype} | {r.bytes / 1e6:.1f} | {r.flops / 1e9:.2f} | "
                           f"{r.predicted_h100_s * 1e6:.1f} | {r.bound} | {r.prediction_kind} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _apart_notes(members: list[Row]) -> list[str]:
    """Costs a row paid outside its timed region (a compile, a block mask), stated beside its table."""
    out = []
    for r in members:
        parts = [f"{what} {r.info[key]:.2f} s" for key, what in (("compile_s", "compile and first call"),
                                                                 ("block_mask_s", "block mask"))
                 if isinstance(r.info.get(key), (int, float))]
        if parts:
            out.append(f"{r.impl}: {' and '.join(parts)}, paid once per shape outside the timed region (a warm "
                       "inductor cache from an earlier run shortens the compile).")
    return out + ([""] if out else [])


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
           "Predicted GPU ms (an estimate, not a lower bound and not a measurement; no GPU has run this): FLOPs / "
           f"{H100_DENSE_FLOPS / 1e12:.0f} TFLOP/s (H100 SXM dense fp16, datasheet) + launches x 5 us + syncs x 15 us "
           "(typical costs, not floors).", "",
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
