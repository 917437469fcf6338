"""Synthetic shapes-on-photos image-caption data, for training and pruning a small CLIP on CPU.

Each scene has one or two flat-coloured shapes drawn on a dimmed, desaturated random crop of one of the photos and
textures scikit-image ships (the ones that load without a download). Objects cover a small part of the image, so most
patches are background: tokens a pruner should learn to drop. Everything is deterministic: sample ``i`` of seed ``s``
depends only on ``(s, i)`` (one ``numpy`` ``SeedSequence([s, i, stream])`` per sample and purpose), never on the order
in which samples are made or on the process (DataLoader workers included).

Vocabulary (module constants; the tokenizer's vocabulary is derived from them, see ``WORDS``)::

    SHAPES    circle square triangle diamond star cross
    COLOURS   red green blue yellow white purple         (RGB in PALETTE)
    SIZES     small large                                 (side = 15-19% / 25-31% of the image side)
    RELATIONS "left of" "right of" "above" "below"       (of the first object named, to the second)

Captions (lowercase words, one template)::

    "a small red circle"
    "a small red circle left of a large blue square"

A relation is true in the strict sense: "A left of B" means A's box lies wholly left of B's box and the two boxes
overlap vertically (so "above"/"below" are false of the same pair); see ``spatial_relation``. The two objects of a
scene always differ in at least one attribute, so a caption's objects identify the image's objects.

Hard negatives (``hard_negatives``) change exactly one thing: the shape, colour or size of one object, or the
relation. The inverse relation is sometimes stated as the swapped sentence ("B left of A" for "A left of B"), which is
the same (false) claim. Negatives are always false of the image (checked with ``holds``), never a restatement of the
true caption, distinct from each other, and drawn from the config's own word lists (a word the positives never use
would give the negatives away).

Public API::

    ShapesConfig(image_size=64, min_objects=1, max_objects=2, seed=0, shapes=SHAPES, colours=COLOURS, ...,
                 grid=0)                               grid > 0: object boxes snap to whole cells of grid px
    ObjectSpec(size, colour, shape)                     .phrase -> "a small red circle"
    Description(objects: tuple[ObjectSpec, ...], relation: str | None)
        .caption, .swapped(), .restatements()
    SceneObject(shape, colour, size, x, y, side)        box: columns [x, x+side), rows [y, y+side)
    Scene(objects, relation, background, image_size)    .description, .caption
    parse_caption(text) -> Description
    spatial_relation(a, b) -> str | None                the relation of box a to box b, if any holds
    holds(description, scene) -> bool                   is the caption true of the scene
    make_sample(index, config=None, seed=None) -> ShapesSample(image uint8 [3,H,W], caption, scene, masks)
    generate(n, config=None, seed=None, start=0) -> ShapesBatch
        .images uint8 [n,3,H,W], .pixel_values float32 [n,3,H,W] (CLIP-normalised), .captions, .scenes,
        .masks bool [n, max_objects, H, W] (object j as named j-th in the caption)
    hard_negatives(scene, k, rng=None, config=None) -> list[str]           k false captions
    hard_negative_descriptions(scene, k, rng=None, config=None) -> list[Description]
    num_hard_negatives(scene, config=None) -> int                          how many exist
    negatives_for(index, k, config=None, seed=None) -> list[str]           seeded by (seed, index)
    matching_sample(index, config=None, seed=None, p_true=0.5) -> (image, caption, label, scene)
    normalize(images uint8 [..., 3, H, W]) -> float32; CLIP_MEAN, CLIP_STD
    load_backgrounds(config=None)                       load and cache the background photos now (datasets do)
    ShapesDataset(n, config=None, seed=None, num_negatives=0)   item: {"pixel_values", "caption", "index",
                                                                       ["negatives"]}; .scene(i)
    ShapesMatchingDataset(n, config=None, seed=None, p_true=0.5)  item: {"pixel_values", "caption", "label",
                                                                          "index"}
    collate(items) -> dict                              stacks tensors, keeps strings as lists (DataLoader collate_fn)

For retrieval among 10 candidates use ``negatives_for(i, 9, config, seed)``: a one-object scene of the full word
lists has 11 hard negatives, a two-object scene 25 or so.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
PALETTE = {
    "red": (225, 30, 30),
    "green": (30, 195, 50),
    "blue": (40, 80, 250),
    "yellow": (245, 225, 25),
    "white": (250, 250, 250),
    "purple": (165, 45, 225),
}
COLOURS = tuple(PALETTE)
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
ARTICLE = "a"
# Every word a caption can contain, sorted: the tokenizer's vocabulary is built from this.
WORDS = tuple(sorted({ARTICLE, *SIZES, *COLOURS, *SHAPES, *(w for r in RELATIONS for w in r.split())}))
MAX_CAPTION_WORDS = 2 * 4 + max(len(r.split()) for r in RELATIONS)

# What a CLIP image processor normalises with (openai/clip-vit-*).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# skimage.data images that load without a network download (scikit-image 0.26). Grayscale ones become RGB.
BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "grass", "gravel", "brick", "camera", "moon", "text",
               "coins", "page", "clock", "cell", "immunohistochemistry", "hubble_deep_field")

# Random streams of one sample: what it draws from SeedSequence([seed, index, stream]).
_SCENE_STREAM, _NEGATIVE_STREAM, _MATCHING_STREAM = 0, 1, 2


def _check_range(name, value, lo=0.0, hi=1.0):
    if (not isinstance(value, tuple) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value)
            or not lo <= value[0] <= value[1] <= hi):
        raise ValueError(f"{name}: expected a tuple (low, high) with {lo} <= low <= high <= {hi}, got {value!r}")


def _check_words(name, value, allowed):
    if not isinstance(value, tuple) or not value or len(set(value)) != len(value) or not set(value) <= set(allowed):
        raise ValueError(f"{name}: expected a non-empty tuple of distinct values from {allowed}, got {value!r}")


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 2
    seed: int = 0
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    small: tuple[float, float] = (0.15, 0.19)          # object side, as a fraction of the image side
    large: tuple[float, float] = (0.25, 0.31)
    min_gap: float = 0.04                              # between the boxes of related objects, fraction of the side
    backgrounds: tuple[str, ...] = BACKGROUNDS
    crop: tuple[float, float] = (0.3, 0.9)             # background crop side, fraction of the photo's shorter side
    background_saturation: tuple[float, float] = (0.15, 0.5)   # 0: grey, 1: the photo's colours
    background_low: tuple[float, float] = (0.04, 0.2)  # background intensities are mapped to [low, low + contrast]
    background_contrast: tuple[float, float] = (0.3, 0.5)
    colour_jitter: int = 12                            # per-channel uniform jitter of an object's colour
    swap_negatives: bool = True                        # may state the inverse relation as the swapped sentence
    grid: int = 0                                      # > 0: object boxes snap to a grid of this many pixels

    def __post_init__(self):
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"image_size: expected an int >= 16, got {self.image_size!r}")
        if self.min_objects not in (1, 2) or self.max_objects not in (1, 2) or self.min_objects > self.max_objects:
            raise ValueError(f"min_objects, max_objects: expected 1 <= min_objects <= max_objects <= 2, got "
                             f"{self.min_objects!r}, {self.max_objects!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")
        _check_words("shapes", self.shapes, SHAPES)
        _check_words("colours", self.colours, COLOURS)
        if not isinstance(self.backgrounds, tuple) or not self.backgrounds \
                or not all(isinstance(b, str) for b in self.backgrounds):
            raise ValueError(f"backgrounds: expected a non-empty tuple of skimage.data names, got {self.backgrounds!r}")
        _check_range("small", self.small, 0.02, 0.45)
        _check_range("large", self.large, 0.02, 0.45)
        if self.small[1] >= self.large[0]:
            raise ValueError(f"small, large: expected small's range below large's, got {self.small}, {self.large}")
        if not 0 <= self.min_gap <= 0.1:
            raise ValueError(f"min_gap: expected a float in [0, 0.1], got {self.min_gap!r}")
        for name in ("crop", "background_saturation", "background_low", "background_contrast"):
            _check_range(name, getattr(self, name))
        if self.crop[0] <= 0:
            raise ValueError(f"crop: expected a low bound > 0, got {self.crop!r}")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 0 \
                or (self.grid and self.image_size % self.grid):
            raise ValueError(f"grid: expected an int >= 0 dividing image_size={self.image_size}, got {self.grid!r}")
        if self.grid and self.max_objects == 2:
            cells = self.image_size // self.grid
            big = max(1, round(self.large[1] * self.image_size / self.grid))
            gap = math.ceil(max(1, round(self.min_gap * self.image_size)) / self.grid)
            if 2 * big + gap > cells:
                raise ValueError(f"grid: two large objects ({big} cells) and the gap ({gap}) do not fit in "
                                 f"{cells} cells; use a smaller grid or smaller objects, got grid={self.grid}")
        if not isinstance(self.colour_jitter, int) or not 0 <= self.colour_jitter <= 40:
            raise ValueError(f"colour_jitter: expected an int in [0, 40], got {self.colour_jitter!r}")

    def _seed(self, seed):
        seed = self.seed if seed is None else seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        return int(seed)


# ---------------------------------------------------------------------------------------------------------------
# Descriptions (what a caption says) and scenes (what the image holds)

@dataclass(frozen=True)
class ObjectSpec:
    size: str
    colour: str
    shape: str

    @property
    def phrase(self) -> str:
        return f"{ARTICLE} {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Description:
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None        # of objects[0] to objects[1]

    @property
    def caption(self) -> str:
        if len(self.objects) == 1:
            return self.objects[0].phrase
        return f"{self.objects[0].phrase} {self.relation} {self.objects[1].phrase}"

    def swapped(self) -> Description:
        """The same claim, the other object first ("B right of A" for "A left of B")."""
        if len(self.objects) != 2:
            return self
        return Description((self.objects[1], self.objects[0]), INVERSE_RELATION[self.relation])

    def restatements(self) -> set[Description]:
        """Every description that makes the same claim (itself included)."""
        return {self, self.swapped()}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    x: int          # left column of the object's square box
    y: int          # top row
    side: int       # box side in pixels

    @property
    def spec(self) -> ObjectSpec:
        return ObjectSpec(self.size, self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]   # in caption order
    relation: str | None               # of objects[0] to objects[1]
    background: str
    image_size: int

    @property
    def description(self) -> Description:
        return Description(tuple(o.spec for o in self.objects), self.relation)

    @property
    def caption(self) -> str:
        return self.description.caption


def parse_caption(text: str) -> Description:
    """The description a caption of this module's template states; ValueError for anything else."""
    words = text.split()

    def phrase(ws):
        if len(ws) != 4 or ws[0] != ARTICLE or ws[1] not in SIZES or ws[2] not in COLOURS or ws[3] not in SHAPES:
            raise ValueError(f"text: expected '{ARTICLE} <size> <colour> <shape>', got {' '.join(ws)!r}")
        return ObjectSpec(ws[1], ws[2], ws[3])

    if len(words) == 4:
        return Description((phrase(words),))
    for relation in RELATIONS:
        r = relation.split()
        if len(words) == 8 + len(r) and words[4:4 + len(r)] == r:
            return Description((phrase(words[:4]), phrase(words[4 + len(r):])), relation)
    raise ValueError(f"text: expected a caption of this module's template, got {text!r}")


