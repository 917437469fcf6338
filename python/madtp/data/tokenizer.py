"""Word-level tokenizer of the shapes captions (madtp.data.shapes), built with the `tokenizers` library.

Vocabulary: [PAD]=0, [UNK]=1, then every word of ``shapes.WORDS`` (sorted), then <|startoftext|> and <|endoftext|>
last, as in CLIP's own vocabulary. EOS is the largest id, so both ways Hugging Face CLIPTextModel pools work: the
first position of ``eos_token_id`` (current) and the argmax of input_ids (the legacy path, taken when
eos_token_id == 2). Every encoded sequence is ``BOS words EOS PAD...``: it always holds one EOS, and padding (a
different id) is on the right.

    build_tokenizer() -> tokenizers.Tokenizer
    save_tokenizer(path, tokenizer=None) -> Path        a file, or a directory to hold tokenizer.json
    load_tokenizer(path) -> tokenizers.Tokenizer
    encode(texts, max_length=CONTEXT_LENGTH, tokenizer=None) -> (input_ids int64 [B, L], attention_mask int64 [B, L])
    decode(input_ids, tokenizer=None) -> list[str]
    build_hf_tokenizer(tokenizer=None) -> transformers.PreTrainedTokenizerFast
    text_config_kwargs() -> dict       vocab_size, bos/eos/pad_token_id, max_position_embeddings for CLIPTextConfig
    PAD_ID, UNK_ID, BOS_ID, EOS_ID, VOCAB_SIZE, CONTEXT_LENGTH (BOS + the longest caption + EOS)
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

from .shapes import MAX_CAPTION_WORDS, WORDS

PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "[PAD]", "[UNK]", "<|startoftext|>", "<|endoftext|>"
VOCAB: dict[str, int] = {PAD_TOKEN: 0, UNK_TOKEN: 1, **{w: 2 + i for i, w in enumerate(WORDS)}}
VOCAB[BOS_TOKEN] = len(VOCAB)
VOCAB[EOS_TOKEN] = len(VOCAB)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = (VOCAB[t] for t in (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN))
VOCAB_SIZE = len(VOCAB)
CONTEXT_LENGTH = MAX_CAPTION_WORDS + 2


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(WordLevel(dict(VOCAB), unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}", special_tokens=[(BOS_TOKEN, BOS_ID), (EOS_TOKEN, EOS_ID)])
    tok.add_special_tokens([PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN])
    return tok


@functools.lru_cache(maxsize=1)
def _default() -> Tokenizer:
    return build_tokenizer()


def save_tokenizer(path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """Writes tokenizer.json (path: the file, or an existing directory to hold it); returns the file's path."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    (tokenizer or _default()).save(str(path))
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Reads tokenizer.json (path: the file or its directory); a file it cannot parse is a ValueError naming it."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (expected a tokenizers tokenizer.json)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:   # the Rust library raises a bare Exception for every parse error
        raise ValueError(f"{file}: not a tokenizer file the tokenizers library can read ({e})") from None


def encode(texts: str | Sequence[str], max_length: int | None = CONTEXT_LENGTH,
           tokenizer: Tokenizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, int64 [B, L]: BOS words EOS, right-padded with PAD_ID to L = max_length (None:
    the longest sequence). A longer text is cut to max_length, its last position still EOS."""
    if isinstance(texts, str):
        texts = [texts]
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 2):
        raise ValueError(f"max_length: expected None or an int >= 2, got {max_length!r}")
    tok = tokenizer or _default()
    eos = tok.token_to_id(EOS_TOKEN)
    seqs = [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=True)]
    if max_length is not None:
        seqs = [s if len(s) <= max_length else s[:max_length - 1] + [eos] for s in seqs]
    length = max_length if max_length is not None else max((len(s) for s in seqs), default=2)
    pad = tok.token_to_id(PAD_TOKEN)
    input_ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[b, :len(s)] = 1
    return input_ids, attention_mask


def decode(input_ids: torch.Tensor | Sequence[Sequence[int]], tokenizer: Tokenizer | None = None) -> list[str]:
    """The words of each sequence, special tokens dropped."""
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.tolist()
    return (tokenizer or _default()).decode_batch([list(s) for s in input_ids], skip_special_tokens=True)


def build_hf_tokenizer(tokenizer: Tokenizer | None = None):
    """A transformers PreTrainedTokenizerFast over this tokenizer (pads right, adds BOS/EOS)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer or build_tokenizer(), bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, model_max_length=CONTEXT_LENGTH, padding_side="right",
        model_input_names=["input_ids", "attention_mask"])


def text_config_kwargs() -> dict:
    """The token ids and sizes a CLIPTextConfig needs: CLIPTextConfig(**text_config_kwargs(), hidden_size=...)."""
    return {"vocab_size": VOCAB_SIZE, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
            "max_position_embeddings": CONTEXT_LENGTH}
