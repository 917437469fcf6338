"""Model level: CLIP vision towers and BLIP retrieval (ITM), dense (the Hugging Face model as it is) vs MADTP
token pruning executed ragged (packed tokens, varlen kernels) vs padded (the same decisions, each layer padded to the
batch's longest sample and masked: the published code's compute) vs published (the published code's batch policy
at the same temperature: every sample keeps the batch's largest keep count, padded; its own GFLOPs measured), at
three GFLOPs budgets, timed in the same run.

Weights are random (no CLIP weights can be downloaded here) and the images are real photos from scikit-image,
cropped and flipped, so the samples of a batch differ as real ones do. Each budget's temperature is found by
bisection on the GFLOPs that `madtp.count_flops` measures on the benchmark batch itself. On CPU the ViT-L tower
keeps its real token count, width and heads but runs 6 of its 24 layers, and BLIP-base (384 px: 577 image
tokens; BERT-base text with cross-attention, 35 tokens) runs 3 of its 12 layers per branch (stated in the group
names).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import cache

import madtp
import numpy as np
import pytest
import torch
from conftest import DEVICE, ON_GPU, record, run
from transformers import BlipConfig, BlipForImageTextRetrieval, CLIPVisionConfig, CLIPVisionModel

DTYPE = torch.float16 if ON_GPU else torch.float32
BUDGETS = (0.7, 0.5, 0.3)   # target GFLOPs as a fraction of dense
TEXT_TOKENS = 35             # BLIP's caption length


@dataclass(frozen=True)
class Case:
    name: str
    width: int
    layers: int
    heads: int
    image: int
    patch: int
    batch: int
    kind: str = "clip-vision"    # or "blip-retrieval" (image + 35-token text through the ITM head)

    def model(self) -> torch.nn.Module:
        vision = dict(hidden_size=self.width, intermediate_size=4 * self.width, num_hidden_layers=self.layers,
                      num_attention_heads=self.heads, image_size=self.image, patch_size=self.patch)
        if self.kind == "clip-vision":
            return CLIPVisionModel(CLIPVisionConfig(**vision))
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=self.layers, num_attention_heads=12,
                    encoder_hidden_size=self.width, vocab_size=30524)
        return BlipForImageTextRetrieval(BlipConfig(vision_config=vision, text_config=text))

    def inputs(self) -> dict:
        pixels = photos(self.batch, self.image).to(DEVICE, DTYPE)
        if self.kind == "clip-vision":
            return dict(pixel_values=pixels)
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(8, TEXT_TOKENS + 1, (self.batch,), generator=g)
        ids = torch.randint(1000, 30000, (self.batch, TEXT_TOKENS), generator=g)
        mask = (torch.arange(TEXT_TOKENS) < lengths[:, None]).long()
        return dict(pixel_values=pixels, input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), use_itm_head=True)

    @property
    def branch(self) -> str:
        return "vision" if self.kind == "clip-vision" else "total"

    def prune_layers(self) -> tuple[int, ...]:
        # every other layer from the second on (every layer of a cut-down tower): a schedule whose temperature
        # range spans the three budgets
        return tuple(range(1, self.layers, 2 if self.layers >= 12 else 1))


CASES = [
    Case("clip-vit-b16", 768, 12, 12, 224, 16, 64 if ON_GPU else 8),
    Case("clip-vit-l14-336" + ("" if ON_GPU else "-6of24layers"), 1024, 24 if ON_GPU else 6, 16, 336, 14,
         32 if ON_GPU else 2),
    Case("blip-base-retrieval-384" + ("" if ON_GPU else "-3of12layers"), 768, 12 if ON_GPU else 3, 12, 384, 16,
         32 if ON_GPU else 2, kind="blip-retrieval"),
]


def photos(batch: int, size: int) -> torch.Tensor:
    """[batch, 3, size, size] CLIP-normalised crops of scikit-image's photos (deterministic)."""
    from skimage import data, transform
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
    rng = np.random.default_rng(0)
    out = []
    for i in range(batch):
        img = getattr(data, names[i % len(names)])().astype(np.float32) / 255.0
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = transform.resize(img[y:y + side, x:x + side], (size, size), anti_aliasing=True)
        if i // len(names) % 2:
            crop = crop[:, ::-1]
        out.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1))
    mean = torch.tensor([0.4815, 0.4578, 0.4082])[:, None, None]
    std = torch.tensor([0.2686, 0.2613, 0.2758])[:, None, None]
    return (torch.stack(out) - mean) / std