def spatial_relation(a: SceneObject, b: SceneObject) -> str | None:
    """The relation of a's box to b's box: left of / right of (disjoint columns, overlapping rows), above / below
    (disjoint rows, overlapping columns), or None when neither holds."""
    rows_overlap = a.y < b.y + b.side and b.y < a.y + a.side
    cols_overlap = a.x < b.x + b.side and b.x < a.x + a.side
    if rows_overlap and a.x + a.side <= b.x:
        return "left of"
    if rows_overlap and b.x + b.side <= a.x:
        return "right of"
    if cols_overlap and a.y + a.side <= b.y:
        return "above"
    if cols_overlap and b.y + b.side <= a.y:
        return "below"
    return None


def holds(description: Description | str, scene: Scene) -> bool:
    """Whether the caption is true of the scene: some assignment of the scene's objects to the caption's objects
    matches every attribute and the relation."""
    if isinstance(description, str):
        description = parse_caption(description)
    if len(description.objects) != len(scene.objects):
        return False
    if len(scene.objects) == 1:
        return description.objects[0] == scene.objects[0].spec
    a, b = scene.objects
    for first, second in ((a, b), (b, a)):
        if (first.spec, second.spec) == description.objects \
                and spatial_relation(first, second) == description.relation:
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------
# Drawing

