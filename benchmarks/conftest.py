"""Shared set-up for the benchmark suites: device, size scaling on CPU, and the figures each benchmark records."""
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# A CPU run shrinks the batch so the whole suite stays within minutes on 2 cores; the token and channel counts
# stay the real models' (ViT-B/16: 197 tokens, 768 channels).
BATCH = int(os.environ.get("MADTP_BENCH_BATCH", 64 if ON_GPU else 8))
# Threads are set, not inherited: a CPU figure means nothing without them (the report states them from the JSON).
THREADS = int(os.environ.get("MADTP_BENCH_THREADS", 0)) or torch.get_num_threads()
torch.set_num_threads(THREADS)


def pytest_report_header(config):
    return (f"benchmarks on {DEVICE} ({torch.cuda.get_device_name() if ON_GPU else 'CPU timings, not GPU'}); "
            f"batch {BATCH}{'' if ON_GPU else ' (scaled down on CPU; MADTP_BENCH_BATCH overrides)'}; "
            f"{THREADS} torch threads (MADTP_BENCH_THREADS overrides)")


def pytest_benchmark_update_machine_info(config, machine_info):
    # What the report states beside the CPU model: threads timed with, torch version, GPU.
    machine_info["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                             "gpu": torch.cuda.get_device_name() if ON_GPU else None}


def record(benchmark, *, backend: str, bytes_moved: int, flops: int = 0, **extra) -> None:
    """What the report needs beside the time: device, backend, bytes and FLOPs the op must move and do."""
    benchmark.extra_info.update(device=str(DEVICE), backend=backend, bytes=bytes_moved, flops=flops, **extra)


def paired_speedup(baseline, fn, rounds: int) -> float:
    """Median over `rounds` of baseline time / fn time, the two timed back to back in alternating order: a ratio
    that load drifting over a suite cannot bias, beside the medians pytest-benchmark takes minutes apart."""
    import statistics
    import time

    def once(f):
        start = time.perf_counter()
        f()
        if ON_GPU:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    baseline(), fn()   # warm
    ratios = []
    for i in range(rounds):
        if i % 2:
            t_fn, t_base = once(fn), once(baseline)
        else:
            t_base, t_fn = once(baseline), once(fn)
        ratios.append(t_base / t_fn)
    return statistics.median(ratios)


def run(benchmark, fn):
    """Time fn, synchronising the GPU so asynchronous launches are not mistaken for finished work."""
    if ON_GPU:
        def timed():
            out = fn()
            torch.cuda.synchronize()
            return out
        return benchmark(timed)
    return benchmark(fn)


@pytest.fixture(autouse=True)
def _no_grad():
    # no_grad rather than inference_mode: the weights a model holds are ordinary tensors, and layers may cache
    # what they derive from them by version counter, which inference tensors lack.
    with torch.no_grad():
        yield
