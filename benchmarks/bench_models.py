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


# ------------------------------------------------------------------------------ control and decision-only rows
# (issue 17) The control row is the model with MADTP applied and pruning off (temperature None, ragged): what the
# executor costs by itself. The decision-only row times score_and_prune alone (importance, threshold, keep,
# compaction, merge) once, at the first pruning layer's shapes: the model's batch, tokens, width and heads.

@cache
def control_model(case: Case):
    model, _, _, _ = setup(case)
    return madtp.apply(copy.deepcopy(model), madtp.MADTPConfig(prune_layers=case.prune_layers(), temperature=None,
                                                               execution="ragged"))


@cache
def decision_inputs(case: Case):
    """What a pruning layer hands score_and_prune: packed rows, the layer's attention statistics and output,
    alignment scores (100 alignment tokens, as MADTPConfig's default)."""
    import madtp_kernels as mk

    g = torch.Generator().manual_seed(0)
    tokens, heads = (case.image // case.patch) ** 2 + 1, case.heads
    head_dim = case.width // heads
    rows = case.batch * tokens
    layout = mk.RaggedLayout.uniform(case.batch, tokens, device=DEVICE)
    q, k, v = (torch.randn(rows, heads, head_dim, generator=g).to(DEVICE, DTYPE) for _ in range(3))
    out, stats = mk.varlen_attention(q, k, v, layout, return_stats=True)
    x = torch.randn(rows, case.width, generator=g).to(DEVICE, DTYPE)
    align = torch.randn(rows, madtp.MADTPConfig().num_alignment_tokens, generator=g).to(DEVICE)
    return x, layout, stats, out, align, tokens


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("impl", ["madtp-control", "decision-only"])
def test_model_overheads(benchmark, case, impl):
    model, _, inputs, dense = setup(case)
    benchmark.group = f"model {case.name}, batch {case.batch}, {str(DTYPE).removeprefix('torch.')}"
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if impl == "madtp-control":
        control = control_model(case)
        record(benchmark, backend=impl, bytes_moved=param_bytes, flops=int(dense * 1e9 * case.batch),
               gflops_fraction=1.0, keep_fraction=1.0, execution="control", batch=case.batch, layers=case.layers)
        timed(benchmark, lambda: control(**inputs))
        return
    import madtp_kernels as mk

    x, layout, stats, out, align, tokens = decision_inputs(case)
    kept = mk.score_and_prune(x, layout, stats, out, align, temperature=1.0)
    record(benchmark, backend=impl, bytes_moved=x.numel() * x.element_size() * 2, flops=0, kind="decision",
           batch=case.batch, tokens=tokens, width=case.width, heads=case.heads,
           pruning_layers=len(case.prune_layers()), rows_kept=int(kept.x.shape[0]))
    run(benchmark, lambda: mk.score_and_prune(x, layout, stats, out, align, temperature=1.0))


# ---------------------------------------------------------------- ragged over padded vs the spread of keep counts
# (issue 17) One ViT-B/16-width stack (4 pre-LN layers: C 768, 12 heads of 64, MLP 3072, GELU) run packed
# (madtp_kernels.varlen_attention, Linear layers on the [T, C] rows) and padded (every sample padded to the batch's
# longest, SDPA with a key mask: what the published code runs) on lengths drawn at one mean and a coefficient of
# variation (std / mean over the batch) of 0, 0.1, 0.25, 0.5, and the CV the shipped trained model
# (madtp/assets/shapes_clip) gives its keep counts on held-out scenes at ~50% GFLOPs.

SPREAD_LAYERS, SPREAD_WIDTH, SPREAD_HEADS, SPREAD_MLP, SPREAD_TOKENS = 4, 768, 12, 3072, 197
SPREAD_BATCH = 32 if ON_GPU else 8
SPREAD_MEAN = 98            # half of ViT-B/16's 197 tokens: a 50% keep
SPREAD_CVS = (0.0, 0.1, 0.25, 0.5)
SPREAD_GROUP = (f"ragged gain vs length spread: vit-b16 widths, {SPREAD_LAYERS} layers, batch {SPREAD_BATCH}, "
                f"mean length {SPREAD_MEAN}, {str(DTYPE).removeprefix('torch.')}")


@cache
def trained_spread() -> dict:
    """The CV of the keep counts the shipped shapes CLIP's vision tower gives 64 held-out scenes (TEST_SEED) with
    MADTP applied (alignment tokens at their seed-0 initialisation) at the temperature closest to 50% GFLOPs:
    the mean over its pruning layers of std / mean of the rows each sample keeps."""
    from madtp.data.shapes import ShapesDataset, collate
    from madtp.pretrained import TEST_SEED, load_shapes_clip, shapes_config
    from transformers import CLIPVisionModel as Vision

    torch.manual_seed(0)
    clip, _ = load_shapes_clip()
    tower = Vision(clip.config.vision_config).eval()
    tower.load_state_dict(clip.vision_model.state_dict())
    data = ShapesDataset(64, shapes_config(clip), TEST_SEED)
    pixels = collate([data[i] for i in range(len(data))])["pixel_values"]
    dense = madtp.count_flops(tower, pixel_values=pixels)["vision"]
    pruned = madtp.apply(tower, madtp.MADTPConfig(prune_text=False))
    lo, hi, best = math.log(1e-3), math.log(1e2), None
    for _ in range(8):
        mid = (lo + hi) / 2
        madtp.set_temperature(pruned, vision=math.exp(mid))
        f = madtp.count_flops(pruned, **{"pixel_values": pixels})["vision"] / dense
        if best is None or abs(f - 0.5) < abs(best[1] - 0.5):
            best = (math.exp(mid), f)
        lo, hi = (mid, hi) if f > 0.5 else (lo, mid)
    madtp.set_temperature(pruned, vision=best[0])
    pruned(pixel_values=pixels)
    kept = [r.double() for _, r in sorted(madtp.pruning_report(pruned).items())]
    cvs = [float(r.std(unbiased=False) / r.mean()) for r in kept]
    return {"cv": sum(cvs) / len(cvs), "layer_cvs": [round(c, 4) for c in cvs], "temperature": best[0],
            "gflops_fraction": best[1], "scenes": len(data)}


def spread_lengths(cv: float, batch: int = SPREAD_BATCH, mean: int = SPREAD_MEAN,
                   longest: int = SPREAD_TOKENS) -> torch.Tensor:
    """`batch` lengths with mean `mean` and population CV `cv` (standardised normal draws, seed 0, rounded and
    clipped to [1, longest]; the realised mean and CV are recorded beside the target)."""
    z = torch.randn(batch, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (z - z.mean()) / z.std(unbiased=False) if cv > 0 else torch.zeros(batch, dtype=torch.float64)
    return (mean * (1 + cv * z)).round().clamp(1, longest).to(torch.int64)


class StackLayer(torch.nn.Module):
    """A pre-LN ViT encoder layer whose attention runs packed (varlen_attention) or padded (SDPA + key mask)."""

    def __init__(self, width=SPREAD_WIDTH, heads=SPREAD_HEADS, mlp=SPREAD_MLP):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.fc1, self.fc2 = torch.nn.Linear(width, mlp), torch.nn.Linear(mlp, width)

    def _mlp(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

    def packed(self, x, layout):            # x [T, C]
        import madtp_kernels as mk

        q, k, v = self.qkv(self.ln1(x)).view(x.shape[0], 3, self.heads, -1).unbind(1)
        return self._mlp(x + self.proj(mk.varlen_attention(q, k, v, layout).flatten(1)))

    def padded(self, x, key_mask):          # x [B, L, C], key_mask bool [B, 1, 1, L]
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self._mlp(x + self.proj(att.transpose(1, 2).reshape(b, n, c)))


@cache
def spread_stack():
    torch.manual_seed(0)
    return torch.nn.ModuleList(StackLayer() for _ in range(SPREAD_LAYERS)).eval().to(DEVICE, DTYPE)


def spread_inputs(lengths: torch.Tensor):
    import madtp_kernels as mk

    g = torch.Generator().manual_seed(1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    layout = mk.RaggedLayout.from_cu_seqlens(cu.to(DEVICE))
    packed = torch.randn(int(cu[-1]), SPREAD_WIDTH, generator=g).to(DEVICE, DTYPE)
    longest = int(lengths.max())
    padded = mk.unpack(packed, layout.cu_seqlens, max_len=longest)
    valid = torch.arange(longest, device=DEVICE) < lengths.to(DEVICE)[:, None]
    return packed, layout, padded, valid[:, None, None, :]


def _stack_forward(execution, stack, packed, layout, padded, key_mask):
    x = packed if execution == "ragged" else padded
    for layer in stack:
        x = layer.packed(x, layout) if execution == "ragged" else layer.padded(x, key_mask)
    return x


def stack_flops(lengths: torch.Tensor, execution: str) -> int:
    """GEMM + attention FLOPs the execution performs (padded: every sample at the longest length)."""
    n = lengths.long() if execution == "ragged" else torch.full_like(lengths.long(), int(lengths.max()))
    gemm = 2 * int(n.sum()) * SPREAD_WIDTH * (4 * SPREAD_WIDTH + 2 * SPREAD_MLP)
    attention = 4 * SPREAD_WIDTH * int((n ** 2).sum())
    return SPREAD_LAYERS * (gemm + attention)


SPREADS = [*(f"cv {cv}" for cv in SPREAD_CVS), "trained"]
# spread-major: each spread's padded and ragged rows run back to back (the result is their ratio)
SPREAD_VARIANTS = [(spread, execution) for spread in SPREADS for execution in ("padded", "ragged")]


@pytest.mark.parametrize("spread,execution", SPREAD_VARIANTS, ids=[f"{s}-{e}" for s, e in SPREAD_VARIANTS])
def test_ragged_gain_vs_spread(benchmark, spread, execution):
    trained = trained_spread() if spread == "trained" else None
    cv = trained["cv"] if trained else float(spread.removeprefix("cv "))
    lengths = spread_lengths(cv)
    stack = spread_stack()
    args = (stack, *spread_inputs(lengths))
    fn = lambda: _stack_forward(execution, *args)  # noqa: E731
    if execution == "ragged":   # both executions compute the same rows: checked once, outside the timing
        valid = args[4][:, 0, 0, :]
        torch.testing.assert_close(fn(), _stack_forward("padded", *args)[valid],
                                   **(dict(atol=1e-3, rtol=1e-3) if DTYPE == torch.float32 else
                                      dict(atol=2e-2, rtol=1e-2)))   # fp16: SDPA and varlen round differently
    benchmark.group = SPREAD_GROUP
    extra = {}
    if execution == "ragged":
        from conftest import paired_speedup

        extra["paired_gain"] = round(paired_speedup(lambda: _stack_forward("padded", *args), fn,
                                                    5 if not ON_GPU else 20), 4)
    realised = lengths.double()
    weights = sum(p.numel() * p.element_size() for p in stack.parameters())
    record(benchmark, backend=execution, bytes_moved=weights, flops=stack_flops(lengths, execution),
           execution=execution, spread=spread, cv_target=round(cv, 4),
           cv=round(float(realised.std(unbiased=False) / realised.mean()), 4),
           mean_len=round(float(realised.mean()), 2),
           min_len=int(lengths.min()), max_len=int(lengths.max()), batch=SPREAD_BATCH, layers=SPREAD_LAYERS,
           width=SPREAD_WIDTH, heads=SPREAD_HEADS, mlp=SPREAD_MLP,
           **{f"trained_{k}": v for k, v in (trained or {}).items()}, **extra)
    timed(benchmark, fn)
