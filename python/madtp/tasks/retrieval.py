"""Image-text retrieval tasks for the Trainer (CLIP, BLIP), and what all the task modules share.

Every task is a small dataclass with

    forward(model, batch) -> (TaskOutput, dict of losses)    "loss" (the mean over the micro-batch) + logged terms
    loss(model, batch) -> dict                               forward's dict (the Trainer's Task protocol)
    logits(outputs) -> Tensor                                what knowledge distillation matches
    model_inputs(batch) -> dict                              the kwargs of the task's main model call
    cost_inputs(batch) -> list[dict]                         the model calls of the task's inference (below)
    metric(model, loader) -> dict[str, float]                every value in [0, 1]

"The model's GFLOPs" for a task (what `madtp.compress` budgets, controls and reports) are what the task's inference
runs for one sample: the model calls `cost_inputs(batch)` lists, each over the batch's B true pairs, summed, per
pair. CLIP retrieval and matching: the one call `model_inputs` describes. BLIP retrieval: ITC (ranking) and ITM
(re-ranking the pair). Work that only training runs (hard negatives: CLIP's negative captions, BLIP's ITM false
pairs) runs inside `auxiliary_pass(model)`, which the GFLOPs controller and the sensitivity table leave out, so
that they count the same passes as the budget and the report.

`model` may be DDP-wrapped: the main pass goes through `model(...)`, attributes are read from
`getattr(model, "module", model)`. A task that runs several passes (hard negatives, ITC then ITM) leaves the
MADTP records (`model.madtp.records`: what `madtp.alignment_loss`, the pruning report and the distillation
summaries read) as the *main pass* wrote them: the pass over the batch's true image-text pairs that
`model_inputs(batch)` describes. A teacher run as `teacher(**task.model_inputs(batch))` (or through
`madtp.compress.teacher_forward`) therefore computes what the student's records describe, and `task.logits`
accepts that teacher output as well as a TaskOutput wherever the logits are derivable from it.

Batches (made by the collates here and in `matching` / `vqa`, from `madtp.data.annotations` or
`madtp.data.shapes` items): pixel_values float [B, 3, H, W]; input_ids, attention_mask int64 [B, L];
optionally negatives_input_ids / negatives_attention_mask [B, k, L] (k hard-negative captions per image) and
image_index int64 [B] (pairs with equal image_index show the same image). A text equal token for token to an
image's own caption counts as that image's caption (generated data repeats captions across images); other
restatements ("B right of A" for "A left of B") are not recognised at this level.

    ClipRetrieval(use_negatives=True)                 CLIPModel
    BlipRetrieval(temperature=0.07, itc_weight=1.0, itm_weight=1.0, use_provided_negatives=True)
                                                      BlipForImageTextRetrieval
    RetrievalCollate(tokenize=None)                   items -> batch; tokenize: texts -> (ids, mask)
    hf_tokenize(tokenizer, max_length=None)           a Hugging Face tokenizer as such a callable
    retrieval_recall(image_embeds, text_embeds, image_groups, text_keys) -> (i2t R@1, t2i R@1)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TaskOutput", "ClipRetrieval", "BlipRetrieval", "RetrievalCollate", "hf_tokenize", "retrieval_recall",
           "unwrap", "Tokenize", "auxiliary_pass", "in_auxiliary_pass"]

Tokenize = Callable[[Sequence[str]], tuple[Tensor, Tensor]]


@dataclass
class TaskOutput:
    """What a task's forward produced: `logits` for distillation, `output` the model output of the main pass,
    `extras` further tensors (other passes' logits, labels)."""
    logits: Tensor
    output: Any
    extras: dict[str, Tensor] = field(default_factory=dict)


# ------------------------------------------------------------------ shared helpers

def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


_AUXILIARY = "_madtp_auxiliary_passes"


@contextmanager
def auxiliary_pass(model: nn.Module) -> Iterator[None]:
    """Marks the forwards run inside as training-only work (hard negatives): not one of the passes that define
    the task's GFLOPs (`cost_inputs`), so the GFLOPs controller and the sensitivity table do not count them."""
    m = unwrap(model)
    depth = m.__dict__.get(_AUXILIARY, 0)
    m.__dict__[_AUXILIARY] = depth + 1
    try:
        yield
    finally:
        if depth:
            m.__dict__[_AUXILIARY] = depth
        else:
            m.__dict__.pop(_AUXILIARY, None)


def in_auxiliary_pass(model: nn.Module) -> bool:
    """Whether `model` is running inside `auxiliary_pass`."""
    return bool(unwrap(model).__dict__.get(_AUXILIARY, 0))


def _device(model: nn.Module) -> torch.device:
    p = next(unwrap(model).parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _require(batch: Any, *keys: str, task: str) -> None:
    if not isinstance(batch, dict):
        raise TypeError(f"batch: {task} expects a dict of tensors, got {type(batch).__name__}")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"batch: {task} needs the keys {list(keys)}; missing {missing} (got {sorted(batch)})")


def _records(model: nn.Module) -> dict | None:
    """A shallow copy of the MADTP records of the last forward (None on a model without madtp.apply)."""
    records = getattr(getattr(unwrap(model), "madtp", None), "records", None)
    return dict(records) if isinstance(records, dict) else None


def _restore(model: nn.Module, saved: dict | None) -> None:
    if saved is None:
        return
    records = unwrap(model).madtp.records
    records.clear()
    records.update(saved)


def _pad_id(model: nn.Module) -> int:
    cfg = getattr(unwrap(model), "config", None)
    pad = getattr(getattr(cfg, "text_config", cfg), "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _cat_texts(pairs: Sequence[tuple[Tensor, Tensor]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Concatenate (ids, mask) blocks along the batch, right-padding to the longest length."""
    length = max(ids.shape[1] for ids, _ in pairs)
    ids = torch.cat([F.pad(i, (0, length - i.shape[1]), value=pad_id) for i, _ in pairs])
    mask = torch.cat([F.pad(m, (0, length - m.shape[1]), value=0) for _, m in pairs])
    return ids, mask


def text_keys(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """int64 [N]: equal for texts that are equal token for token (padding ignored)."""
    ids = input_ids.masked_fill(attention_mask == 0, -1)
    return torch.unique(ids, dim=0, return_inverse=True)[1]


def _text_tuples(input_ids: Tensor, attention_mask: Tensor) -> list[tuple[int, ...]]:
    return [tuple(row[m.bool()].tolist()) for row, m in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]


def positives(batch: dict) -> Tensor:
    """bool [B, B]: pair i's image and pair j's text belong together (the same text, or the same image)."""
    keys = text_keys(batch["input_ids"], batch["attention_mask"])
    pos = keys[:, None] == keys[None, :]
    if isinstance(batch.get("image_index"), Tensor):
        img = batch["image_index"].to(keys.device)
        pos |= img[:, None] == img[None, :]
    return pos


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against each row's positives weighted equally (one-hot targets: the usual CE)."""
    targets = targets.float()
    targets = targets / targets.sum(dim=1, keepdim=True).clamp_min(1)
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def _features(x) -> Tensor:
    """get_*_features returns a tensor (transformers < 5) or an output whose pooler_output is projected."""
    return x if isinstance(x, Tensor) else x.pooler_output


def _image_groups(batch: dict, offset: int) -> list[int]:
    for key in ("image_index", "index"):
        if isinstance(batch.get(key), Tensor):
            return batch[key].tolist()
    return list(range(offset, offset + batch["pixel_values"].shape[0]))


def retrieval_recall(image_embeds: Tensor, text_embeds: Tensor, image_groups: Sequence[int],
                     text_keys: Sequence[Any]) -> tuple[float, float]:
    """Recall@1 both ways over a whole eval set of N pairs: pair n shows image `image_groups[n]` with a text
    whose identity is `text_keys[n]`. Each distinct image is scored once (its first pair's embedding) against
    all N texts; a retrieved text is right when it equals one of the image's own texts. Each text is scored
    against the distinct images; a retrieved image is right when the text is one of its texts. Ties go to the
    lowest index (argmax)."""
    n = image_embeds.shape[0]
    if text_embeds.shape[0] != n or len(image_groups) != n or len(text_keys) != n:
        raise ValueError(f"image_embeds, text_embeds, image_groups, text_keys: expected {n} pairs each, got "
                         f"{text_embeds.shape[0]}, {len(image_groups)}, {len(text_keys)}")
    if n == 0:
        raise ValueError("image_embeds: the eval set is empty")
    first: dict[int, int] = {}
    owned: dict[int, set] = {}
    for i, (g, key) in enumerate(zip(image_groups, text_keys, strict=True)):
        first.setdefault(g, i)
        owned.setdefault(g, set()).add(key)
    groups = list(first)
    images = image_embeds[[first[g] for g in groups]].float()
    sim = images @ text_embeds.float().t()                               # [G, N]
    top_text = sim.argmax(dim=1).tolist()
    i2t = sum(text_keys[t] in owned[g] for g, t in zip(groups, top_text, strict=True)) / len(groups)
    top_image = sim.argmax(dim=0).tolist()
    t2i = sum(text_keys[n_] in owned[groups[g]] for n_, g in enumerate(top_image)) / n
    return float(i2t), float(t2i)


# ------------------------------------------------------------------ collate

def hf_tokenize(tokenizer, max_length: int | None = None) -> Tokenize:
    """texts -> (input_ids, attention_mask) int64 [B, L] with a Hugging Face tokenizer (padded to the longest;
    truncated to max_length when given)."""
    def tokenize(texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        enc = tokenizer(list(texts), padding="longest", truncation=max_length is not None, max_length=max_length,
                        return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()
    return tokenize


def _tokenizer(tokenize: Tokenize | None) -> Tokenize:
    if tokenize is not None:
        return tokenize
    from ..data.tokenizer import encode
    return encode


def _stack_pixels(items: Sequence[dict]) -> Tensor:
    try:
        return torch.stack([item["pixel_values"] for item in items])
    except RuntimeError as e:
        shapes = sorted({tuple(item["pixel_values"].shape) for item in items})
        raise ValueError(f"pixel_values: the items' images differ in shape {shapes}; resize them to one size") from e


def _check_items(items: Sequence[dict], *keys: str, what: str) -> None:
    if not items:
        raise ValueError(f"items: {what} expects at least one item, got none")
    for i, item in enumerate(items):
        missing = [k for k in keys if k not in item]
        if missing:
            raise ValueError(f"items[{i}]: {what} needs the keys {list(keys)}; missing {missing}")


@dataclass
class RetrievalCollate:
    """DataLoader collate_fn for retrieval items ({"pixel_values", "caption", ["negatives"], ["image_index" |
    "index"]}: `madtp.data.annotations.RetrievalDataset`, `madtp.data.shapes.ShapesDataset`). Captions are
    tokenized with `tokenize` (texts -> (ids, mask); None: the shapes tokenizer, `madtp.data.tokenizer.encode`).
    Negatives: every item must carry the same number k; they become negatives_input_ids [B, k, L]."""
    tokenize: Tokenize | None = None

    def __call__(self, items: Sequence[dict]) -> dict:
        _check_items(items, "pixel_values", "caption", what="RetrievalCollate")
        tok = _tokenizer(self.tokenize)
        ids, mask = tok([item["caption"] for item in items])
        out = {"pixel_values": _stack_pixels(items), "input_ids": ids, "attention_mask": mask}
        if "negatives" in items[0]:
            counts = {len(item.get("negatives", ())) for item in items}
            if len(counts) != 1:
                raise ValueError(f"negatives: every item must have the same number of hard negatives, got "
                                 f"{sorted(counts)}")
            k = counts.pop()
            if k:
                nids, nmask = tok([t for item in items for t in item["negatives"]])
                out["negatives_input_ids"] = nids.reshape(len(items), k, -1)
                out["negatives_attention_mask"] = nmask.reshape(len(items), k, -1)
        for key in ("image_index", "index"):
            if key in items[0]:
                out[key] = torch.tensor([int(item[key]) for item in items], dtype=torch.long)
        if "image_index" not in out and "index" in out:
            out["image_index"] = out["index"]   # generated data: one image per sample
        return out


# ------------------------------------------------------------------ CLIP

@dataclass
class ClipRetrieval:
    """CLIP contrastive training on a Hugging Face CLIPModel.

    loss = (i2t + t2i) / 2, InfoNCE on the model's logits_per_image (its learnable logit scale): image i against
    the batch's texts and, with use_negatives and negatives in the batch, its own k hard-negative captions (extra
    columns, target 0); text j against the batch's images. Texts equal to an image's caption and images of the same
    image_index are positives too (soft targets). The negatives' text pass runs first, so the MADTP records are
    those of the paired pass, and as an `auxiliary_pass` (retrieval at inference encodes each text once: the
    model's GFLOPs are the paired pass, `cost_inputs`).

    logits(outputs): logits_per_image [B, B] of the paired pass.
    metric: i2t_r1, t2i_r1 (recall@1 over the whole eval set, `retrieval_recall`) and, when the eval batches carry
    negatives, hard_negative_acc: the image's caption scored strictly above its k hard negatives."""
    use_negatives: bool = True

    def model_inputs(self, batch: dict) -> dict:
        _require(batch, "pixel_values", "input_ids", "attention_mask", task="ClipRetrieval")
        return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}

    def cost_inputs(self, batch: dict) -> list[dict]:
        """The paired pass: each image and each text encoded once (the hard negatives are training-only).

        The model calls whose GFLOPs are the model's for this task (madtp.compress budgets and reports them)."""
        return [self.model_inputs(batch)]

    def forward(self, model: nn.Module, batch: dict) -> tuple[TaskOutput, dict[str, Tensor]]:
        inputs = self.model_inputs(batch)
        m = unwrap(model)
        negatives = batch.get("negatives_input_ids") if self.use_negatives else None
        neg_embeds = None
        if negatives is not None:
            b, k, length = negatives.shape
            mask = batch["negatives_attention_mask"].reshape(b * k, length)
            with auxiliary_pass(model):
                feats = _features(m.get_text_features(input_ids=negatives.reshape(b * k, length),
                                                      attention_mask=mask))
            neg_embeds = F.normalize(feats, dim=-1).reshape(b, k, -1)
        out = model(**inputs)
        logits = out.logits_per_image                                          # [B, B], scaled
        pos = positives(batch)
        i2t_logits, i2t_targets = logits, pos
        logs: dict[str, Tensor] = {}
        if neg_embeds is not None:
            scale = m.logit_scale.exp()
            hard = scale * torch.einsum("bd,bkd->bk", out.image_embeds, neg_embeds.to(out.image_embeds.dtype))
            i2t_logits = torch.cat([logits, hard], dim=1)
            i2t_targets = torch.cat([pos, pos.new_zeros(hard.shape)], dim=1)
            logs["hard_negative_acc"] = (logits.diagonal() > hard.max(dim=1).values).float().mean().detach()
        i2t = soft_cross_entropy(i2t_logits, i2t_targets)
        t2i = soft_cross_entropy(logits.t(), pos.t())
        loss = (i2t + t2i) / 2
        logs = {"loss": loss, "loss_i2t": i2t.detach(), "loss_t2i": t2i.detach(),
                "logit_scale": m.logit_scale.detach().exp(), **logs}
        return TaskOutput(logits=logits, output=out), logs

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        return self.forward(model, batch)[1]

    def logits(self, outputs) -> Tensor:
        if isinstance(outputs, TaskOutput):
            return outputs.logits
        value = getattr(outputs, "logits_per_image", None)
        if not isinstance(value, Tensor):
            raise TypeError(f"outputs: expected a TaskOutput or a CLIPModel output, got {type(outputs).__name__}")
        return value

    @torch.no_grad()
    def metric(self, model: nn.Module, loader: Iterable) -> dict[str, float]:
        m = unwrap(model)
        device = _device(m)
        images, texts, groups, keys = [], [], [], []
        hard_right = hard_total = 0
        for batch in loader:
            batch = _to(batch, device)
            self.model_inputs(batch)
            img = F.normalize(_features(m.get_image_features(pixel_values=batch["pixel_values"])).float(), dim=-1)
            txt = F.normalize(_features(m.get_text_features(input_ids=batch["input_ids"],
                                                            attention_mask=batch["attention_mask"])).float(), dim=-1)
            groups += _image_groups(batch, len(groups))
            keys += _text_tuples(batch["input_ids"], batch["attention_mask"])
            images.append(img.cpu())
            texts.append(txt.cpu())
            negatives = batch.get("negatives_input_ids")
            if negatives is not None:
                b, k, length = negatives.shape
                neg = _features(m.get_text_features(
                    input_ids=negatives.reshape(b * k, length),
                    attention_mask=batch["negatives_attention_mask"].reshape(b * k, length)))
                neg = F.normalize(neg.float(), dim=-1).reshape(b, k, -1)
                true = (img * txt).sum(-1)
                hard = torch.einsum("bd,bkd->bk", img, neg)
                hard_right += int((true > hard.max(dim=1).values).sum())
                hard_total += b
        if not images:
            raise ValueError("loader: the eval loader yielded no batches")
        i2t, t2i = retrieval_recall(torch.cat(images), torch.cat(texts), groups, keys)
        result = {"i2t_r1": i2t, "t2i_r1": t2i}
        if hard_total:
            result["hard_negative_acc"] = hard_right / hard_total
        return result


# ------------------------------------------------------------------ BLIP

def _hardest(sims: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each image (row) the most similar text that is not its own, and for each text (column) the most
    similar image that is not its own: (text index [B], valid [B], image index [B], valid [B])."""
    s = sims.detach().float().masked_fill(pos, float("-inf"))
    text_idx = s.argmax(dim=1)
    image_idx = s.argmax(dim=0)
    return text_idx, torch.isfinite(s.max(dim=1).values), image_idx, torch.isfinite(s.max(dim=0).values)


@dataclass
class BlipRetrieval:
    """BLIP retrieval training on a Hugging Face BlipForImageTextRetrieval: ITC + ITM, as BLIP trains it.

    ITC (use_itm_head=False: cosine similarities of the projected CLS features) / temperature, symmetric InfoNCE
    with the positives of `positives` (BLIP's temperature is a learnable parameter that Hugging Face's model
    does not carry: here it is fixed). ITM (use_itm_head=True), 2-way cross-entropy on the B true pairs and up to
    2B negatives: each image with a false text, each text with a false image, both the hardest of the batch by
    ITC similarity (without gradient); with use_provided_negatives and negatives in the batch, an image's false
    text is its first provided hard negative instead. Pairs with no false partner in the batch are skipped.

    Passes: ITC over the pairs (main pass: `model_inputs`), an ITM pass over the true pairs, then one over the
    negatives (an `auxiliary_pass`); the MADTP records are restored to the ITC pass's afterwards. The model's
    GFLOPs (`cost_inputs`) are what BLIP's retrieval inference runs per pair: ITC (ranking) and ITM (re-ranking),
    each as the Hugging Face model runs it (its ITM call encodes the image again: that is counted too).
    logits(outputs): the ITC logits_per_image = similarities / temperature [B, B].
    metric: i2t_r1, t2i_r1 by ITC over the whole eval set; itm_acc: ITM accuracy on each batch's true pairs and
    one false text per image (provided, else the hardest by ITC); hard_negative_acc (with negatives): the ITM
    match score of the true caption strictly above its k hard negatives'."""
    temperature: float = 0.07
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    use_provided_negatives: bool = True

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature: expected a number > 0, got {self.temperature!r}")

    def model_inputs(self, batch: dict) -> dict:
        _require(batch, "pixel_values", "input_ids", "attention_mask", task="BlipRetrieval")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "pixel_values": batch["pixel_values"], "use_itm_head": False}

    def cost_inputs(self, batch: dict) -> list[dict]:
        """ITC (ranking) and ITM on the true pairs (re-ranking), each as the Hugging Face model runs it.

        The model calls whose GFLOPs are the model's for this task (madtp.compress budgets and reports them): what
        BLIP's retrieval inference runs per pair. The ITM call encodes the image again (the model takes no image
        features), and that second vision pass is counted as it runs."""
        itc = self.model_inputs(batch)
        return [itc, {**itc, "use_itm_head": True}]

    def _negative_pairs(self, batch: dict, sims: Tensor, pos: Tensor, pad_id: int, use_provided: bool):
        """Pixel rows and (ids, mask) blocks of the false pairs."""
        text_idx, text_ok, image_idx, image_ok = _hardest(sims, pos)
        pix, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        provided = batch.get("negatives_input_ids") if use_provided else None
        if provided is not None:
            t_ids, t_mask = provided[:, 0], batch["negatives_attention_mask"][:, 0]
            t_pix = pix
        else:
            t_ids, t_mask, t_pix = ids[text_idx[text_ok]], mask[text_idx[text_ok]], pix[text_ok]
        i_pix, i_ids, i_mask = pix[image_idx[image_ok]], ids[image_ok], mask[image_ok]
        neg_ids, neg_mask = _cat_texts([(t_ids, t_mask), (i_ids, i_mask)], pad_id)
        return torch.cat([t_pix, i_pix]), neg_ids, neg_mask

    def forward(self, model: nn.Module, batch: dict) -> tuple[TaskOutput, dict[str, Tensor]]:
        inputs = self.model_inputs(batch)
        itc = model(**inputs)
        saved = _records(model)
        sims = itc.itm_score                                                    # [B, B] cosine
        logits = sims / self.temperature
        pos = positives(batch)
        loss_itc = (soft_cross_entropy(logits, pos) + soft_cross_entropy(logits.t(), pos.t())) / 2
        pad = _pad_id(model)
        neg_pix, neg_ids, neg_mask = self._negative_pairs(batch, sims, pos, pad, self.use_provided_negatives)
        b, n_neg = pos.shape[0], neg_pix.shape[0]
        # The true pairs apart from the negatives: the first is the inference ITM pass (cost_inputs), the second
        # only training runs. Pruning decides per sample, so the split changes no sample's result.
        itm_true = model(**self.cost_inputs(batch)[1]).itm_score
        itm_false = itm_true[:0]   # a batch of one image and text has no false pair
        if n_neg:
            with auxiliary_pass(model):
                itm_false = model(input_ids=neg_ids, attention_mask=neg_mask, pixel_values=neg_pix,
                                  use_itm_head=True).itm_score
        _restore(model, saved)
        itm_score = torch.cat([itm_true, itm_false])
        labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(n_neg, dtype=torch.long)]).to(sims.device)
        loss_itm = F.cross_entropy(itm_score.float(), labels)
        loss = self.itc_weight * loss_itc + self.itm_weight * loss_itm
        logs = {"loss": loss, "loss_itc": loss_itc.detach(), "loss_itm": loss_itm.detach(),
                "itm_acc": (itm_score.argmax(dim=1) == labels).float().mean().detach()}
        return TaskOutput(logits=logits, output=itc, extras={"itm_logits": itm_score, "itm_labels": labels}), logs

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        return self.forward(model, batch)[1]

    def logits(self, outputs) -> Tensor:
        if isinstance(outputs, TaskOutput):
            return outputs.logits
        score = getattr(outputs, "itm_score", None)
        if not isinstance(score, Tensor) or score.dim() != 2:
            raise TypeError(f"outputs: expected a TaskOutput or the output of model(**model_inputs(batch)), got "
                            f"{type(outputs).__name__}")
        return score / self.temperature

    @torch.no_grad()
    def metric(self, model: nn.Module, loader: Iterable) -> dict[str, float]:
        m = unwrap(model)
        device = _device(m)
        images, texts, groups, keys = [], [], [], []
        itm_right = itm_total = hard_right = hard_total = 0
        pad = _pad_id(m)
        for batch in loader:
            batch = _to(batch, device)
            self.model_inputs(batch)
            pix, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
            vision = m.vision_model(pixel_values=pix)[0]
            img = F.normalize(m.vision_proj(vision[:, 0]).float(), dim=-1)
            text = m.text_encoder(input_ids=ids, attention_mask=mask)[0]
            txt = F.normalize(m.text_proj(text[:, 0]).float(), dim=-1)
            groups += _image_groups(batch, len(groups))
            keys += _text_tuples(ids, mask)
            images.append(img.cpu())
            texts.append(txt.cpu())
            # ITM on the true pairs and one false text per image
            pos = positives(batch)
            text_idx, text_ok, _, _ = _hardest(img @ txt.t(), pos)
            negatives = batch.get("negatives_input_ids")
            if negatives is not None:
                n_ids, n_mask, n_pix = negatives[:, 0], batch["negatives_attention_mask"][:, 0], pix
            else:
                n_ids, n_mask, n_pix = ids[text_idx[text_ok]], mask[text_idx[text_ok]], pix[text_ok]
            all_ids, all_mask = _cat_texts([(ids, mask), (n_ids, n_mask)], pad)
            score = m(input_ids=all_ids, attention_mask=all_mask, pixel_values=torch.cat([pix, n_pix]),
                      use_itm_head=True).itm_score
            labels = torch.cat([torch.ones(len(ids)), torch.zeros(len(n_ids))]).long().to(score.device)
            itm_right += int((score.argmax(dim=1) == labels).sum())
            itm_total += len(labels)
            if negatives is not None:
                b, k, length = negatives.shape
                neg_mask = batch["negatives_attention_mask"].reshape(b * k, length)
                cand_ids, cand_mask = _cat_texts([(ids, mask), (negatives.reshape(b * k, length), neg_mask)], pad)
                # rows: b true pairs, then image i with its negatives i*k .. i*k+k-1
                cand_pix = torch.cat([pix, pix.repeat_interleave(k, dim=0)])
                s = m(input_ids=cand_ids, attention_mask=cand_mask, pixel_values=cand_pix,
                      use_itm_head=True).itm_score.float()
                match = s[:, 1] - s[:, 0]
                hard_right += int((match[:b] > match[b:].reshape(b, k).max(dim=1).values).sum())
                hard_total += b
        if not images:
            raise ValueError("loader: the eval loader yielded no batches")
        i2t, t2i = retrieval_recall(torch.cat(images), torch.cat(texts), groups, keys)
        result = {"i2t_r1": i2t, "t2i_r1": t2i, "itm_acc": itm_right / itm_total}
        if hard_total:
            result["hard_negative_acc"] = hard_right / hard_total
        return result
