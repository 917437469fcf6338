"""The small CLIP trained from scratch on the shapes data (``madtp.data.shapes``), shipped with the package.

The checkpoint under ``madtp/assets/shapes_clip/`` was made by ``python -m madtp.train_shapes`` (its command line,
accuracy and wall time are in ``metrics.json`` there): a Hugging Face ``CLIPModel`` (``config.json`` +
``model.safetensors``) and the word-level tokenizer of the captions (``tokenizer.json``). Loading reads safetensors
and JSON only: no pickle, no remote code.

    load_shapes_clip(path=None, *, hf_tokenizer=False, dtype=torch.float32) -> (CLIPModel (eval mode), tokenizer)
    evaluate_retrieval(model, n=1000, seed=TEST_SEED, k=10, batch_size=100, ...) -> float
        top-1 image->text accuracy among k captions: the true one and k-1 hard negatives (negatives_for)
    retrieval_report(...) -> dict   the same, plus which kind of negative (shape, colour, size, relation) won
    shapes_config(model) -> ShapesConfig     the data config the model's image size implies
    SHAPES_CLIP_DIR, VAL_SEED, TEST_SEED
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from .data import shapes as _shapes
from .data import tokenizer as _tok

SHAPES_CLIP_DIR = Path(__file__).resolve().parent / "assets" / "shapes_clip"
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, METRICS_FILE = ("config.json", "model.safetensors", "tokenizer.json",
                                                           "metrics.json")
# Data seeds of the held-out sets. Training data is drawn from seeds derived from the run's seed
# (madtp.train_shapes.train_data_seed), 63-bit hashes that are never these.
VAL_SEED = 10_000_001    # evaluated during training (model selection, hyperparameter search)
TEST_SEED = 20_000_002   # the reported accuracy

__all__ = ["SHAPES_CLIP_DIR", "VAL_SEED", "TEST_SEED", "load_shapes_clip", "evaluate_retrieval",
           "retrieval_report", "shapes_config", "save_clip", "load_clip"]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints

def save_clip(model, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Writes ``config.json`` and ``model.safetensors`` (in ``dtype``, default the model's) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).contiguous()
             .cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    model.config.to_json_file(str(directory / CONFIG_FILE))
    return directory


def _config_errors() -> tuple[type[Exception], ...]:
    try:   # transformers 5 validates config fields through huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:   # pragma: no cover - older huggingface_hub
        return ()
    return (StrictDataclassError,)


def load_clip(directory: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A ``CLIPModel`` from ``config.json`` + ``model.safetensors`` (strict: every weight present, none extra),
    in ``dtype`` and eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"path: {directory} holds no {name} (expected a shapes CLIP checkpoint)")
    try:
        doc = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError(f"expected a JSON object, got a JSON {type(doc).__name__}")
        config = CLIPConfig.from_dict(doc)
        model = CLIPModel(config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, *_config_errors()) as e:
        raise ValueError(f"{directory / CONFIG_FILE}: not a CLIP config ({' '.join(str(e).split())[:300]})") \
            from None
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{directory / WEIGHTS_FILE}: not a readable safetensors file ({e})") from None
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:   # mis-shaped tensors
        raise ValueError(f"{directory / WEIGHTS_FILE}: does not match {CONFIG_FILE} "
                         f"({' '.join(str(e).split())[:300]})") from None
    missing = [k for k in missing if k in dict(model.named_parameters()) or k in model.state_dict()]
    if missing or unexpected:
        raise ValueError(f"path: {directory / WEIGHTS_FILE} does not match {CONFIG_FILE}: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.to(dtype).eval()


def load_shapes_clip(path: str | os.PathLike | None = None, *, hf_tokenizer: bool = False,
                     dtype: torch.dtype = torch.float32):
    """(model, tokenizer): the shipped shapes CLIP (``path`` None) or one written by ``madtp.train_shapes``.

    The tokenizer is a ``tokenizers.Tokenizer`` (pass it to ``madtp.data.tokenizer.encode(texts, tokenizer=tok)``),
    or a ``transformers.PreTrainedTokenizerFast`` with ``hf_tokenizer=True``
    (``tok(texts, padding="max_length", max_length=CONTEXT_LENGTH, return_tensors="pt")``)."""
    directory = Path(path) if path is not None else SHAPES_CLIP_DIR
    model = load_clip(directory, dtype)
    tok_file = directory / TOKENIZER_FILE
    tokenizer = _tok.load_tokenizer(tok_file) if tok_file.is_file() else _tok.build_tokenizer()
    if hf_tokenizer:
        tokenizer = _tok.build_hf_tokenizer(tokenizer)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Retrieval evaluation

def shapes_config(model, **overrides) -> _shapes.ShapesConfig:
    """The data config the model was trained on: ``ShapesConfig(image_size=<the vision tower's>)`` with the
    fields ``madtp.train_shapes`` recorded as ``config.shapes_data`` in config.json (plus ``overrides``)."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", config)
    recorded = getattr(config, "shapes_data", None) or {}
    recorded = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}
    return _shapes.ShapesConfig(**{"image_size": int(vision.image_size), **recorded, **overrides})