def _star_polygon(u, v, n, r_outer, r_inner):
    """Inside test of a regular star polygon (n outer vertices, the first pointing up; r_inner = r_outer *
    cos(pi / n) gives the convex regular polygon), by folding the plane into one half-sector."""
    rho = np.hypot(u, v)
    sector = 2 * math.pi / n
    phi = np.mod(np.arctan2(u, -v), sector)
    phi = np.minimum(phi, sector - phi)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    # edge from the outer vertex (r_outer, 0) to the inner vertex at angle sector / 2
    qx, qy = r_inner * math.cos(sector / 2), r_inner * math.sin(sector / 2)
    dx, dy = qx - r_outer, qy
    # inside: on the origin's side of that edge (the origin gives dx*0 - dy*(0 - r_outer) = dy*r_outer > 0)
    return dx * py - dy * (px - r_outer) >= 0


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """u to the right, v down, the box is [-1, 1]^2."""
    if shape == "circle":
        return u * u + v * v <= 0.97
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.84
    if shape == "triangle":         # equilateral, pointing up, centred vertically
        r = 1.12
        return _star_polygon(u, v - r / 4, 3, r, r * math.cos(math.pi / 3))
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "star":             # 5 points; spans [-r, r cos 36deg] vertically before centring
        r = 1.08
        return _star_polygon(u, v - r * (1 - math.cos(math.pi / 5)) / 2, 5, r, 0.45 * r)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")


