"""Readers of BLIP's annotation JSON files over local image folders (nothing is downloaded), and a generated
miniature dataset in the same formats.

Formats (each file one JSON list of objects; image paths are relative to ``image_root``)::

    retrieval (COCO / Flickr30K)  {"image": path, "caption": str | [str, ...], "image_id": ...}
                                  BLIP's *_train.json: one caption per entry (an image recurs over entries);
                                  *_val.json / *_test.json: the image's captions as a list.
                                  Optional "negatives": [str, ...] (hard-negative captions; an extension).
    matching (NLVR2)              {"images": [path1, path2], "sentence": str, "label": "True" | "False"}
                                  "images" may hold one path, or "image": path may stand in for it.
    VQA                           {"question_id": int, "image": path, "question": str, "answer": [str, ...]}
                                  "answer" (a list or one string) is absent from test files.

Datasets (map-style; images read with PIL, converted to RGB, resized to image_size x image_size with bicubic
interpolation, as BLIP's eval transform does, and normalised with CLIP's mean and std)::

    RetrievalDataset(annotation_file, image_root, image_size=384)   one item per (image, caption) pair:
        {"pixel_values", "caption", "image_index" (the image's index in .images), "index", ["negatives"]}
    MatchingDataset(annotation_file, image_root, image_size=384)    {"pixel_values", "caption", "label", "index"}
        An NLVR2 pair is one image: the two photos side by side (the second scaled to the first's height), then
        resized to the square. A simple baseline for one-image models, not the published two-image model.
    VQADataset(annotation_file, image_root, image_size=384)
        {"pixel_values", "question", "question_id", "index", ["answers", "answer" (the most common; ties: the
        first given)]}
    read_annotations(path) -> list[dict];  load_image(path, image_size, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor
    write_shapes_annotations(root, n, config=None, seed=None, split="train", num_negatives=0, p_true=0.5)
        -> {"images", "retrieval", "matching", "vqa"}: paths of the generated miniature dataset

Bad input fails early with the file named: a missing annotation file (FileNotFoundError), malformed JSON (line
and column), an entry that is not an object or lacks a key or has a value of the wrong type (entry index and
key), an image that does not exist (checked for every entry when the dataset is built; FileNotFoundError) and an
image that does not decode (when it is read). Format errors are AnnotationError (a ValueError).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .shapes import CLIP_MEAN, CLIP_STD

__all__ = ["AnnotationError", "ImageDecodeError", "read_annotations", "load_image", "RetrievalDataset",
           "MatchingDataset", "VQADataset", "write_shapes_annotations"]


class AnnotationError(ValueError):
    """An annotation file that cannot be used as it is: malformed JSON, a missing key, a wrong value."""


class ImageDecodeError(ValueError):
    """An image file that PIL cannot decode."""


# ------------------------------------------------------------------ reading

def read_annotations(path: str | os.PathLike) -> list[dict]:
    """The entries of an annotation file: a JSON list of objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist" if not path.exists() else
                                f"annotation file {path} is not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e})") from e
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of entries, got a JSON {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise AnnotationError(f"{path}: entry {i}: expected a JSON object, got {type(entry).__name__}")
    return data


def _get(path: Path, i: int, entry: dict, key: str, kind: str, optional: bool = False):
    """entry[key] checked against kind: "str", "strs" (a non-empty list of str), "str|strs", "label", "any"."""
    if key not in entry:
        if optional:
            return None
        raise AnnotationError(f"{path}: entry {i} has no {key!r} key (it has {sorted(entry)})")
    value = entry[key]
    ok = {
        "str": isinstance(value, str),
        "strs": isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value),
        "str|strs": isinstance(value, str) or (isinstance(value, list) and bool(value)
                                               and all(isinstance(v, str) for v in value)),
        "any": True,
    }[kind]
    if not ok:
        expected = {"str": "a string", "strs": "a non-empty list of strings",
                    "str|strs": "a string or a non-empty list of strings"}[kind]
        raise AnnotationError(f"{path}: entry {i}: {key!r} must be {expected}, got {value!r}")
    return value


def _label(path: Path, i: int, value) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    raise AnnotationError(f"{path}: entry {i}: 'label' must be \"True\" or \"False\" (or a bool, 0, 1), got "
                          f"{value!r}")


def load_image(path: str | os.PathLike, image_size: int, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """float32 [3, image_size, image_size]: RGB, bicubic resize, (x / 255 - mean) / std."""
    return _normalize(_resize(_open(Path(path)), image_size), mean, std)


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Image.DecompressionBombError as e:   # PIL refuses it before decoding: a hostile or broken file
        raise ImageDecodeError(f"image {path}: refused, {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"image {path}: cannot decode ({type(e).__name__}: {e})") from e


def _resize(im, image_size: int):
    from PIL import Image

    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return im


def _side_by_side(images):
    from PIL import Image

    if len(images) == 1:
        return images[0]
    height = images[0].height
    scaled = [im if im.height == height else
              im.resize((max(1, round(im.width * height / im.height)), height), Image.Resampling.BICUBIC)
              for im in images]
    canvas = Image.new("RGB", (sum(im.width for im in scaled), height))
    x = 0
    for im in scaled:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


def _normalize(im, mean, std) -> torch.Tensor:
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.height, im.width, 3)
    x = x.permute(2, 0, 1).to(torch.float32) / 255
    return (x - torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)) / \
        torch.tensor(std, dtype=torch.float32).view(3, 1, 1)


