#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build and install madtp-kernels with its CUDA extension, run the
# CUDA tests and the benchmark suite, and render the report, all into one results folder, within 10 minutes.
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]        (default: results/gpu-<UTC date and time>)
#
# Run it from a checkout, inside the virtual environment to install into. Every step has a time limit; a failed
# step is recorded in RESULTS_DIR/summary.txt and the later steps still run (a failed install stops them: nothing
# after it would test the build). Exit status: 0 if every step passed, 1 if one failed, 2 if there is no
# GPU. Environment: PYTHON (default python), MAX_JOBS (parallel nvcc jobs, default: the CPU count),
# GPU_SH_BUDGET_S (whole run, default 570), NVIDIA_SMI (default nvidia-smi).
set -euo pipefail

smi=${NVIDIA_SMI:-nvidia-smi}
if ! command -v "$smi" >/dev/null 2>&1; then
    echo "gpu.sh: no NVIDIA GPU here: '$smi' not found. Run this on a machine with an NVIDIA GPU and its driver;" \
         "without one, use 'pytest' and 'pytest benchmarks/ --benchmark-only' (README)." >&2
    exit 2
fi
if ! gpus=$("$smi" -L 2>&1) || [[ $gpus != *GPU* ]]; then
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
deadline=$(( SECONDS + ${GPU_SH_BUDGET_S:-570} ))
summary=$out/summary.txt
failed=0
printf '%-16s %4s %6s  %s\n' step rc sec log > "$summary"

# step NAME LIMIT_S COMMAND...: run COMMAND with its output in NAME.log, for at most LIMIT_S seconds and never past
# the deadline less $reserve (kept for the report); SIGINT first so pytest still writes what it has (pytest-benchmark
# saves its JSON at session end), SIGKILL 15 s later.
reserve=30
step() {
    local name=$1 limit=$2 left rc start
    shift 2
    left=$(( deadline - SECONDS - reserve ))
    (( left < limit )) && limit=$left
    if (( limit < 5 )); then
        printf '%-16s %4s %6s  %s\n' "$name" skip 0 "(out of time)" >> "$summary"
        failed=1
        return 1
    fi
    echo "== $name (limit ${limit}s): $*"
    start=$SECONDS
    rc=0
    timeout -s INT -k 15 "$limit" "$@" > "$out/$name.log" 2>&1 || rc=$?
    printf '%-16s %4s %6s  %s\n' "$name" "$rc" "$(( SECONDS - start ))" "$name.log" >> "$summary"
    (( rc == 124 )) && echo "   timed out after ${limit}s" >> "$out/$name.log"
    (( rc == 0 )) || { failed=1; echo "   $name failed (exit $rc): $out/$name.log"; }
    return "$rc"
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

bench_json=$out/bench.json
bench_cmd=(pytest benchmarks/ --benchmark-only "--benchmark-json=$bench_json")
# -P keeps the checkout off sys.path, so the tests and the info tool import the installed package (with _C).
# pip -v keeps nvcc's -Xptxas -v output (registers, spills per kernel) in install.log.
if step deps 120 "$python" -m pip install torch==2.14.1 ninja setuptools wheel &&
    step install 330 env MADTP_KERNELS_BUILD_CUDA=1 "$python" -m pip install -v --no-build-isolation ".[test]"; then
    step info 30 "$python" -P -m madtp_kernels.tools.info || true
    step info-json 30 "$python" -P -m madtp_kernels.tools.info --json || true
    step cuda-tests 120 "$python" -P -m pytest -m cuda tests/ -p no:cacheprovider || true
    step benchmarks 240 "$python" -P -m "${bench_cmd[@]}" -p no:cacheprovider || true
fi

if [[ -s $bench_json ]]; then
    info_args=()
    [[ -s $out/info-json.log ]] && "$python" -c 'import json, sys; json.load(open(sys.argv[1]))' \
        "$out/info-json.log" 2>/dev/null && info_args=(--info "$out/info-json.log")
    reserve=0
    step report 60 "$python" benchmarks/report.py "$bench_json" -o "$out/BENCHMARKS.md" --plots "$out/plots" \
        "${info_args[@]}" --bench-command "${bench_cmd[*]}" || true
else
    printf '%-16s %4s %6s  %s\n' report skip 0 "(no benchmark JSON)" >> "$summary"
    failed=1
fi

echo
cat "$summary"
echo "results in $out"
exit "$failed"