@functools.lru_cache(maxsize=512)
def _coverage(shape: str, side: int, supersample: int = 4) -> np.ndarray:
    """float32 [side, side]: the fraction of each pixel the shape covers (antialiased by supersampling)."""
    t = (np.arange(side * supersample, dtype=np.float64) + 0.5) / (side * supersample) * 2 - 1
    v, u = np.meshgrid(t, t, indexing="ij")
    inside = _inside(shape, u, v).astype(np.float32)
    cov = inside.reshape(side, supersample, side, supersample).mean(axis=(1, 3))
    cov.setflags(write=False)
    return cov


@functools.lru_cache(maxsize=64)
def _background_source(name: str, min_side: int) -> np.ndarray:
    """float32 [h, w, 3] in [0, 1], downscaled (antialiased) so that its shorter side is about min_side."""
    import skimage.data
    import skimage.transform

    try:
        img = getattr(skimage.data, name)()
    except Exception as e:   # noqa: BLE001 -- a missing name or one that needs a download (pooch)
        raise ValueError(f"backgrounds: skimage.data.{name} does not load offline ({type(e).__name__}: {e})") from e
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.float32)
    elif np.issubdtype(img.dtype, np.integer):
        img = img.astype(np.float32) / np.iinfo(img.dtype).max
    else:
        img = img.astype(np.float32)
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"backgrounds: skimage.data.{name} is not an image (shape {img.shape})")
    short = min(img.shape[:2])
    if short > min_side:
        scale = min_side / short
        out_shape = (max(1, round(img.shape[0] * scale)), max(1, round(img.shape[1] * scale)), 3)
        img = skimage.transform.resize(img, out_shape, anti_aliasing=True, preserve_range=True).astype(np.float32)
    img = np.ascontiguousarray(np.clip(img, 0, 1))
    img.setflags(write=False)
    return img


