"""Visual question answering with a Hugging Face BlipForQuestionAnswering, for the Trainer.

    BlipVQA(max_answer_length=10)
    VQACollate(tokenize=None, answer_bos=None)     items {"pixel_values", "question", ["answer"]} -> batch
    answer_tokens(ids, mask, sep_id) -> list[tuple]     the answer words of each row (start token dropped)

Batches: pixel_values, input_ids / attention_mask (the question), labels / labels_attention_mask (the answer:
start token, words, end token, padding). The answer decoder starts from the model's decoder_start_token_id
(config.text_config.bos_token_id) and stops at sep_token_id, so the answer's first token must be that start id
(`VQACollate(answer_bos=...)` writes it over a tokenizer's own first token, as BLIP writes [DEC] over [CLS]) and
its end token sep_token_id.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .retrieval import TaskOutput, Tokenize, _check_items, _device, _require, _stack_pixels, _to, _tokenizer, unwrap

__all__ = ["BlipVQA", "VQACollate", "answer_tokens"]


def answer_tokens(ids: Tensor, mask: Tensor | None, sep_id: int) -> list[tuple[int, ...]]:
    """Each row's tokens after its first (the start token), up to its first sep_id (or its mask's end)."""
    out = []
    for b, row in enumerate(ids.tolist()):
        n = int(mask[b].sum()) if mask is not None else len(row)
        words = row[1:n]
        if sep_id in words:
            words = words[:words.index(sep_id)]
        out.append(tuple(words))
    return out


def _decoder_ids(model: nn.Module) -> tuple[int, int]:
    m = unwrap(model)
    text = m.config.text_config
    start = getattr(m, "decoder_start_token_id", None)
    return int(text.bos_token_id if start is None else start), int(text.sep_token_id)


@dataclass
class BlipVQA:
    """VQA training: the model's own decoder loss (token cross-entropy of the answer given the question and the
    image; padding excluded, its mean over the micro-batch's answer tokens).

    logits(outputs): the decoder's logits at the positions that predict an answer token, [answer tokens, vocab]
    (padding dropped; the same rows for a teacher run on the same batch).
    metric: accuracy, the exact match of the greedy answer (max_answer_length new tokens) with the batch's answer
    (the annotation's most common answer), compared token for token."""
    max_answer_length: int = 10

    def model_inputs(self, batch: dict) -> dict:
        _require(batch, "pixel_values", "input_ids", "attention_mask", "labels", "labels_attention_mask",
                 task="BlipVQA")
        ids, mask = batch["labels"], batch["labels_attention_mask"]
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "pixel_values": batch["pixel_values"], "decoder_input_ids": ids, "decoder_attention_mask": mask,
                "labels": ids.masked_fill(mask == 0, -100)}

    def forward(self, model: nn.Module, batch: dict) -> tuple[TaskOutput, dict[str, Tensor]]:
        inputs = self.model_inputs(batch)
        m = unwrap(model)
        start, _ = _decoder_ids(m)
        first = batch["labels"][:, 0]
        if not bool((first == start).all()):
            raise ValueError(f"labels: every answer must begin with the decoder's start token {start} "
                             f"(config.text_config.bos_token_id); got first tokens {sorted(set(first.tolist()))}. "
                             f"Use VQACollate(answer_bos={start})")
        captured: dict[str, Tensor] = {}

        def grab(module, args, output):
            captured["logits"] = output.logits if hasattr(output, "logits") else output[0]

        handle = m.text_decoder.register_forward_hook(grab)
        try:
            out = model(**inputs)
        finally:
            handle.remove()
        keep = batch["labels_attention_mask"][:, 1:].bool()
        logits = captured["logits"][:, :-1][keep]
        return TaskOutput(logits=logits, output=out, extras={"decoder_logits": captured["logits"]}), \
            {"loss": out.loss}

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        return self.forward(model, batch)[1]

    def logits(self, outputs) -> Tensor:
        if isinstance(outputs, TaskOutput):
            return outputs.logits
        raise TypeError(f"outputs: expected a TaskOutput, got {type(outputs).__name__} (BLIP's VQA output carries "
                        "no decoder logits: run task.forward(model, batch))")

    @torch.no_grad()
    def answers(self, model: nn.Module, batch: dict) -> list[tuple[int, ...]]:
        """The greedy answer of each sample, as token ids (start and end tokens dropped)."""
        m = unwrap(model)
        _require(batch, "pixel_values", "input_ids", "attention_mask", task="BlipVQA")
        _, sep = _decoder_ids(m)
        generated = m.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=batch["pixel_values"], max_new_tokens=self.max_answer_length,
                               do_sample=False, num_beams=1)
        return answer_tokens(generated, None, sep)

    @torch.no_grad()
    def metric(self, model: nn.Module, loader: Iterable) -> dict[str, float]:
        m = unwrap(model)
        device = _device(m)
        _, sep = _decoder_ids(m)
        right = total = 0
        for batch in loader:
            batch = _to(batch, device)
            _require(batch, "labels", "labels_attention_mask", task="BlipVQA")
            truth = answer_tokens(batch["labels"], batch["labels_attention_mask"], sep)
            right += sum(a == t for a, t in zip(self.answers(m, batch), truth, strict=True))
            total += len(truth)
        if not total:
            raise ValueError("loader: the eval loader yielded no batches")
        return {"accuracy": right / total}


@dataclass
class VQACollate:
    """DataLoader collate_fn for VQA items ({"pixel_values", "question", ["answer"], ["question_id"]}:
    `madtp.data.annotations.VQADataset`). Questions and answers are tokenized with `tokenize` (as in
    RetrievalCollate); answer_bos, when given, replaces each answer's first token. Items without an answer (a
    test split) give a batch without labels."""
    tokenize: Tokenize | None = None
    answer_bos: int | None = None

    def __call__(self, items: Sequence[dict]) -> dict:
        _check_items(items, "pixel_values", "question", what="VQACollate")
        tok = _tokenizer(self.tokenize)
        ids, mask = tok([item["question"] for item in items])
        out = {"pixel_values": _stack_pixels(items), "input_ids": ids, "attention_mask": mask}
        with_answer = ["answer" in item for item in items]
        if any(with_answer):
            if not all(with_answer):
                raise ValueError(f"items: some items have an answer and some do not (items "
                                 f"{[i for i, a in enumerate(with_answer) if not a]} have none)")
            labels, labels_mask = tok([item["answer"] for item in items])
            if self.answer_bos is not None:
                labels = labels.clone()
                labels[:, 0] = self.answer_bos
            out["labels"], out["labels_attention_mask"] = labels, labels_mask
        if all(isinstance(item.get("question_id"), int) for item in items):
            out["question_id"] = torch.tensor([item["question_id"] for item in items], dtype=torch.long)
        return out
