"""Train a small Hugging Face CLIPModel from scratch on the shapes data (CPU is enough), with hard negatives.

    python -m madtp.train_shapes --out DIR --threads 1         # the shipped checkpoint's recipe (defaults)
    python -m madtp.train_shapes --help

Data: ``ShapesDataset`` scenes of one or two objects (four shapes, six colours, two sizes, four relations) snapped
to the 8-pixel patch grid (``DATA_DEFAULTS``, recorded in config.json as ``shapes_data`` so evaluation and the demo
generate the same kind of data); fresh samples every step, everything seeded by ``--seed`` (model init, data,
order), so two runs with the same arguments and thread count give the same weights.

Loss: the CLIP contrastive loss over the batch (image->text and text->image), where the image->text logits of
every image also hold a column for each hard negative caption of the batch (``--negatives`` per image, each
changing one attribute or the relation of the true caption: ``madtp.data.shapes.hard_negatives``; captions that
make the same claim as an image's own caption are masked out), plus three training-only auxiliary terms whose
heads are dropped before saving:
- ``--hard-weight``: each image against its own caption and its own hard negatives (what retrieval is scored on);
- ``--patch-weight``: per-patch shape / colour / size / relation-to-the-other-object heads on the vision tower
  (``PatchLabelled``, ``PatchHeads``);
- ``--bag-weight``: one linear head reads each caption's ``ClaimBag`` (its (attribute, role) pairs) from both the
  image and the text embeddings.
Without the last two, a small CLIP learns shapes, colours and sizes within a few hundred steps but never which
object stands where: relation negatives stay at chance (measured: ~62% top-1 after 1000 steps, every error a
relation); the bag gives both towers a linear target in which "A left of B" and "B left of A" differ.

DIR receives ``config.json`` + ``model.safetensors`` (a ``CLIPModel``: ``madtp.pretrained.load_shapes_clip(DIR)``),
``tokenizer.json``, ``metrics.json`` (held-out top-1 among 10, wall time, threads, arguments) and the per-step log
``metrics.jsonl``. Accuracy is measured on ``--eval-samples`` samples of the held-out seed
``madtp.pretrained.TEST_SEED`` against ``negatives_for(i, 9)``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import pretrained
from .data import shapes as _shapes
from .data import tokenizer as _tok
from .train import Callback, TrainConfig, Trainer, derive_seed, seed_everything

__all__ = ["build_config", "build_model", "ShapesCLIPTask", "LogitScaleClamp", "train_data_seed", "main"]

MAX_LOGIT_SCALE = math.log(100.0)
# The shipped model's data: four shapes that stay distinct at 64 px, objects of 2x2 and 3x3 patches snapped to the
# 8-pixel patch grid (a ViT trained from scratch on CPU learns shapes it sees whole in a few patches far sooner than
# shapes cut at random offsets); objects still cover ~10% of the pixels, so most patches are background.
DATA_DEFAULTS = {"shapes": ("circle", "square", "triangle", "cross"), "small": (0.25, 0.25), "large": (0.375, 0.375),
                 "grid": 8}


def train_data_seed(seed: int) -> int:
    """The data seed of the training set of run ``seed`` (never one of the held-out seeds)."""
    return derive_seed("madtp.train_shapes", seed, "train-data")


def build_config(image_size: int = 64, patch_size: int = 8, vision_width: int = 128, vision_layers: int = 4,
                 text_width: int = 128, text_layers: int = 2, head_dim: int = 32, mlp_ratio: int = 4,
                 projection_dim: int = 128, logit_scale_init: float = math.log(1 / 0.07)):
    """A CLIPConfig sized for the shapes data: text context and vocabulary from the shapes tokenizer."""
    from transformers import CLIPConfig

    for name, width in (("vision_width", vision_width), ("text_width", text_width)):
        if width % head_dim:
            raise ValueError(f"{name}: expected a multiple of head_dim={head_dim}, got {width}")
    if image_size % patch_size:
        raise ValueError(f"image_size: expected a multiple of patch_size={patch_size}, got {image_size}")
    text = dict(**_tok.text_config_kwargs(), hidden_size=text_width, intermediate_size=mlp_ratio * text_width,
                num_hidden_layers=text_layers, num_attention_heads=text_width // head_dim,
                projection_dim=projection_dim)
    vision = dict(hidden_size=vision_width, intermediate_size=mlp_ratio * vision_width,
                  num_hidden_layers=vision_layers, num_attention_heads=vision_width // head_dim,
                  image_size=image_size, patch_size=patch_size, projection_dim=projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim,
                      logit_scale_init_value=logit_scale_init)


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """[1 + grid * grid, width] fixed 2D sine-cosine position codes (MAE's), a zero row for the class token."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    codes = [f(axis.reshape(-1, 1) * omega) for axis in (rows, cols) for f in (torch.sin, torch.cos)]
    table = torch.zeros(1 + grid * grid, width, dtype=torch.float64)
    table[1:, :4 * quarter] = torch.cat(codes, dim=1)
    return table.float()


def build_model(config, seed: int, qk_init_scale: float = 1.0, pos_init: str = "sincos"):
    """A freshly initialised CLIPModel (seeded). ``qk_init_scale`` multiplies the initial query and key projections
    of every attention layer: Hugging Face's CLIP init draws them with std ``width**-0.5 * (2 * layers)**-0.5``, so
    a small model starts with almost uniform attention and sits on a plateau (the q.k saddle) for hundreds of steps
    before it learns where the objects are; ``sqrt(2 * layers)`` (~3) restores ``width**-0.5``. ``pos_init``
    "sincos" starts the (learned) vision position embeddings from 2D sine-cosine codes instead of noise: where each
    object is, which every relation caption is about, is then readable from the first step."""
    if pos_init not in ("sincos", "random"):
        raise ValueError(f"pos_init: expected 'sincos' or 'random', got {pos_init!r}")
    from transformers import CLIPModel

    seed_everything(derive_seed("madtp.train_shapes", seed, "init"))
    model = CLIPModel(config)
    if qk_init_scale != 1.0:
        with torch.no_grad():
            for module in model.modules():
                if all(hasattr(module, n) for n in ("q_proj", "k_proj", "out_proj")):
                    module.q_proj.weight.mul_(qk_init_scale)
                    module.k_proj.weight.mul_(qk_init_scale)
    if pos_init == "sincos":
        vision = config.vision_config
        table = model.vision_model.embeddings.position_embedding.weight
        with torch.no_grad():
            table.copy_(sincos_positions(vision.image_size // vision.patch_size, vision.hidden_size))
    return model


class PatchLabelled(torch.utils.data.Dataset):
    """A ShapesDataset whose items also hold ``patch_labels``: long [4, patches], for every patch covered by an
    object (at least ``min_cover`` of its pixels; the object covering most of it) that object's shape, colour and
    size (1-based indices into the config's lists) and its relation to the other object of the scene (1 + index
    in RELATIONS; 0 in a one-object scene); 0 everywhere for background. Training-only supervision for
    ``PatchHeads``: the relation label asks each object's tokens where they stand relative to the other object, so
    the image summary can hold "red circle, left" and "blue square, right" side by side, which a caption's
    embedding can match whichever object it names first."""

    FIELDS = ("shape", "colour", "size")

    def __init__(self, dataset: _shapes.ShapesDataset, patch_size: int, min_cover: float = 0.2):
        self.dataset, self.patch_size, self.min_cover = dataset, patch_size, min_cover
        cfg = dataset.config
        self.vocab = (cfg.shapes, cfg.colours, _shapes.SIZES, _shapes.RELATIONS)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item, sample = self.dataset.item_and_sample(i)
        p = self.patch_size
        m = sample.masks.float()                                       # [objects, H, W]
        g = m.shape[-1] // p
        cover = m.reshape(m.shape[0], g, p, g, p).mean(dim=(2, 4)).flatten(1)   # [objects, patches]
        best, which = cover.max(dim=0)
        labels = torch.zeros(len(self.vocab), g * g, dtype=torch.long)
        scene = sample.scene
        for j, (o, role) in enumerate(zip(scene.objects, roles(scene.description), strict=True)):
            on = (which == j) & (best >= self.min_cover)
            for a, (field, words) in enumerate(zip(self.FIELDS, self.vocab, strict=False)):
                labels[a, on] = words.index(getattr(o, field)) + 1
            labels[len(self.FIELDS), on] = role
        item["patch_labels"] = labels
        return item


def roles(description) -> list[int]:
    """Per object of a description: 0 when it is alone, else 1 + the index in RELATIONS of its relation to the
    other object."""
    if description.relation is None:
        return [0] * len(description.objects)
    return [1 + _shapes.RELATIONS.index(description.relation),
            1 + _shapes.RELATIONS.index(_shapes.INVERSE_RELATION[description.relation])]


class ClaimBag:
    """A caption's claim as a set of (attribute word, role) pairs: "a small red circle left of a large blue square"
    holds (small, left of), (red, left of), (circle, left of), (large, right of), ... Two objects of a scene always
    have different roles, so the set pins down the whole claim (restatements give the same set), and a sum of
    per-object features can hold it: what an image summary pooled over object tokens and a caption embedding can
    both represent linearly. ``labels(captions)`` -> float [n, size] multi-hot."""

    def __init__(self, config: _shapes.ShapesConfig):
        words = [*config.shapes, *config.colours, *_shapes.SIZES]
        self.index = {w: i for i, w in enumerate(words)}
        self.slots = 1 + len(_shapes.RELATIONS)
        self.size = len(words) * self.slots

    def labels(self, captions) -> torch.Tensor:
        out = torch.zeros(len(captions), self.size)
        for n, caption in enumerate(captions):
            d = _shapes.parse_caption(caption)
            for o, role in zip(d.objects, roles(d), strict=True):
                for w in (o.shape, o.colour, o.size):
                    out[n, self.index[w] * self.slots + role] = 1
        return out


class PatchHeads(nn.Module):
    """Linear heads on the vision tower's last patch states predicting ``PatchLabelled``'s labels (background
    included). Attached to the model during training only, dropped before saving."""

    def __init__(self, width: int, vocab):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleList(nn.Linear(width, len(words) + 1) for words in vocab)

    def loss(self, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.norm(states)
        return sum(nn.functional.cross_entropy(head(h).flatten(0, 1), labels[:, a].flatten())
                   for a, head in enumerate(self.heads)) / len(self.heads)


class ShapesCLIPTask:
    """CLIP contrastive loss with hard negatives (see the module docstring). Batches: ``collate`` of
    ``ShapesDataset(..., num_negatives=k)`` items (of ``PatchLabelled`` ones when ``patch_weight`` > 0: the model
    then carries ``PatchHeads`` as ``model.patch_heads``)."""

    def __init__(self, tokenizer=None, hard_weight: float = 0.0, patch_weight: float = 0.0,
                 bag_weight: float = 0.0, bag: ClaimBag | None = None):
        self.tokenizer = tokenizer
        self.hard_weight = hard_weight
        self.patch_weight = patch_weight
        self.bag_weight, self.bag = bag_weight, bag

    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        captions = batch["captions"]
        negatives = batch.get("negatives") or [[] for _ in captions]
        B = len(captions)
        texts = list(dict.fromkeys([*captions, *(t for row in negatives for t in row)]))   # each text once
        col = {t: i for i, t in enumerate(texts)}
        input_ids, attention_mask = _tok.encode(texts, tokenizer=self.tokenizer)
        device = batch["pixel_values"].device
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    pixel_values=batch["pixel_values"])
        logits = out.logits_per_image                                 # [B, U], scaled cosine similarities
        pos = torch.tensor([col[c] for c in captions], device=device)
        keys = {}
        text_key = torch.tensor([keys.setdefault(pretrained.claim_key(t), len(keys)) for t in texts], device=device)
        row_key = text_key[pos]
        # image i vs text u: a negative unless it states image i's claim (u == pos[i] is the target)
        same = row_key[:, None] == text_key[None, :]
        same[torch.arange(B, device=device), pos] = False
        i2t = nn.functional.cross_entropy(logits.masked_fill(same, float("-inf")), pos)
        # text (caption of image i) vs images: images whose caption states the same claim are not negatives
        t2i_logits = logits[:, pos].t()                                # [B captions, B images]
        same_img = row_key[:, None] == row_key[None, :]
        same_img.fill_diagonal_(False)
        target = torch.arange(B, device=device)
        t2i = nn.functional.cross_entropy(t2i_logits.masked_fill(same_img, float("-inf")), target)
        loss = (i2t + t2i) / 2
        out_logs = {"loss_i2t": i2t.detach(), "loss_t2i": t2i.detach()}
        if negatives[0]:
            # each image against its own caption and its own hard negatives only: what retrieval is scored on
            cols = torch.cat([pos[:, None], torch.tensor([[col[t] for t in row] for row in negatives],
                                                         device=device)], dim=1)
            hard_logits = logits.gather(1, cols)
            hard = nn.functional.cross_entropy(hard_logits, torch.zeros(B, dtype=torch.long, device=device))
            out_logs["loss_hard"] = hard.detach()
            out_logs["acc_hard"] = (hard_logits[:, 0] > hard_logits[:, 1:].max(dim=1).values).float().mean()
            if self.hard_weight:
                loss = loss + self.hard_weight * hard
        inner = model.module if hasattr(model, "module") else model
        if self.patch_weight and "patch_labels" in batch:
            states = out.vision_model_output.last_hidden_state
            patch = inner.patch_heads.loss(states[:, 1:], batch["patch_labels"])
            out_logs["loss_patch"] = patch.detach()
            loss = loss + self.patch_weight * patch
        if self.bag_weight:
            # one linear head reads the ClaimBag from both embeddings: the image's and every text's
            # (the embeddings are unit vectors: scaled to unit-variance entries so the head's logits can grow)
            bce = nn.functional.binary_cross_entropy_with_logits
            scale = out.image_embeds.shape[-1] ** 0.5
            text_bag = bce(inner.bag_head(out.text_embeds * scale), self.bag.labels(texts).to(device))
            image_bag = bce(inner.bag_head(out.image_embeds * scale), self.bag.labels(captions).to(device))
            out_logs["loss_bag"] = (text_bag + image_bag).detach() / 2
            loss = loss + self.bag_weight * (text_bag + image_bag) / 2
        scale = inner.logit_scale
        out_logs["logit_scale"] = scale.detach().exp()
        return {"loss": loss, **out_logs}

    def metric(self, model, loader) -> dict[str, float]:
        r = pretrained.retrieval_report(model, loader=loader, k=loader.dataset.num_negatives + 1,
                                        tokenizer=self.tokenizer)
        return {"top1": r["accuracy"], **{f"err_{k}": v for k, v in r["errors"].items()}}


class LogitScaleClamp(Callback):
    """Keeps the learnable temperature at most 100 (as CLIP does)."""

    def on_step_end(self, trainer, step, logs):
        with torch.no_grad():
            trainer.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


def _optimizer_factory(lr, weight_decay, betas):
    def make(model):
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    return make


def command_line(args: dict) -> str:
    """The command that reruns a training run with these arguments (``--out`` left to the caller)."""
    parts = ["python -m madtp.train_shapes"]
    for k, v in args.items():
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}")
    return " ".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m madtp.train_shapes", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seeds model init, training data and data order")
    g = p.add_argument_group("model")
    g.add_argument("--image-size", type=int, default=64)
    g.add_argument("--patch-size", type=int, default=8)
    g.add_argument("--vision-width", type=int, default=128)
    g.add_argument("--vision-layers", type=int, default=4)
    g.add_argument("--text-width", type=int, default=128)
    g.add_argument("--text-layers", type=int, default=2)
    g.add_argument("--head-dim", type=int, default=32)
    g.add_argument("--mlp-ratio", type=int, default=4)
    g.add_argument("--projection-dim", type=int, default=128)
    g.add_argument("--pos-init", choices=("sincos", "random"), default="sincos",
                   help="initial vision position embeddings (see build_model)")
    g.add_argument("--qk-init-scale", type=float, default=3.0,
                   help="multiplies the initial query/key projections (see build_model)")
    g = p.add_argument_group("data (recorded in config.json as shapes_data; see madtp.data.shapes.ShapesConfig)")
    g.add_argument("--shapes", nargs="+", default=list(DATA_DEFAULTS["shapes"]), choices=_shapes.SHAPES)
    g.add_argument("--small", type=float, nargs=2, default=list(DATA_DEFAULTS["small"]), metavar=("LOW", "HIGH"),
                   help="side of a small object, fraction of the image side")
    g.add_argument("--large", type=float, nargs=2, default=list(DATA_DEFAULTS["large"]), metavar=("LOW", "HIGH"))
    g.add_argument("--grid", type=int, default=DATA_DEFAULTS["grid"],
                   help="snap object boxes to this many pixels (0: anywhere)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--negatives", type=int, default=9, help="hard negative captions per image in training")
    g.add_argument("--hard-weight", type=float, default=1.0,
                   help="weight of an extra loss: each image against its own caption and hard negatives only")
    g.add_argument("--patch-weight", type=float, default=1.0,
                   help="weight of an auxiliary loss: per-patch shape, colour and size heads on the vision tower "
                        "(training only; not in the saved model)")
    g.add_argument("--bag-weight", type=float, default=3.0,
                   help="weight of an auxiliary loss: one linear head reads each caption's ClaimBag from both the "
                        "image and the text embeddings (training only; not in the saved model)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.02)
    g.add_argument("--warmup", type=int, default=50, help="warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--train-samples", type=int, default=None,
                   help="training set size (default: steps x batch size, every example a fresh sample)")
    g.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the run")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers generating the data")
    g.add_argument("--checkpoint-every", type=int, default=0, help="resumable checkpoints every N steps (0: none)")
    g.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in OUT/checkpoints")
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-samples", type=int, default=1000, help="held-out samples for the final accuracy")
    g.add_argument("--val-samples", type=int, default=300, help="held-out samples of the periodic validation")
    g.add_argument("--eval-every", type=int, default=250, help="validate every N steps (0: only at the end)")
    g.add_argument("--save-dtype", choices=("float32", "float16"), default="float32")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "threads", "eval_samples", "val_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    if args.negatives < 0:
        p.error(f"--negatives: expected an int >= 0, got {args.negatives}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, out)
    finally:
        torch.set_num_threads(threads)


def _run(args, out: Path) -> dict:
    t0 = time.perf_counter()
    config = build_config(args.image_size, args.patch_size, args.vision_width, args.vision_layers, args.text_width,
                          args.text_layers, args.head_dim, args.mlp_ratio, args.projection_dim)
    model = build_model(config, args.seed, args.qk_init_scale, args.pos_init)
    model.config.shapes_data = {"shapes": list(args.shapes), "small": list(args.small), "large": list(args.large),
                                "grid": args.grid}
    data_config = pretrained.shapes_config(model)
    tokenizer = _tok.build_tokenizer()
    n_train = args.train_samples or args.steps * args.batch_size
    train = _shapes.ShapesDataset(n_train, data_config, train_data_seed(args.seed), num_negatives=args.negatives)
    if args.patch_weight:
        train = PatchLabelled(train, args.patch_size)
        model.patch_heads = PatchHeads(args.vision_width, train.vocab)
    val = pretrained.retrieval_loader(args.val_samples, pretrained.VAL_SEED, 10, data_config)
    bag = ClaimBag(data_config)
    if args.bag_weight:
        model.bag_head = nn.Linear(args.projection_dim, bag.size)
    task = ShapesCLIPTask(tokenizer, args.hard_weight, args.patch_weight, args.bag_weight, bag)
    tc = TrainConfig(output_dir=str(out), max_steps=args.steps, micro_batch_size=args.batch_size, lr=args.lr,
                     weight_decay=args.weight_decay, warmup_steps=args.warmup, min_lr_ratio=args.min_lr_ratio,
                     grad_clip=args.grad_clip, seed=args.seed, checkpoint_every=args.checkpoint_every,
                     checkpoint_at_end=args.checkpoint_every > 0, resume=args.resume, eval_every=args.eval_every,
                     progress=not args.no_progress, num_workers=args.num_workers, device="cpu", log_every=10)
    with Trainer(model, task, train, tc, collate_fn=_shapes.collate, eval_loader=val if args.eval_every else None,
                 callbacks=[LogitScaleClamp()],
                 optimizer_factory=_optimizer_factory(args.lr, args.weight_decay, tc.betas)) as trainer:
        logs = trainer.fit()
    train_s = time.perf_counter() - t0
    for head in ("patch_heads", "bag_head"):
        if hasattr(model, head):
            delattr(model, head)
    model.eval()
    report = pretrained.retrieval_report(model, args.eval_samples, pretrained.TEST_SEED, 10, config=data_config,
                                         tokenizer=tokenizer, progress=not args.no_progress)
    dtype = {"float32": torch.float32, "float16": torch.float16}[args.save_dtype]
    pretrained.save_clip(model, out, dtype)
    _tok.save_tokenizer(out / pretrained.TOKENIZER_FILE, tokenizer)
    metrics = {
        "task": "image->text top-1 among 10 (true caption + 9 hard negatives, negatives_for)",
        "accuracy": report["accuracy"], "eval": report,
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
        "train_samples": n_train, "final_loss": logs.get("loss"),
        "train_wall_s": round(train_s, 1), "total_wall_s": round(time.perf_counter() - t0, 1),
        "threads": args.threads, "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint_bytes": (out / pretrained.WEIGHTS_FILE).stat().st_size,
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "no_progress", "resume")},
        "command": command_line({k: v for k, v in vars(args).items() if k not in ("out", "no_progress", "resume")}),
    }
    (out / pretrained.METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"held-out top-1/10: {report['accuracy']:.4f} on {report['n']} samples (errors by negative kind: "
          f"{report['errors']}); train {train_s:.0f} s on {args.threads} thread(s); wrote {out}", file=sys.stderr)
    return metrics


if __name__ == "__main__":
    main()
