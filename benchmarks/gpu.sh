#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build and install madtp-kernels with its CUDA extension, run every
# GPU test (`pytest -m cuda`), the benchmark suite and the report, all into one results folder, within 10 minutes.
#
#   bash benchmarks/gpu.sh [--dry-run] [RESULTS_DIR]   (default: results/gpu-<UTC date and time>)
#
# Run it from a checkout, inside the virtual environment to install into. Every step has a time limit; a failed
# step is recorded in RESULTS_DIR/summary.txt and the later steps still run (a failed install stops them: nothing
# after it would test the build). summary.txt has one verdict per step (PASS, FAIL or SKIP, with the passed /
# failed / skipped test counts of the test step) and an overall verdict. Exit status: 0 if every step passed,
# 1 if one failed or was skipped, 2 if there is no GPU. --dry-run (no GPU needed): skips every step that needs a
# GPU or installs or benchmarks, runs the others against the installed package (info, cuda-report, and the GPU
# tests, which then skip), to check the script and the summary. Environment: PYTHON (default python), MAX_JOBS
# (parallel nvcc jobs, default: the CPU count), GPU_SH_BUDGET_S (whole run, default 570), NVIDIA_SMI (default
# nvidia-smi), GPU_SH_TIME_SCALE (see below).
set -euo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
    dry_run=1
    shift
fi
smi=${NVIDIA_SMI:-nvidia-smi}
if (( dry_run )); then
    gpus="(dry run: no GPU checked)"
elif ! command -v "$smi" >/dev/null 2>&1; then
    echo "gpu.sh: no NVIDIA GPU here: '$smi' not found. Run this on a machine with an NVIDIA GPU and its driver;" \
         "without one, use 'pytest' and 'pytest benchmarks/ --benchmark-only' (README)." >&2
    exit 2
fi
if (( ! dry_run )) && { ! gpus=$("$smi" -L 2>&1) || [[ $gpus != *GPU* ]]; }; then
    echo "gpu.sh: no usable NVIDIA GPU: '$smi -L' said: $gpus" >&2
    exit 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
