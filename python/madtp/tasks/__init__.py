"""Downstream tasks of the MADTP++ pipeline, in the Trainer's Task protocol (`madtp.train.Task`).

    ClipRetrieval, BlipRetrieval      image-text retrieval (InfoNCE / ITC + ITM), recall@1
    ImageTextMatching                 NLVR2-style binary matching (BLIP ITM head, or CLIP + a learned threshold)
    BlipVQA                           visual question answering, exact-match accuracy of greedy answers
    RetrievalCollate, MatchingCollate, VQACollate, hf_tokenize      items -> batches of tensors

Each task has forward(model, batch) -> (TaskOutput, losses), loss(model, batch), logits(outputs) (what knowledge
distillation matches), model_inputs(batch) (the main pass, whose MADTP records the task leaves in place) and
metric(model, loader), and may have cost_inputs(batch) (the passes whose GFLOPs are the model's; training-only
passes run in auxiliary_pass(model)). The shared contract is described in `madtp.tasks.retrieval`. Importing this
package does not import transformers.
"""
from .matching import ClipMatchingHead, ImageTextMatching, MatchingCollate
from .retrieval import (
    BlipRetrieval,
    ClipRetrieval,
    RetrievalCollate,
    TaskOutput,
    auxiliary_pass,
    hf_tokenize,
    in_auxiliary_pass,
    retrieval_recall,
    unwrap,
)
from .vqa import BlipVQA, VQACollate, answer_tokens

__all__ = ["BlipRetrieval", "BlipVQA", "ClipMatchingHead", "ClipRetrieval", "ImageTextMatching", "MatchingCollate",
           "RetrievalCollate", "TaskOutput", "VQACollate", "answer_tokens", "auxiliary_pass", "hf_tokenize",
           "in_auxiliary_pass", "retrieval_recall", "unwrap"]