def load_backgrounds(config: ShapesConfig | None = None) -> None:
    """Loads and converts every background of the config now (once per process; the datasets call this, so
    DataLoader workers forked later inherit them)."""
    cfg = config or ShapesConfig()
    for name in cfg.backgrounds:
        _background_source(name, 3 * cfg.image_size)


def _background(rng: np.random.Generator, cfg: ShapesConfig, name: str) -> np.ndarray:
    H = cfg.image_size
    src = _background_source(name, 3 * H)
    h, w, _ = src.shape
    c = rng.uniform(*cfg.crop) * min(h, w)
    r0, c0 = rng.uniform(0, h - c), rng.uniform(0, w - c)
    flip = rng.random() < 0.5

    def axis(start, n_src):
        pos = np.clip(start + (np.arange(H) + 0.5) * (c / H) - 0.5, 0, n_src - 1)
        i0 = np.floor(pos).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_src - 1)
        return i0, i1, (pos - i0).astype(np.float32)

    y0, y1, wy = axis(r0, h)
    x0, x1, wx = axis(c0, w)
    if flip:
        x0, x1, wx = x0[::-1], x1[::-1], wx[::-1]
    wy, wx = wy[:, None, None], wx[None, :, None]
    top = src[y0[:, None], x0[None, :]] * (1 - wx) + src[y0[:, None], x1[None, :]] * wx
    bottom = src[y1[:, None], x0[None, :]] * (1 - wx) + src[y1[:, None], x1[None, :]] * wx
    img = top * (1 - wy) + bottom * wy
    grey = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img = grey[:, :, None] + rng.uniform(*cfg.background_saturation) * (img - grey[:, :, None])
    low, contrast = rng.uniform(*cfg.background_low), rng.uniform(*cfg.background_contrast)
    return low + contrast * img


def _place(rng, H: int, gap: int, sides, relation):
    """Top-left corners (x, y) of the objects' boxes in an H x H image, the relation true of objects[0] to
    objects[1] with at least ``gap`` between the boxes."""
    if relation is None:
        return [(int(rng.integers(0, H - s + 1)), int(rng.integers(0, H - s + 1))) for s in sides]
    horizontal = relation in ("left of", "right of")
    first_low = relation in ("left of", "above")        # objects[0] has the smaller column / row
    s_lo, s_hi = (sides[0], sides[1]) if first_low else (sides[1], sides[0])
    while True:
        lo = int(rng.integers(0, H - s_lo - s_hi - gap + 1))
        hi = int(rng.integers(lo + s_lo + gap, H - s_hi + 1))
        # the other axis: box centres within a quarter of the smaller side, so the boxes overlap there
        cross_lo = int(rng.integers(0, H - s_lo + 1))
        offset = rng.uniform(-0.25, 0.25) * min(s_lo, s_hi)
        cross_hi = int(np.clip(round(cross_lo + s_lo / 2 + offset - s_hi / 2), 0, H - s_hi))
        if cross_lo < cross_hi + s_hi and cross_hi < cross_lo + s_lo:
            break
    pos_lo, pos_hi = ((lo, cross_lo), (hi, cross_hi)) if horizontal else ((cross_lo, lo), (cross_hi, hi))
    return [pos_lo, pos_hi] if first_low else [pos_hi, pos_lo]