@cache
def setup(case: Case):
    torch.manual_seed(0)
    model = case.model().eval().to(DEVICE, DTYPE)
    inputs = case.inputs()
    dense = madtp.count_flops(model, **inputs)[case.branch]
    pruned = madtp.apply(copy.deepcopy(model), madtp.MADTPConfig(prune_layers=case.prune_layers()))
    return model, pruned, inputs, dense


@cache
def temperature(case: Case, budget: float) -> tuple[float, float]:
    """(temperature, measured GFLOPs fraction) closest to `budget`, by bisection on log(temperature)."""
    _, pruned, inputs, dense = setup(case)
    lo, hi = math.log(1e-2), math.log(1e2)
    best = (1.0, float("inf"))

    def fraction(t):
        madtp.set_temperature(pruned, vision=t, text=t)
        return madtp.count_flops(pruned, **inputs)[case.branch] / dense

    for _ in range(5):   # more temperature prunes more
        mid = (lo + hi) / 2
        f = fraction(math.exp(mid))
        if abs(f - budget) < abs(best[1] - budget):
            best = (math.exp(mid), f)
        lo, hi = (mid, hi) if f > budget else (lo, mid)
    return best


IMPLS = ["dense"] + [f"madtp-{execution}@{b:.0%}" for b in BUDGETS for execution in ("ragged", "padded", "published")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("impl", IMPLS)
def test_model(benchmark, case, impl):
    model, pruned, inputs, dense = setup(case)
    benchmark.group = f"model {case.name}, batch {case.batch}, {str(DTYPE).removeprefix('torch.')}"
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if impl == "dense":
        record(benchmark, backend="dense", bytes_moved=param_bytes, flops=int(dense * 1e9 * case.batch),
               gflops_fraction=1.0, keep_fraction=1.0)
        timed(benchmark, lambda: model(**inputs))
        return
    execution, budget = impl.removeprefix("madtp-").split("@")
    t, fraction = temperature(case, float(budget.rstrip("%")) / 100)
    madtp.set_temperature(pruned, vision=t, text=t)
    madtp.set_execution(pruned, execution)
    if execution == "published":   # keeps more tokens than ours at the temperature: its own GFLOPs
        fraction = madtp.count_flops(pruned, **inputs)[case.branch] / dense
    pruned(**inputs)
    report = madtp.pruning_report(pruned)
    tokens = (case.image // case.patch) ** 2 + 1
    # token-layers processed relative to dense: each layer runs on the rows the previous pruning layer left
    kept, rows = [], float(tokens)
    for i in range(case.layers):
        kept.append(rows)
        name = next((n for n in report if n.endswith(f"encoder.layers.{i}") and "text" not in n), None)
        if name is not None:
            rows = float(report[name].float().mean())
    record(benchmark, backend=impl, bytes_moved=param_bytes, flops=int(fraction * dense * 1e9 * case.batch),
           gflops_fraction=round(fraction, 4), keep_fraction=round(sum(kept) / (tokens * case.layers), 4),
           temperature=t, execution=execution, budget=float(budget.rstrip("%")) / 100)
    timed(benchmark, lambda: pruned(**inputs))


def timed(benchmark, fn):
    """A model forward takes ~1 s on CPU: a fixed few rounds after a warm-up keep the suite within minutes."""
    if ON_GPU:
        return run(benchmark, fn)
    return benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
