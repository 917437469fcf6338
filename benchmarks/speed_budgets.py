"""Dense vs ragged vs padded, interleaved round by round, at several GFLOPs budgets: how much of the saved GFLOPs
becomes saved time.

    python benchmarks/speed_budgets.py [--rounds 5] [--json results/speed_budgets.json]

CLIP ViT-B/16 vision tower (12 layers, 224 px, random init), batch 8 of real photos (scikit-image crops, as in
bench_models.py), every layer pruning, the device's default dtype (fp32 on CPU). Each budget's temperature is
found by bisection on the GFLOPs `madtp.count_flops` measures on the batch itself; then every round times one
dense forward and one ragged and one padded forward per budget, in turn, so that drift in the machine's speed
falls on all of them alike. Medians over rounds. On CPU these are CPU times, nothing else.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import madtp
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import photos  # noqa: E402  (the same photos as the pytest-benchmark suite)

BUDGETS = (0.7, 0.5, 0.3, 0.15)


def temperature_for(model, inputs, dense: float, budget: float, steps: int = 8) -> tuple[float, float]:
    """(temperature, measured GFLOPs fraction) closest to `budget`, by bisection on log(temperature)."""
    lo, hi = math.log(1e-4), math.log(1e3)
    best = (1.0, float("inf"))
    for _ in range(steps):
        mid = (lo + hi) / 2
        madtp.set_temperature(model, vision=math.exp(mid))
        f = madtp.count_flops(model, **inputs)["vision"] / dense
        if abs(f - budget) < abs(best[1] - budget):
            best = (math.exp(mid), f)
        lo, hi = (mid, hi) if f > budget else (lo, mid)
    return best


def timed(model, inputs) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense_model = CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                   num_hidden_layers=12, image_size=224, patch_size=16)).eval()
    inputs = {"pixel_values": photos(8, 224)}
    pruned = madtp.apply(copy.deepcopy(dense_model), madtp.MADTPConfig(temperature=1.0, prune_text=False))
    dense = madtp.count_flops(dense_model, **inputs)["vision"]
    points = [(b, *temperature_for(pruned, inputs, dense, b)) for b in BUDGETS]
    times = {"dense": []} | {(b, e): [] for b, _, _ in points for e in ("ragged", "padded")}
    for model in (dense_model, pruned):   # warm
        timed(model, inputs)
    for _ in range(args.rounds):
        times["dense"].append(timed(dense_model, inputs))
        for b, t, _ in points:
            madtp.set_temperature(pruned, vision=t)
            for execution in ("ragged", "padded"):
                madtp.set_execution(pruned, execution)
                times[(b, execution)].append(timed(pruned, inputs))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    print(f"CLIP ViT-B/16 vision tower, batch 8, {args.threads} threads, CPU, medians of {args.rounds} interleaved "
          f"rounds; dense {med['dense'] * 1e3:.1f} ms")
    print("| target | GFLOPs fraction | temperature | ragged ms | padded ms | ragged speedup | ideal | share of ideal "
          "| ragged over padded |\n|---|---|---|---|---|---|---|---|---|")
    for b, t, f in points:
        ragged, padded = med[(b, "ragged")], med[(b, "padded")]
        speedup = med["dense"] / ragged
        row = dict(target=b, fraction=f, temperature=t, dense_ms=med["dense"] * 1e3, ragged_ms=ragged * 1e3,
                   padded_ms=padded * 1e3, speedup=speedup, share_of_ideal=speedup * f, over_padded=padded / ragged)
        rows.append(row)
        print(f"| {b:.0%} | {f:.1%} | {t:.3g} | {ragged * 1e3:.1f} | {padded * 1e3:.1f} | {speedup:.2f}x | "
              f"{1 / f:.2f}x | {speedup * f:.0%} | {padded / ragged:.2f}x |")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"rounds": args.rounds, "threads": args.threads, "rows": rows,
                       "times_s": {str(k): v for k, v in times.items()}}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