def _sample_scene(rng: np.random.Generator, cfg: ShapesConfig) -> Scene:
    H = cfg.image_size
    n_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    while True:
        specs = [ObjectSpec(SIZES[rng.integers(len(SIZES))], cfg.colours[rng.integers(len(cfg.colours))],
                            cfg.shapes[rng.integers(len(cfg.shapes))]) for _ in range(n_objects)]
        if len(set(specs)) == n_objects:
            break
    sides = [max(3, round(rng.uniform(*(cfg.small if s.size == "small" else cfg.large)) * H)) for s in specs]
    relation = RELATIONS[rng.integers(len(RELATIONS))] if n_objects == 2 else None
    gap = max(1, round(cfg.min_gap * H))
    if cfg.grid:   # place and size in whole grid cells
        g = cfg.grid
        cells = [max(1, round(s / g)) for s in sides]
        corners = [(x * g, y * g) for x, y in _place(rng, H // g, math.ceil(gap / g), cells, relation)]
        sides = [c * g for c in cells]
    else:
        corners = _place(rng, H, gap, sides, relation)
    background = cfg.backgrounds[rng.integers(len(cfg.backgrounds))]
    objects = tuple(SceneObject(s.shape, s.colour, s.size, x, y, side)
                    for s, (x, y), side in zip(specs, corners, sides, strict=True))
    return Scene(objects, relation, background, H)


def _render(rng: np.random.Generator, cfg: ShapesConfig, scene: Scene):
    """uint8 [H, W, 3] image and bool [max_objects, H, W] masks (coverage >= 1/2)."""
    H = cfg.image_size
    img = _background(rng, cfg, scene.background)
    masks = np.zeros((cfg.max_objects, H, H), dtype=bool)
    for j, o in enumerate(scene.objects):
        cov = _coverage(o.shape, o.side)[:, :, None]
        colour = np.asarray(PALETTE[o.colour], dtype=np.float32)
        if cfg.colour_jitter:
            colour = colour + rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, size=3)
        colour = np.clip(colour, 0, 255) / 255
        box = img[o.y:o.y + o.side, o.x:o.x + o.side]
        img[o.y:o.y + o.side, o.x:o.x + o.side] = box * (1 - cov) + colour * cov
        masks[j, o.y:o.y + o.side, o.x:o.x + o.side] = cov[:, :, 0] >= 0.5
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), masks


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream]))


def _check_index(index) -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index: expected an int >= 0, got {index!r}")
    return int(index)


# ---------------------------------------------------------------------------------------------------------------
# Samples and batches

@dataclass(frozen=True)
class ShapesSample:
    image: torch.Tensor        # uint8 [3, H, W]
    caption: str
    scene: Scene
    masks: torch.Tensor        # bool [max_objects, H, W]: object j (caption order) covers the pixel


@dataclass(frozen=True)
class ShapesBatch:
    images: torch.Tensor       # uint8 [n, 3, H, W]
    captions: list[str]
    scenes: list[Scene]
    masks: torch.Tensor        # bool [n, max_objects, H, W]

    @property
    def pixel_values(self) -> torch.Tensor:
        """float32 [n, 3, H, W], normalised as a CLIP image processor does."""
        return normalize(self.images)

    def __len__(self) -> int:
        return len(self.captions)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32, (x / 255 - CLIP_MEAN) / CLIP_STD per channel."""
    if images.dtype != torch.uint8 or images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"images: expected uint8 [..., 3, H, W], got {images.dtype} {tuple(images.shape)}")
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (images.to(torch.float32) / 255 - mean) / std


def make_sample(index: int, config: ShapesConfig | None = None, seed: int | None = None) -> ShapesSample:
    """Sample `index` of `seed` (default config.seed): a function of (config, seed, index) only."""
    cfg = config or ShapesConfig()
    rng = _rng(cfg._seed(seed), _check_index(index), _SCENE_STREAM)
    scene = _sample_scene(rng, cfg)
    image, masks = _render(rng, cfg, scene)
    return ShapesSample(torch.from_numpy(image).permute(2, 0, 1).contiguous(), scene.caption, scene,
                        torch.from_numpy(masks))


def generate(n: int, config: ShapesConfig | None = None, seed: int | None = None, start: int = 0) -> ShapesBatch:
    """Samples start .. start + n - 1 (the same as ShapesDataset(.., seed)[i])."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    cfg = config or ShapesConfig()
    seed = cfg._seed(seed)
    start = _check_index(start)
    H = cfg.image_size
    images = torch.empty((n, 3, H, H), dtype=torch.uint8)
    masks = torch.empty((n, cfg.max_objects, H, H), dtype=torch.bool)
    captions, scenes = [], []
    for i in range(n):
        s = make_sample(start + i, cfg, seed)
        images[i], masks[i] = s.image, s.masks
        captions.append(s.caption)
        scenes.append(s.scene)
    return ShapesBatch(images, captions, scenes, masks)