class _ImageAnnotations(torch.utils.data.Dataset):
    def __init__(self, annotation_file, image_root, image_size: int = 384, *, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, check_images: bool = True,
                 transform: Callable | None = None):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size: expected an int >= 1, got {image_size!r}")
        for name, v in (("mean", mean), ("std", std)):
            if len(v) != 3:
                raise ValueError(f"{name}: expected 3 numbers (R, G, B), got {v!r}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std: expected numbers > 0, got {std!r}")
        self.annotation_file = Path(annotation_file)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image_root: {self.image_root} is not a directory")
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.transform = transform
        self.entries = read_annotations(self.annotation_file)
        self._parse()
        if check_images:
            self._check_images()

    def _parse(self) -> None:
        raise NotImplementedError

    def _paths(self, i: int) -> list[str]:
        raise NotImplementedError

    def _check_images(self) -> None:
        seen: set[str] = set()
        for i in range(len(self.entries)):
            for rel in self._paths(i):
                if rel in seen:
                    continue
                seen.add(rel)
                if not (self.image_root / rel).is_file():
                    raise FileNotFoundError(f"{self.annotation_file}: entry {i}: image {self.image_root / rel} "
                                            "does not exist")

    def _pixels(self, rels: Sequence[str]) -> torch.Tensor:
        im = _side_by_side([_open(self.image_root / rel) for rel in rels])
        if self.transform is not None:
            return self.transform(im)
        return _normalize(_resize(im, self.image_size), self.mean, self.std)

    def _index(self, i, n: int) -> int:
        if isinstance(i, torch.Tensor):
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"index: expected an int, got {type(i).__name__}")
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"index: expected -{n} <= index < {n}, got {i}")
        return j


class RetrievalDataset(_ImageAnnotations):
    """COCO / Flickr30K retrieval annotations (BLIP format), one item per (image, caption) pair; see the module
    docstring. `.images`: the distinct image paths, `.pairs`: (entry index, image index, caption) per item."""

    def _parse(self) -> None:
        path = self.annotation_file
        self.images: list[str] = []
        image_index: dict[str, int] = {}
        self.pairs: list[tuple[int, int, str]] = []
        self._negatives: dict[int, list[str]] = {}
        for i, entry in enumerate(self.entries):
            image = _get(path, i, entry, "image", "str")
            captions = _get(path, i, entry, "caption", "str|strs")
            negatives = _get(path, i, entry, "negatives", "strs", optional=True)
            if negatives is not None:
                self._negatives[i] = list(negatives)
            g = image_index.setdefault(image, len(self.images))
            if g == len(self.images):
                self.images.append(image)
            for caption in [captions] if isinstance(captions, str) else captions:
                self.pairs.append((i, g, caption))
        if self._negatives and len(self._negatives) != len(self.entries):
            missing = next(i for i in range(len(self.entries)) if i not in self._negatives)
            raise AnnotationError(f"{path}: entry {missing} has no 'negatives' key, while other entries have one "
                                  "(give every entry its negatives, or none)")

    def _paths(self, i: int) -> list[str]:
        return [self.entries[i]["image"]]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i) -> dict:
        i = self._index(i, len(self.pairs))
        entry, g, caption = self.pairs[i]
        item = {"pixel_values": self._pixels([self.images[g]]), "caption": caption, "image_index": g, "index": i}
        if self._negatives:
            item["negatives"] = list(self._negatives[entry])
        return item


class MatchingDataset(_ImageAnnotations):
    """NLVR2 annotations (BLIP format): one item per entry; see the module docstring."""

    def _parse(self) -> None:
        path = self.annotation_file
        self.items: list[tuple[list[str], str, int]] = []
        for i, entry in enumerate(self.entries):
            if "images" in entry:
                images = _get(path, i, entry, "images", "strs")
                if len(images) > 2:
                    raise AnnotationError(f"{path}: entry {i}: 'images' must hold 1 or 2 paths, got {len(images)}")
            elif "image" in entry:
                images = [_get(path, i, entry, "image", "str")]
            else:
                raise AnnotationError(f"{path}: entry {i} has no 'images' key (it has {sorted(entry)})")
            key = "sentence" if "sentence" in entry or "caption" not in entry else "caption"
            sentence = _get(path, i, entry, key, "str")
            label = _label(path, i, _get(path, i, entry, "label", "any"))
            self.items.append((list(images), sentence, label))

    def _paths(self, i: int) -> list[str]:
        return self.items[i][0]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i) -> dict:
        i = self._index(i, len(self.items))
        images, sentence, label = self.items[i]
        return {"pixel_values": self._pixels(images), "caption": sentence, "label": label, "index": i}


