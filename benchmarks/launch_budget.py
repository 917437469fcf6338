"""The launch and sync budget of the pruned path, counted (not timed): what a GPU pays besides FLOPs.

For each model and backend, one forward of the dense model, the applied model with pruning off (control), and
the pruned model in the ragged and padded executions is counted with `madtp_kernels.tools.launches`: every
kernel launch (aten ops that do work, Triton launches, everything inside madtp_kernels' custom ops) and every
host sync. Per pruning layer = (pruned - dense) / layers that prune (every layer prunes here).

A GPU time is then predicted (not measured: no GPU has run this) as
    FLOPs / 989 TFLOP/s (H100 SXM dense fp16, a compute roofline) + launches x 5 us + syncs x 15 us.

    python benchmarks/launch_budget.py --json results/launch_budget.json

Triton runs under TRITON_INTERPRET=1 on CPU (counts are exact; it is slow, so its configs are cut down: the
per-layer counts do not depend on the batch or the image size, except the torch backend's attention, which
loops over sequences).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import asdict, dataclass

# Before Triton's kernels are decorated: its interpreter runs them on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import launch_section  # noqa: E402  (stdlib only: the one rendering of this table)

PEAK_FLOPS = 989e12     # H100 SXM, dense fp16/bf16 (datasheet)
LAUNCH_S = 5e-6         # eager PyTorch's cost per op on a GPU
SYNC_S = 15e-6          # a host sync: the queue drains


@dataclass(frozen=True)
class Config:
    model: str            # "clip-vit-b16" (vision tower) or "blip-base-retrieval" (ITC + ITM)
    backend: str          # madtp_kernels backend: "torch" or "triton"
    batch: int
    layers: int           # encoder layers per tower (ViT-B widths always)
    image: int            # image size in pixels
    temperature: float = 1.0


@dataclass
class Result:
    config: Config
    execution: str        # dense / control / ragged / padded
    launches: int
    syncs: int
    gflops: float         # this forward's, whole batch (madtp.count_flops)
    by_custom_op: dict    # launches made inside each madtp_kernels op
    layers: int           # encoder layers that prune (all of them)

    @property
    def predicted_ms(self) -> float:
        return 1e3 * (self.gflops * 1e9 / PEAK_FLOPS + self.launches * LAUNCH_S + self.syncs * SYNC_S)


def _clip(cfg: Config):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                             num_hidden_layers=cfg.layers, image_size=cfg.image, patch_size=16))
    return model.eval(), {"pixel_values": torch.randn(cfg.batch, 3, cfg.image, cfg.image)}, cfg.layers


def _blip(cfg: Config):
    from transformers import BlipConfig, BlipForImageTextRetrieval
    conf = BlipConfig()
    conf.vision_config.num_hidden_layers = cfg.layers
    conf.vision_config.image_size = cfg.image
    conf.text_config.num_hidden_layers = cfg.layers
    model = BlipForImageTextRetrieval(conf).eval()
    ids = torch.randint(1000, 2000, (cfg.batch, 20))
    mask = torch.ones_like(ids)
    mask[1::2, 12:] = 0
    inputs = {"pixel_values": torch.randn(cfg.batch, 3, cfg.image, cfg.image), "input_ids": ids,
              "attention_mask": mask}
    return model, inputs, 2 * cfg.layers


MODELS = {"clip-vit-b16": _clip, "blip-base-retrieval": _blip}


def _count(model, inputs, backend: str):
    import madtp

    import madtp_kernels as mk
    from madtp_kernels.tools.launches import LaunchCounter
    with torch.no_grad(), mk.use_backend(backend):
        model(**inputs)                       # warm: first-call work (kernel compiles, caches) is not per forward
        with LaunchCounter() as counter:
            model(**inputs)
        gflops = madtp.count_flops(model, **inputs)["total"] * inputs["pixel_values"].shape[0]
    return counter, gflops


def run(cfg: Config) -> list[Result]:
    import madtp
    torch.manual_seed(0)
    model, inputs, layers = MODELS[cfg.model](cfg)
    results = []
    counter, gflops = _count(model, inputs, cfg.backend)
    results.append(Result(cfg, "dense", counter.launches, counter.syncs, gflops, {}, layers))
    applied = madtp.apply(copy.deepcopy(model), madtp.MADTPConfig(temperature=None))
    for execution, temperature in (("control", None), ("ragged", cfg.temperature), ("padded", cfg.temperature)):
        madtp.set_temperature(applied, vision=temperature, text=temperature)
        madtp.set_execution(applied, "padded" if execution == "padded" else "ragged")
        counter, gflops = _count(applied, inputs, cfg.backend)
        results.append(Result(cfg, execution, counter.launches, counter.syncs, gflops, dict(counter.by_custom_op),
                              layers))
    return results


CONFIGS = (
    Config("clip-vit-b16", "torch", batch=8, layers=12, image=224),
    Config("clip-vit-b16", "triton", batch=2, layers=4, image=224),
    Config("blip-base-retrieval", "torch", batch=4, layers=4, image=384),
    Config("blip-base-retrieval", "triton", batch=2, layers=2, image=96),
)


def record(r: Result) -> dict:
    """The JSON row: what `report.launch_section` renders (the table is drawn in one place)."""
    return {**asdict(r.config), "execution": r.execution, "launches": r.launches, "syncs": r.syncs,
            "layers": r.layers, "gflops": r.gflops, "predicted_ms": r.predicted_ms, "by_custom_op": r.by_custom_op}


def table(results: list[Result]) -> str:
    return "\n".join(launch_section([record(r) for r in results]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", choices=sorted({c.backend for c in CONFIGS}), help="one backend")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    results = []
    for cfg in CONFIGS:
        if args.only and cfg.backend != args.only:
            continue
        results += run(cfg)
        print(table(results), file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump([record(r) for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
