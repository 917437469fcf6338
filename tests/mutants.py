"""Mutation check: the fast kernel tests must kill every mutant in MUTANTS.

Each mutant is one exact text edit to a kernel source (Triton kernels, the torch reference), applied to a copy of
the `madtp_kernels` package in a temporary directory; the checkout is never touched. The tests that guard the edit
then run against the copy (PYTHONPATH puts it ahead of any installed or editable package; `-P` keeps the current
directory off sys.path; the session header is read to prove the copy was imported), with -x: a mutant is killed when
they fail. Exit status 1 if any mutant survives, if an edit no longer applies (its old text is not found exactly
once), if the copy was not the package imported, or if the unmutated copy fails its tests (the baseline run).

    python tests/mutants.py                 # every mutant, 2 at a time
    python tests/mutants.py -k tokens -j 1  # the mutants whose name contains "tokens"

It lives under tests/ rather than madtp_kernels/tools/ because it needs the repository's test suite, which an
installed package does not carry.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "madtp_kernels"
TESTS = "tests/madtp_kernels"

# Hypothesis, for mutant runs only: no example database (a mutant's failures must not be replayed into normal
# runs), no shrinking (a killed mutant needs one failure, not the smallest), derandomised (repeatable runs).
_PLUGIN = '''
from hypothesis import Phase, settings

settings.register_profile("madtp_mutants", database=None, derandomize=True, phases=(Phase.explicit, Phase.generate))
settings.load_profile("madtp_mutants")


def pytest_collection_finish(session):
    # After the conftest and the test modules ran their imports: which package did they get?
    import os

    import madtp_kernels

    with open(os.environ["MADTP_MUTANT_IMPORTED"], "w") as f:
        f.write(madtp_kernels.__file__)
'''


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str              # relative to madtp_kernels/
    old: str               # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files and a -k expression


def _k(file: str, expr: str) -> tuple[str, ...]:
    return (f"{TESTS}/{file}", "-k", expr)


TRITON_TOKENS = _k("test_tokens.py", "triton and (across_tiles or score_dtypes)")
TORCH_TOKENS = _k("test_tokens.py", "torch and (across_tiles or score_dtypes)")
TRITON_ATTENTION = _k("test_attention.py", "triton and (causal_cross_edges or repeated_kv)")
# 150 sequences (past the tile scan's 64-sequence chunk) and a 75-token one (several query and key tiles).
TRITON_MANY = (f"{TESTS}/test_attention.py::test_many_sequences[False-triton-cpu]",)
# Six of the sweep's cases: fp32 and fp16, causal or not, with and without gathers, padded and unpadded head dims.
TRITON_BACKWARD = _k("test_attention.py", "triton and backward_matches_oracle and (D24 or D40 or D80)")
TRITON_SPLIT = _k("test_sparse.py", "triton and split_k")

MUTANTS = [
    # ---- Triton token compaction (triton/tokens.py)
    Mutant("tokens: running count lost across token tiles", "triton/tokens.py",
           "pos = n_kept + tl.cumsum(keep_i, axis=0) - keep_i", "pos = tl.cumsum(keep_i, axis=0) - keep_i",
           TRITON_TOKENS),
    Mutant("tokens: merged row counted when nothing was dropped", "triton/tokens.py",
           "rows += (n_kept < length).to(tl.int32)", "rows += (n_kept <= length).to(tl.int32)", TRITON_TOKENS),
    Mutant("tokens: keep_first off by one in the compaction", "triton/tokens.py",
           "            keep = valid & ((t < keep_first) | (s > thr))\n        keep_i",
           "            keep = valid & ((t <= keep_first) | (s > thr))\n        keep_i", TRITON_TOKENS),
    Mutant("tokens: count pass reads one token past its sample", "triton/tokens.py",
           "        valid = t < length\n        s = tl.load(scores_ptr",
           "        valid = t <= length\n        s = tl.load(scores_ptr", TRITON_TOKENS),
    Mutant("tokens: merge ignores the score weights", "triton/tokens.py",
           "weighted += tl.sum(xd * w[:, None], axis=0)", "weighted += tl.sum(xd, axis=0)", TRITON_TOKENS),
    Mutant("tokens: unpack reads one row past each sample", "triton/tokens.py",
           "in_seq = t < length", "in_seq = t <= length", _k("test_tokens.py", "triton and pack_unpack_across")),
    Mutant("tokens: unpack drops its column tile offset", "triton/tokens.py",
           "cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)", "cols = tl.arange(0, BLOCK_C)",
           _k("test_tokens.py", "triton and pack_unpack_across")),
    # ---- Triton attention (triton/attention.py)
    Mutant("attention: forward ignores scale", "triton/attention.py",
           "    qk_scale = scale * _LOG2E\n    flags", "    qk_scale = D ** -0.5 * _LOG2E\n    flags",
           TRITON_ATTENTION),
    Mutant("attention: dq doubled without causal", "triton/attention.py",
           "    dq *= scale\n", "    dq *= scale * (1.0 if CAUSAL else 2.0)\n", TRITON_BACKWARD),
    Mutant("attention: dq doubled for fp16", "triton/attention.py",
           "    dq *= scale\n", "    dq *= scale * (2.0 if q_ptr.dtype.element_ty == tl.float16 else 1.0)\n",
           TRITON_BACKWARD),
    Mutant("attention: causal diagonal off by one in the forward", "triton/attention.py",
           "            allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + diag)\n            s = tl.where",
           "            allowed = allowed & (offs_n[None, :] < offs_m[:, None] + diag)\n            s = tl.where",
           TRITON_ATTENTION),
    Mutant("attention: the ragged key tail taken as an unmasked block", "triton/attention.py",
           "        n_full = k_len // BLOCK_N * BLOCK_N", "        n_full = (k_len + BLOCK_N - 1) // BLOCK_N * BLOCK_N",
           TRITON_ATTENTION),
    Mutant("attention: dk/dv drop the causal mask", "triton/attention.py",
           "            p = tl.where(offs_n[None, :] <= offs_m[:, None] + diag, p, 0.0)\n        dv +=",
           "            p = p\n        dv +=", TRITON_BACKWARD),
    Mutant("attention: received loses its running sum over query tiles", "triton/attention.py",
           "        received += tl.sum(p, axis=0)", "        received = tl.sum(p, axis=0)", TRITON_MANY),
    Mutant("attention: online softmax drops the rescale", "triton/attention.py",
           "acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v", "acc = acc + tl.dot(p.to(v.dtype), v", TRITON_MANY),
    Mutant("attention: lse left in base 2", "triton/attention.py",
           "tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)",
           "tl.math.log2(tl.where(empty, 1.0, l_i))))",
           TRITON_ATTENTION),
    Mutant("attention: partial tiles dropped from the tile scan", "triton/attention.py",
           "        nblk = (lens + (BLOCK - 1)) // BLOCK", "        nblk = lens // BLOCK", TRITON_ATTENTION),
    Mutant("attention: tile scan loses its running base across sequence chunks", "triton/attention.py",
           "        base += tl.sum(nblk, 0)", "        base += 0", TRITON_MANY),
    Mutant("attention: dk/dv stored at logical rows, not through the index", "triton/attention.py",
           "rows = _physical_rows(kv_index_ptr, (k_start + offs_n).to(tl.int64), n_ok, HAS_KV_INDEX)",
           "rows = _physical_rows(kv_index_ptr, (k_start + offs_n).to(tl.int64), n_ok, False)", TRITON_BACKWARD),
    Mutant("attention: backward work list transposed", "triton/attention.py",
           "return torch.stack([seq, (tile - first_tile) * block])",
           "return torch.stack([(tile - first_tile) * block, seq])", TRITON_BACKWARD),
    Mutant("attention: cls taken from the second query", "triton/attention.py",
           "tl.where(offs_m[:, None] == 0, p, 0.0)", "tl.where(offs_m[:, None] == 1, p, 0.0)", TRITON_ATTENTION),
    # ---- Triton 2:4 sparse GEMM (triton/sparse.py)
    Mutant("sparse: split-K reduce drops a split", "triton/sparse.py",
           "    for s in range(splits):", "    for s in range(splits - 1):", TRITON_SPLIT),
    Mutant("sparse: every split stores into partial 0", "triton/sparse.py",
           "        out_offsets += pid_k.to(tl.int64) * M * N\n", "        out_offsets += 0\n", TRITON_SPLIT),
    Mutant("sparse: reduce reads bias by row instead of column", "triton/sparse.py",
           "bias_ptr + offsets % N", "bias_ptr + offsets % M", TRITON_SPLIT),
    Mutant("sparse: each split skips its last K step", "triton/sparse.py",
           "    k_end = tl.minimum(k_start + k_per_split, K)",
           "    k_end = tl.minimum(k_start + k_per_split - BLOCK_K, K)",
           TRITON_SPLIT),
    Mutant("sparse: expansion puts the first value at position 3", "triton/sparse.py",
           "    w3 = tl.where(pos1 == 3, second, zero)", "    w3 = tl.where(pos1 == 3, first, zero)", TRITON_SPLIT),
    Mutant("sparse: accumulator rounded to fp16 every K step", "triton/sparse.py",
           'acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")',
           'acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee").to(tl.float16).to(tl.float32)', TRITON_SPLIT),
    # ---- Triton pruning decision (triton/pruning.py)
    Mutant("pruning: running max of the cls term taken as a min", "triton/pruning.py",
           "hi_c = tl.maximum(hi_c,", "hi_c = tl.minimum(hi_c,",
           _k("test_pruning.py", "triton and sharp_softmax")),
    # ---- the torch reference (reference/)
    Mutant("torch tokens: keep_first off by one", "reference/tokens.py",
           "keep = (local < keep_first) |", "keep = (local <= keep_first) |", TORCH_TOKENS),
    Mutant("torch tokens: plain-mean fallback inverted", "reference/tokens.py",
           "    uniform = total == 0\n", "    uniform = total != 0\n", TORCH_TOKENS),
    Mutant("torch tokens backward: score gradient loses the merged row", "reference/tokens.py",
           "ds = (p - merged_dot_g[seg]) /", "ds = p /", _k("test_tokens.py", "torch and float64_formula")),
    Mutant("torch attention: min for max in the log-sum-exp", "reference/attention.py",
           "            row_max = s.amax(-1)\n            p = torch.softmax",
           "            row_max = s.amin(-1)\n            p = torch.softmax",
           _k("test_attention.py", "torch and gradients_match_oracle")),
    Mutant("torch attention: causal diagonal off by one", "reference/attention.py",
           "return torch.arange(lk, device=device)[None, :] <= i + (lk - lq)",
           "return torch.arange(lk, device=device)[None, :] < i + (lk - lq)",
           _k("test_attention.py", "torch and causal_cross_edges")),
    Mutant("torch attention backward: dS drops the delta term", "reference/attention.py",
           "        ds = p * (dp - delta)\n        dq[q0 + first:q1]", "        ds = p * dp\n        dq[q0 + first:q1]",
           _k("test_attention.py", "torch and gradients_match_oracle")),
    Mutant("torch attention: the padded path drops scale", "reference/attention.py",
           "    s.mul_(scale)   # after the product", "    s.mul_(1.0)   # after the product",
           _k("test_attention.py", "padded_and_per_sequence")),
    Mutant("torch sparse: meta nibbles swapped", "reference/sparse.py",
           "meta = nibble[:, 0::2] | (nibble[:, 1::2] << 4)", "meta = nibble[:, 1::2] | (nibble[:, 0::2] << 4)",
           _k("test_sparse.py", "compress_roundtrip")),
    Mutant("torch sparse backward: kept positions transposed", "reference/sparse.py",
           "torch.gather(grad_w, -1, kept_positions(meta))", "torch.gather(grad_w, -1, kept_positions(meta).flip(-1))",
           _k("test_sparse.py", "torch and float64_formula")),
    Mutant("torch pruning: threshold takes the max over alignment tokens", "reference/pruning.py",
           ".squeeze(1).amin(-1)", ".squeeze(1).amax(-1)", _k("test_pruning.py", "torch and matches_oracle")),
]

def _copy_package(dest: Path) -> Path:
    # The compiled extension stays behind: CPU tests do not need it, and CI's source tree has none.
    shutil.copytree(PACKAGE, dest / "madtp_kernels", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (dest / "madtp_mutants_plugin.py").write_text(_PLUGIN)
    return dest / "madtp_kernels"


def _run_tests(copy_root: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, str, float]:
    """(outcome, detail, CPU seconds): outcome 'failed' (tests failed), 'passed', or 'error' (could not judge)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(copy_root), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PYTHONDONTWRITEBYTECODE="1", MADTP_MUTANT_IMPORTED=str(copy_root / "imported.txt"))
    cmd = [sys.executable, "-P", "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "madtp_mutants_plugin",
           *tests]
    log = copy_root / "pytest.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        expired = threading.Event()
        timer = threading.Timer(timeout, lambda: (expired.set(), proc.kill()))
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own CPU time: wall time depends on the load
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    out = log.read_text()
    if expired.is_set():
        return "error", f"timed out after {timeout:.0f} s", cpu
    report = copy_root / "imported.txt"
    imported = report.read_text() if report.exists() else None
    if imported is None or not Path(imported).resolve().is_relative_to(copy_root.resolve()):
        return "error", f"imported madtp_kernels from {imported or 'nowhere'}, not the copy (rc {proc.returncode})", cpu
    if proc.returncode == 0:
        return "passed", "", cpu
    if proc.returncode == 1 or proc.returncode < 0:  # test failures, or the run crashed (a signal)
        failed = re.search(r"^FAILED (\S+)", out, re.MULTILINE)
        return "failed", failed.group(1).split("::")[-1] if failed else f"rc {proc.returncode}", cpu
    return "error", f"pytest rc {proc.returncode}: " + " | ".join(out.strip().splitlines()[-3:]), cpu