def most_common(answers: Sequence[str]) -> str:
    """The most frequent answer; among equally frequent ones the first given."""
    return Counter(answers).most_common(1)[0][0]


class VQADataset(_ImageAnnotations):
    """VQA annotations (BLIP format): one item per question; see the module docstring."""

    def _parse(self) -> None:
        path = self.annotation_file
        self.questions: list[tuple[str, str, object, list[str] | None]] = []
        for i, entry in enumerate(self.entries):
            image = _get(path, i, entry, "image", "str")
            question = _get(path, i, entry, "question", "str")
            qid = _get(path, i, entry, "question_id", "any", optional=True)
            answers = _get(path, i, entry, "answer", "str|strs", optional=True)
            if isinstance(answers, str):
                answers = [answers]
            self.questions.append((image, question, i if qid is None else qid, answers))

    def _paths(self, i: int) -> list[str]:
        return [self.questions[i][0]]

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i) -> dict:
        i = self._index(i, len(self.questions))
        image, question, qid, answers = self.questions[i]
        item = {"pixel_values": self._pixels([image]), "question": question, "question_id": qid, "index": i}
        if answers is not None:
            item["answers"] = list(answers)
            item["answer"] = most_common(answers)
        return item


# ------------------------------------------------------------------ the generated miniature dataset

def _question(scene, j: int, prefer_colour: bool) -> tuple[str, str]:
    """A question about object j of the scene that names it unambiguously, and its answer."""
    obj, others = scene.objects[j], [o for k, o in enumerate(scene.objects) if k != j]
    colour_ok = all((o.size, o.shape) != (obj.size, obj.shape) for o in others)
    shape_ok = all((o.size, o.colour) != (obj.size, obj.colour) for o in others)
    if colour_ok and (prefer_colour or not shape_ok):
        return f"what colour is the {obj.size} {obj.shape}", obj.colour
    return f"what shape is the {obj.size} {obj.colour} object", obj.shape


def write_shapes_annotations(root: str | os.PathLike, n: int, config=None, seed: int | None = None,
                             split: str = "train", num_negatives: int = 0, p_true: float = 0.5) -> dict[str, Path]:
    """Write samples 0 .. n-1 of `madtp.data.shapes` (config, seed) as a miniature dataset under root:

        images/<split>/<i:06d>.png      the images, lossless (read back at config.image_size they equal
                                        ShapesDataset(n, config, seed)[i]["pixel_values"])
        retrieval_<split>.json          BLIP retrieval format: split "train" one caption per entry, any other
                                        split a caption list; with num_negatives, "negatives" (negatives_for)
        matching_<split>.json           NLVR2 format with one image: ShapesMatchingDataset's (caption, label)
        vqa_<split>.json                VQA format: one question per image on the colour or the shape of one of
                                        its objects, named unambiguously ("what colour is the small circle")

    Returns their paths: {"images": the image folder, "retrieval", "matching", "vqa"}; image paths in the JSON
    files are relative to root (pass root as image_root)."""
    from PIL import Image

    from .shapes import ShapesConfig, load_backgrounds, make_sample, matching_sample, negatives_for

    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise ValueError(f"split: expected a name of letters, digits, '_' or '-', got {split!r}")
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 0:
        raise ValueError(f"num_negatives: expected an int >= 0, got {num_negatives!r}")
    cfg = config or ShapesConfig()
    seed = cfg._seed(seed)
    load_backgrounds(cfg)
    root = Path(root)
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    retrieval, matching, vqa = [], [], []
    for i in range(n):
        sample = make_sample(i, cfg, seed)
        rel = f"images/{split}/{i:06d}.png"
        Image.fromarray(sample.image.permute(1, 2, 0).numpy()).save(root / rel)
        entry = {"image": rel, "caption": sample.caption if split == "train" else [sample.caption], "image_id": i}
        if num_negatives:
            entry["negatives"] = negatives_for(i, num_negatives, cfg, seed)
        retrieval.append(entry)
        _, sentence, label, _ = matching_sample(i, cfg, seed, p_true)
        matching.append({"images": [rel], "sentence": sentence, "label": "True" if label else "False",
                         "identifier": f"{split}-{i}"})
        question, answer = _question(sample.scene, i % len(sample.scene.objects), prefer_colour=i % 2 == 0)
        vqa.append({"question_id": i, "image": rel, "question": question, "answer": [answer]})
    paths = {"images": image_dir}
    for name, entries in (("retrieval", retrieval), ("matching", matching), ("vqa", vqa)):
        paths[name] = root / f"{name}_{split}.json"
        tmp = paths[name].with_suffix(".json.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, paths[name])
    return paths