@functools.lru_cache(maxsize=1 << 16)
def claim_key(caption: str) -> str:
    """One string per claim: a two-object caption and its swapped restatement share it."""
    return min(d.caption for d in _shapes.parse_caption(caption).restatements())


def negative_kind(caption: str, negative: str) -> str:
    """What the hard negative changed: "shape", "colour", "size" or "relation"."""
    a, b = _shapes.parse_caption(caption), _shapes.parse_caption(negative)
    if len(b.objects) == 2 and b.objects == tuple(reversed(a.objects)):
        b = b.swapped()                      # "B rel A": a relation negative stated the other way round
    if b.objects == a.objects:
        return "relation"
    for oa, ob in zip(a.objects, b.objects, strict=False):
        for field in ("shape", "colour", "size"):
            if getattr(oa, field) != getattr(ob, field):
                return field
    return "relation"


def _unique(texts):
    uniq = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(uniq)}
    return uniq, torch.tensor([where[t] for t in texts], dtype=torch.long)


@torch.no_grad()
def score_candidates(model, pixel_values: torch.Tensor, candidates: list[list[str]], tokenizer=None) -> torch.Tensor:
    """Cosine similarities [B, K] of each image with its K candidate captions (each text encoded once)."""
    flat = [t for row in candidates for t in row]
    uniq, index = _unique(flat)
    device = next(model.parameters()).device
    input_ids, attention_mask = _tok.encode(uniq, tokenizer=tokenizer)
    image = model.get_image_features(pixel_values=pixel_values.to(device)).pooler_output
    text = model.get_text_features(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    text = text.pooler_output
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    text = text[index.to(device)].view(len(candidates), -1, text.shape[-1])
    return torch.einsum("bd,bkd->bk", image.float(), text.float())


def retrieval_correct(scores: torch.Tensor) -> torch.Tensor:
    """bool [B]: the true caption (column 0) scores strictly above every other candidate (a tie is a miss)."""
    return scores[:, 0] > scores[:, 1:].max(dim=1).values


def retrieval_loader(n: int, seed: int, k: int = 10, config: _shapes.ShapesConfig | None = None,
                     batch_size: int = 100):
    """Batches of the held-out set: ``ShapesDataset(n, config, seed, num_negatives=k-1)``; its negatives of item i
    are ``negatives_for(i, k-1, config, seed)``."""
    dataset = _shapes.ShapesDataset(n, config, seed, num_negatives=k - 1)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_shapes.collate)


@torch.no_grad()
def retrieval_report(model, n: int = 1000, seed: int = TEST_SEED, k: int = 10, batch_size: int = 100,
                     config: _shapes.ShapesConfig | None = None, tokenizer=None, loader=None,
                     progress: bool = False) -> dict:
    """Top-1 image->text retrieval among k candidates (the true caption + k-1 hard negatives) on ``n`` held-out
    samples of ``seed``: {"accuracy", "n", "k", "seed", "errors": {kind of the winning negative: count},
    "accuracy_one_object", "accuracy_two_objects"}. ``loader``: batches with pixel_values, captions, negatives
    (default: ``retrieval_loader``)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k: expected an int >= 2, got {k!r}")
    if loader is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected an int >= 1, got {n!r}")
        loader = retrieval_loader(n, seed, k, config or shapes_config(model), batch_size)
    was_training = model.training
    model.eval()
    correct, objects, errors = [], [], {"shape": 0, "colour": 0, "size": 0, "relation": 0}
    try:
        if progress:
            from tqdm.auto import tqdm
            loader = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True)
        for batch in loader:
            cands = [[c, *negs] for c, negs in zip(batch["captions"], batch["negatives"], strict=True)]
            if any(len(row) != k for row in cands):
                raise ValueError(f"loader: expected {k - 1} negatives per sample")
            scores = score_candidates(model, batch["pixel_values"], cands, tokenizer)
            ok = retrieval_correct(scores)
            best = scores[:, 1:].argmax(dim=1)
            for b in range(len(cands)):
                if not ok[b]:
                    errors[negative_kind(cands[b][0], cands[b][1 + int(best[b])])] += 1
            correct.append(ok)
            objects += [1 if len(_shapes.parse_caption(c).objects) == 1 else 2 for c in batch["captions"]]
    finally:
        model.train(was_training)
    ok = torch.cat(correct)
    objs = torch.tensor(objects)

    def acc(mask):
        return float(ok[mask].float().mean()) if mask.any() else float("nan")

    return {"accuracy": float(ok.float().mean()), "n": int(ok.numel()), "k": k, "seed": seed, "errors": errors,
            "accuracy_one_object": acc(objs == 1), "accuracy_two_objects": acc(objs == 2)}


def evaluate_retrieval(model, n: int = 1000, seed: int = TEST_SEED, k: int = 10, batch_size: int = 100,
                       config: _shapes.ShapesConfig | None = None, tokenizer=None, progress: bool = False) -> float:
    """Top-1 image->text accuracy among k candidates per image: its caption and ``negatives_for(i, k-1, config,
    seed)`` (hard negatives: one attribute or the relation changed), over samples 0..n-1 of ``seed``. ``config``
    defaults to ``shapes_config(model)``."""
    return retrieval_report(model, n, seed, k, batch_size, config, tokenizer, progress=progress)["accuracy"]