# ---------------------------------------------------------------------------------------------------------------
# Hard negatives

def _candidates(description: Description, cfg: ShapesConfig, rng: np.random.Generator):
    """Every hard negative, grouped by what it changes: {"shape"|"colour"|"size"|"relation": [Description]}."""
    objs = description.objects
    groups: dict[str, list[Description]] = {"shape": [], "colour": [], "size": [], "relation": []}
    choices = {"shape": cfg.shapes, "colour": cfg.colours, "size": SIZES}
    for j, o in enumerate(objs):
        for attribute, values in choices.items():
            for value in values:
                if value == getattr(o, attribute):
                    continue
                changed = ObjectSpec(**{**o.__dict__, attribute: value})
                new = objs[:j] + (changed,) + objs[j + 1:]
                if len(set(new)) != len(new):       # two identical objects: never a generated caption
                    continue
                groups[attribute].append(Description(new, description.relation))
    if len(objs) == 2:
        for relation in RELATIONS:
            if relation == description.relation:
                continue
            neg = Description(objs, relation)
            if cfg.swap_negatives and relation == INVERSE_RELATION[description.relation] and rng.random() < 0.5:
                neg = neg.swapped()                  # "B rel A": the same false claim, word order changed
            groups["relation"].append(neg)
    return {k: v for k, v in groups.items() if v}


def _description(scene: Scene | Description | str) -> Description:
    if isinstance(scene, Scene):
        return scene.description
    if isinstance(scene, str):
        return parse_caption(scene)
    if isinstance(scene, Description):
        return scene
    raise TypeError(f"scene: expected a Scene, Description or caption, got {type(scene).__name__}")


def num_hard_negatives(scene: Scene | Description | str, config: ShapesConfig | None = None) -> int:
    cfg = config or ShapesConfig()
    return sum(len(v) for v in _candidates(_description(scene), cfg, np.random.default_rng(0)).values())


def hard_negative_descriptions(scene: Scene | Description | str, k: int, rng=None,
                               config: ShapesConfig | None = None) -> list[Description]:
    """k distinct false descriptions, each changing one attribute of one object or the relation. The kinds of
    change (shape, colour, size, relation) take turns in a random order, so every kind is represented when k
    allows. rng: a numpy Generator or an int seed (None: 0)."""
    cfg = config or ShapesConfig()
    description = _description(scene)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(0 if rng is None else rng)
    groups = _candidates(description, cfg, rng)
    available = sum(len(v) for v in groups.values())
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= available:
        raise ValueError(f"k: expected an int in [0, {available}] (the hard negatives of {description.caption!r} "
                         f"with this config), got {k!r}")
    pools = {kind: [group[i] for i in rng.permutation(len(group))] for kind, group in groups.items()}
    kinds = [list(pools)[i] for i in rng.permutation(len(pools))]
    out: list[Description] = []
    while len(out) < k:
        for kind in kinds:
            if pools[kind] and len(out) < k:
                out.append(pools[kind].pop())
    return out


def hard_negatives(scene: Scene | Description | str, k: int, rng=None,
                   config: ShapesConfig | None = None) -> list[str]:
    """k distinct false captions for the scene (for K-way retrieval pass k = K - 1); see
    hard_negative_descriptions."""
    return [d.caption for d in hard_negative_descriptions(scene, k, rng, config)]


def negatives_for(index: int, k: int, config: ShapesConfig | None = None, seed: int | None = None) -> list[str]:
    """The k hard negatives of sample `index`, seeded by (seed, index): the same wherever they are asked for."""
    cfg = config or ShapesConfig()
    seed, index = cfg._seed(seed), _check_index(index)
    scene = _sample_scene(_rng(seed, index, _SCENE_STREAM), cfg)
    return hard_negatives(scene, k, _rng(seed, index, _NEGATIVE_STREAM), cfg)