def _run_mutant(mutant: Mutant | None, tests: tuple[str, ...], timeout: float) -> tuple[str, str, float, float]:
    """(outcome, detail, wall seconds, CPU seconds)."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="madtp_mutant_") as tmp:
        copy = _copy_package(Path(tmp))
        if mutant is not None:
            path = copy / mutant.file
            text = path.read_text()
            count = text.count(mutant.old)
            if count != 1:
                return "stale", f"old text found {count} times in {mutant.file}", time.monotonic() - start, 0.0
            path.write_text(text.replace(mutant.old, mutant.new))
        outcome, detail, cpu = _run_tests(Path(tmp), tests, timeout)
    return outcome, detail, time.monotonic() - start, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="run only the mutants whose name contains this")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--timeout", type=float, default=1200, help="wall seconds per test run (a loaded machine)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated copy")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k in m.name]
    if not chosen:
        parser.error(f"no mutant name contains {args.k!r}")
    start = time.monotonic()
    ok = True
    if not args.no_baseline:
        # Every selection must pass unmutated, or a "kill" could be a failure that was already there.
        selections = sorted({m.tests for m in chosen})
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            base = list(pool.map(lambda t: _run_mutant(None, t, args.timeout), selections))
        for tests, (outcome, detail, seconds, _) in zip(selections, base, strict=True):
            if outcome != "passed":
                ok = False
                print(f"baseline {' '.join(tests)}: {outcome} {detail} ({seconds:.0f} s)")
        print(f"baseline: {len(selections)} test selections, {'all pass' if ok else 'FAILED'} "
              f"({time.monotonic() - start:.0f} s, {sum(b[3] for b in base):.0f} CPU s)", flush=True)
        if not ok:
            return 1
    def run(mutant: Mutant):
        result = _run_mutant(mutant, mutant.tests, args.timeout)
        print(f"  {mutant.name}: {result[0]} ({result[3]:.0f} CPU s)", flush=True)  # progress; the table follows
        return result

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(run, chosen))
    width = max(len(m.name) for m in chosen)
    print(f"\n{'mutant':<{width}}  {'tests run':<60}  {'result':<9}  {'wall s':>6}  {'CPU s':>5}")
    verdicts = {"failed": "killed", "passed": "SURVIVED", "stale": "STALE", "error": "ERROR"}
    for mutant, (outcome, detail, seconds, cpu) in zip(chosen, results, strict=True):
        selection = " ".join(f"'{a}'" if " " in a else a for a in mutant.tests).replace(f"{TESTS}/", "")
        line = f"{mutant.name:<{width}}  {selection:<60}  {verdicts[outcome]:<9}  {seconds:6.0f}  {cpu:5.0f}"
        print(line + (f"  ({detail})" if detail and outcome != "failed" else f"  by {detail}" if detail else ""))
        ok &= outcome == "failed"
    killed = sum(r[0] == "failed" for r in results)
    cpu = sum(r[3] for r in results)
    print(f"\n{killed} of {len(chosen)} mutants killed in {time.monotonic() - start:.0f} s "
          f"(mutants: {cpu:.0f} CPU s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