out=${1:-$repo/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$repo"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# GPU_SH_TIME_SCALE (integer, default 1) stretches every limit and the budget: for a dry run on a slow, shared CPU.
scale=${GPU_SH_TIME_SCALE:-1}
deadline=$(( SECONDS + ${GPU_SH_BUDGET_S:-570} * scale ))
summary=$out/summary.txt
failed=0
row() {  # row STEP VERDICT RC SEC PASSED FAILED SKIPPED NOTE
    printf '%-12s %-7s %4s %5s %7s %7s %8s  %s\n' "$@" >> "$summary"
}
printf '%-12s %-7s %4s %5s %7s %7s %8s  %s\n' step verdict rc sec passed failed skipped log > "$summary"

# Test counts of a junit XML: "passed failed skipped" (errors count as failed), or "- - -" without one.
counts() {
    "$python" - "$1" <<'PY' 2>/dev/null || echo "- - -"
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
failed = n["failures"] + n["errors"]
print(n["tests"] - failed - n["skipped"], failed, n["skipped"])
PY
}

skip() {  # skip NAME WHY: record a step that did not run
    row "$1" SKIP - 0 - - - "($2)"
    (( dry_run )) || failed=1
}

# step [--gpu] NAME LIMIT_S COMMAND...: run COMMAND with its output in NAME.log, for at most LIMIT_S seconds and
# never past the deadline less $reserve (kept for the report); SIGINT first so pytest still writes what it has
# (pytest-benchmark saves its JSON at session end), SIGKILL 15 s later. --gpu: a step a dry run skips. A step whose
# command writes NAME.xml (junit) gets its test counts in the summary, and FAIL if any test failed.
reserve=30
step() {
    local needs_gpu=0 name limit left rc start verdict tally
    if [[ $1 == --gpu ]]; then
        needs_gpu=1
        shift
    fi
    name=$1 limit=$(( $2 * scale ))
    shift 2
    if (( dry_run && needs_gpu )); then
        echo "== $name: skipped (dry run): $*"
        skip "$name" "dry run"
        return 0
    fi
    left=$(( deadline - SECONDS - reserve ))
    (( left < limit )) && limit=$left
    if (( limit < 5 )); then
        skip "$name" "out of time"
        return 1
    fi
    echo "== $name (limit ${limit}s): $*"
    start=$SECONDS
    rc=0
    timeout -s INT -k 15 "$limit" "$@" > "$out/$name.log" 2>&1 || rc=$?
    (( rc == 124 )) && echo "   timed out after ${limit}s" >> "$out/$name.log"
    tally="- - -"
    [[ -s $out/$name.xml ]] && tally=$(counts "$out/$name.xml")
    verdict=PASS
    if (( rc != 0 )) || [[ ${tally#* } != "0 "* && $tally != "- - -" ]]; then
        verdict=FAIL
        failed=1
        echo "   $name failed (exit $rc): $out/$name.log"
    fi
    # shellcheck disable=SC2086  # tally is three words on purpose
    row "$name" "$verdict" "$rc" "$(( SECONDS - start ))" $tally "$name.log"
    [[ $verdict == PASS ]]
}

{
    echo "$gpus"
    "$smi"
    "$smi" --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
} > "$out/nvidia-smi.txt" 2>&1 || true
{
    git rev-parse HEAD && git status --short
} > "$out/git.txt" 2>&1 || true
{
    command -v nvcc && nvcc --version
} > "$out/nvcc.txt" 2>&1 || true

# -P keeps the checkout off sys.path, so the tests and the tools import the installed package (with _C). A dry
# run installs nothing: it takes the package the environment has (an editable install is found only without -P).
py=("$python" -P)
(( dry_run )) && py=("$python")
bench_json=$out/bench.json
bench_cmd=(pytest benchmarks/ --benchmark-only "--benchmark-json=$bench_json")
# pip -v keeps nvcc's -Xptxas -v output (registers, spills per kernel) in install.log.
# -m cuda: every test that needs a GPU carries the mark (tests/conftest.py adds it to cuda-device params).
if step --gpu deps 90 "$python" -m pip install torch==2.14.1 ninja setuptools wheel &&
    step --gpu install 300 env MADTP_KERNELS_BUILD_CUDA=1 "$python" -m pip install -v --no-build-isolation ".[test]"
then
    step info 20 "${py[@]}" -m madtp_kernels.tools.info || true
    step info-json 20 "${py[@]}" -m madtp_kernels.tools.info --json || true
    step cuda-report 30 "${py[@]}" -m madtp_kernels.tools.cuda_report --require --json "$out/cuda-report.json" || true
    step cuda-tests 200 "${py[@]}" -m pytest -m cuda tests/ -p no:cacheprovider -q \
        "--junitxml=$out/cuda-tests.xml" || true
    step --gpu benchmarks 180 "${py[@]}" -m "${bench_cmd[@]}" -p no:cacheprovider || true
else
    for name in info info-json cuda-report cuda-tests benchmarks; do skip "$name" "install failed"; done
fi

if [[ -s $bench_json ]]; then
    info_args=()
    [[ -s $out/info-json.log ]] && "$python" -c 'import json, sys; json.load(open(sys.argv[1]))' \
        "$out/info-json.log" 2>/dev/null && info_args=(--info "$out/info-json.log")
    reserve=0
    step report 60 "$python" benchmarks/report.py "$bench_json" -o "$out/BENCHMARKS.md" --plots "$out/plots" \
        "${info_args[@]}" --bench-command "${bench_cmd[*]}" || true
else
    skip report "no benchmark JSON"
fi
if (( dry_run )); then
    echo "overall: DRY RUN (GPU steps skipped; the others: $( (( failed )) && echo FAIL || echo PASS))" >> "$summary"
elif (( failed )); then
    echo "overall: FAIL" >> "$summary"
else
    echo "overall: PASS" >> "$summary"
fi

echo
cat "$summary"
echo "results in $out"
exit "$failed"