def matching_sample(index: int, config: ShapesConfig | None = None, seed: int | None = None, p_true: float = 0.5):
    """NLVR2-style: (image uint8 [3, H, W], caption, label, scene); label 1 when the caption is true of the image,
    0 when it is one of its hard negatives."""
    cfg = config or ShapesConfig()
    seed = cfg._seed(seed)
    if not 0 <= p_true <= 1:
        raise ValueError(f"p_true: expected a float in [0, 1], got {p_true!r}")
    s = make_sample(index, cfg, seed)
    rng = _rng(seed, index, _MATCHING_STREAM)
    if rng.random() < p_true:
        return s.image, s.caption, 1, s.scene
    return s.image, hard_negatives(s.scene, 1, rng, cfg)[0], 0, s.scene


# ---------------------------------------------------------------------------------------------------------------
# Datasets

class ShapesDataset(torch.utils.data.Dataset):
    """n image-caption pairs generated on the fly; item i depends only on (config, seed, i), so any DataLoader
    (shuffled, with workers) sees the same data. Items: {"pixel_values": float32 [3, H, W] (CLIP-normalised),
    "caption": str, "index": int} and, when num_negatives > 0, "negatives": list[str] (use collate)."""

    def __init__(self, n: int, config: ShapesConfig | None = None, seed: int | None = None, num_negatives: int = 0):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected an int >= 0, got {n!r}")
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 0:
            raise ValueError(f"num_negatives: expected an int >= 0, got {num_negatives!r}")
        self.n = n
        self.config = config or ShapesConfig()
        self.seed = self.config._seed(seed)
        self.num_negatives = num_negatives
        load_backgrounds(self.config)

    def __len__(self) -> int:
        return self.n

    def _index(self, i) -> int:
        if isinstance(i, torch.Tensor):
            i = int(i)
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"index: expected an int, got {type(i).__name__}")
        j = int(i) + self.n if i < 0 else int(i)
        if not 0 <= j < self.n:
            raise IndexError(f"index: expected -{self.n} <= index < {self.n}, got {i}")
        return j

    def sample(self, i: int) -> ShapesSample:
        return make_sample(self._index(i), self.config, self.seed)

    def scene(self, i: int) -> Scene:
        return _sample_scene(_rng(self.seed, self._index(i), _SCENE_STREAM), self.config)

    def item_and_sample(self, i) -> tuple[dict, ShapesSample]:
        """Item ``i`` and the sample it was made from (scene, masks), rendered once."""
        i = self._index(i)
        s = make_sample(i, self.config, self.seed)
        item = {"pixel_values": normalize(s.image), "caption": s.caption, "index": i}
        if self.num_negatives:
            item["negatives"] = hard_negatives(s.scene, self.num_negatives, _rng(self.seed, i, _NEGATIVE_STREAM),
                                               self.config)
        return item, s

    def __getitem__(self, i):
        return self.item_and_sample(i)[0]


class ShapesMatchingDataset(ShapesDataset):
    """NLVR2-style image-caption matching: {"pixel_values", "caption", "label" (1 true, 0 a hard negative),
    "index"}; a fraction p_true of the captions is true."""

    def __init__(self, n: int, config: ShapesConfig | None = None, seed: int | None = None, p_true: float = 0.5):
        super().__init__(n, config, seed)
        if not 0 <= p_true <= 1:
            raise ValueError(f"p_true: expected a float in [0, 1], got {p_true!r}")
        self.p_true = p_true

    def __getitem__(self, i):
        i = self._index(i)
        image, caption, label, _ = matching_sample(i, self.config, self.seed, self.p_true)
        return {"pixel_values": normalize(image), "caption": caption, "label": label, "index": i}


def collate(items: Sequence[dict]) -> dict:
    """DataLoader collate_fn for the datasets' items: tensors stacked, ints to a LongTensor, strings and lists of
    strings kept as Python lists ("captions", "negatives" [B][k])."""
    if not items:
        raise ValueError("items: expected at least one item, got none")
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (int, np.integer)):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out["captions" if key == "caption" else key] = list(values)
    return out
