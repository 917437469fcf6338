"""Data for training and evaluating compressed vision-language models.

shapes: a deterministic synthetic image-caption generator (shapes on photo backgrounds) with hard negatives;
tokenizer: the word-level tokenizer of its captions. Needs scikit-image and tokenizers.
"""
from .shapes import (
    BACKGROUNDS,
    CLIP_MEAN,
    CLIP_STD,
    COLOURS,
    PALETTE,
    RELATIONS,
    SHAPES,
    SIZES,
    WORDS,
    Description,
    ObjectSpec,
    Scene,
    SceneObject,
    ShapesBatch,
    ShapesConfig,
    ShapesDataset,
    ShapesMatchingDataset,
    ShapesSample,
    collate,
    generate,
    hard_negative_descriptions,
    hard_negatives,
    holds,
    load_backgrounds,
    make_sample,
    matching_sample,
    negatives_for,
    normalize,
    num_hard_negatives,
    parse_caption,
    spatial_relation,
)

__all__ = [
    "BACKGROUNDS", "CLIP_MEAN", "CLIP_STD", "COLOURS", "PALETTE", "RELATIONS", "SHAPES", "SIZES", "WORDS",
    "Description", "ObjectSpec", "Scene", "SceneObject", "ShapesBatch", "ShapesConfig", "ShapesDataset",
    "ShapesMatchingDataset", "ShapesSample", "collate", "generate", "hard_negative_descriptions", "hard_negatives",
    "holds", "load_backgrounds", "make_sample", "matching_sample", "negatives_for", "normalize",
    "num_hard_negatives", "parse_caption", "spatial_relation",
]
