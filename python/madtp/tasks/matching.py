"""Image-text matching (NLVR2-style binary classification: is the caption true of the image?) for the Trainer.

    ImageTextMatching()               BlipForImageTextRetrieval (its ITM head) or CLIPModel (+ ClipMatchingHead)
    ClipMatchingHead(bias=0.0)        the one parameter CLIP lacks for this: a decision threshold
    MatchingCollate(tokenize=None)    items {"pixel_values", "caption", "label"} -> batch with "labels" int64 [B]

With BLIP the model's ITM head scores the pair: 2-way cross-entropy on itm_score, logits[:, 1] = match. CLIP has
no pair classifier; its pair logit is ``logit_scale.exp() * cos(image, text) + bias``, binary cross-entropy,
where ``bias`` is the single parameter of a ClipMatchingHead that `prepare(model)` attaches to the model as
``model.matching_head`` (so it trains with the model's optimizer and is saved in its checkpoints). Call
`prepare` before building the optimizer (and before `madtp.compress.make_teacher`, so the teacher has the head
too). NLVR2's image pairs are concatenated side by side into one image by `madtp.data.annotations`: a simple
baseline, not the published two-image model.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .retrieval import TaskOutput, Tokenize, _check_items, _device, _require, _stack_pixels, _to, _tokenizer, unwrap

__all__ = ["ImageTextMatching", "ClipMatchingHead", "MatchingCollate", "HEAD_ATTRIBUTE"]

HEAD_ATTRIBUTE = "matching_head"


class ClipMatchingHead(nn.Module):
    """The threshold of CLIP's pair logit: logit = logit_scale.exp() * cos + bias."""

    def __init__(self, bias: float = 0.0):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, scaled_cosine: Tensor) -> Tensor:
        return scaled_cosine + self.bias


def _kind(model: nn.Module) -> str:
    if hasattr(model, "itm_head"):
        return "blip"
    if hasattr(model, "logit_scale") and hasattr(model, "get_text_features"):
        return "clip"
    raise TypeError(f"model: ImageTextMatching expects a BlipForImageTextRetrieval or a CLIPModel, got "
                    f"{type(model).__name__}")


@dataclass
class ImageTextMatching:
    """Binary image-text matching (see the module docstring). Batches: pixel_values, input_ids, attention_mask,
    labels (1: the caption is true of the image).

    logits(outputs): [B, 2] (BLIP: itm_score; CLIP: [0, pair logit], the same softmax as the sigmoid).
    metric: accuracy (match predicted when logits[:, 1] > logits[:, 0])."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """Attach a ClipMatchingHead to a CLIPModel that has none (in place); BLIP models are left as they are."""
        m = unwrap(model)
        if _kind(m) == "clip" and not isinstance(getattr(m, HEAD_ATTRIBUTE, None), ClipMatchingHead):
            p = next(m.parameters())
            m.add_module(HEAD_ATTRIBUTE, ClipMatchingHead().to(device=p.device, dtype=p.dtype))
        return model

    def model_inputs(self, batch: dict, model: nn.Module | None = None) -> dict:
        _require(batch, "pixel_values", "input_ids", "attention_mask", task="ImageTextMatching")
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        if model is None or _kind(unwrap(model)) == "blip":
            inputs["use_itm_head"] = True
        return inputs

    def cost_inputs(self, batch: dict, model: nn.Module | None = None) -> list[dict]:
        """The one pair pass (BLIP: ITM; CLIP: both encoders).

        The model calls whose GFLOPs are the model's for this task (madtp.compress budgets and reports them)."""
        return [self.model_inputs(batch, model)]

    def _scores(self, model: nn.Module, batch: dict) -> tuple[Tensor, object]:
        m = unwrap(model)
        kind = _kind(m)
        out = model(**self.model_inputs(batch, m))
        if kind == "blip":
            return out.itm_score, out
        head = getattr(m, HEAD_ATTRIBUTE, None)
        if not isinstance(head, ClipMatchingHead):
            raise ValueError("model: a CLIPModel needs ImageTextMatching().prepare(model) first (it attaches the "
                             "learnable threshold model.matching_head); call it before building the optimizer")
        cosine = (out.image_embeds * out.text_embeds).sum(dim=-1)
        z = head(m.logit_scale.exp() * cosine)
        return torch.stack([torch.zeros_like(z), z], dim=1), out

    def forward(self, model: nn.Module, batch: dict) -> tuple[TaskOutput, dict[str, Tensor]]:
        _require(batch, "labels", task="ImageTextMatching")
        logits, out = self._scores(model, batch)
        labels = batch["labels"].long().to(logits.device)
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"labels: expected shape {tuple(logits.shape[:1])}, got {tuple(labels.shape)}")
        # for CLIP's [0, z] this is the binary cross-entropy of the pair logit z
        loss = F.cross_entropy(logits.float(), labels)
        acc = ((logits[:, 1] > logits[:, 0]).long() == labels).float().mean()
        return TaskOutput(logits=logits, output=out), {"loss": loss, "acc": acc.detach()}

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        return self.forward(model, batch)[1]

    def logits(self, outputs) -> Tensor:
        if isinstance(outputs, TaskOutput):
            return outputs.logits
        score = getattr(outputs, "itm_score", None)
        if isinstance(score, Tensor) and score.dim() == 2 and score.shape[1] == 2:
            return score
        raise TypeError(f"outputs: expected a TaskOutput (or a BLIP ITM output), got {type(outputs).__name__}; a "
                        "CLIP pair logit needs the model's matching head: use task.forward(model, batch)")

    @torch.no_grad()
    def metric(self, model: nn.Module, loader: Iterable) -> dict[str, float]:
        m = unwrap(model)
        device = _device(m)
        right = total = 0
        for batch in loader:
            batch = _to(batch, device)
            _require(batch, "labels", task="ImageTextMatching")
            logits, _ = self._scores(m, batch)
            right += int(((logits[:, 1] > logits[:, 0]).long() == batch["labels"].long()).sum())
            total += len(batch["labels"])
        if not total:
            raise ValueError("loader: the eval loader yielded no batches")
        return {"accuracy": right / total}


@dataclass
class MatchingCollate:
    """DataLoader collate_fn for matching items ({"pixel_values", "caption", "label"}:
    `madtp.data.annotations.MatchingDataset`, `madtp.data.shapes.ShapesMatchingDataset`); tokenize as in
    RetrievalCollate."""
    tokenize: Tokenize | None = None

    def __call__(self, items: Sequence[dict]) -> dict:
        _check_items(items, "pixel_values", "caption", "label", what="MatchingCollate")
        ids, mask = _tokenizer(self.tokenize)([item["caption"] for item in items])
        out = {"pixel_values": _stack_pixels(items), "input_ids": ids, "attention_mask": mask,
               "labels": torch.tensor([int(item["label"]) for item in items], dtype=torch.long)}
        if "index" in items[0]:
            out["index"] = torch.tensor([int(item["index"]) for item in items], dtype=torch.long)
        return out
