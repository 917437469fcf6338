"""`madtp`: the command line of the MADTP++ compression pipeline.

    madtp compress (--model DIR | --preset NAME) --task TASK --data DIR [--generate-data N]
                   --target-gflops-reduction R [R ...] [--weight-sparsity 2:4|none|N:M [--allow-unaccelerated]]
                   [--epochs E | --max-steps N] --output DIR [training options]
    madtp eval     --model DIR --task TASK --data DIR [--split val] [--json FILE]
    madtp bench    --model DIR [--dense DIR] [--batch-size B] [--json FILE]

Models are read with `madtp.serialization.load` only (config.json + model.safetensors of an allowlisted class: no
pickle, no remote code). Data folders hold BLIP-format annotation JSON and images, as
`madtp.data.annotations.write_shapes_annotations` writes them: <data>/<kind>_<split>.json with kind retrieval,
matching or vqa (`--train-annotations` / `--eval-annotations` name other files, e.g. BLIP's coco_karpathy_*.json).

Bad options and bad data end with one line on stderr naming the option or the file, and exit status 2 (argparse's
own errors too); a completed command exits 0.

Adding a subcommand (e.g. `demo`): write `add_arguments(parser)` (every option with a help string) and
`run(args) -> int`, and register them, here or in the module that defines them, which this file then imports:

    register(Command("demo", "one line for `madtp --help`", add_arguments, run, description="..."))

`main` builds one subparser per entry of COMMANDS (in registration order), and turns ValueError and
FileNotFoundError raised by `run` into the one-line message and exit status 2.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import EXECUTIONS, IMPORTANCES  # light: no torch, no transformers

PROG = "madtp"
EXIT_USAGE = 2


# ------------------------------------------------------------------ the subcommand registry

@dataclass(frozen=True)
class Command:
    """One `madtp <name>` subcommand."""
    name: str
    help: str                                            # one line in `madtp --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]             # exit status
    description: str = ""                                # the subcommand's --help text (default: help)


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    if not isinstance(command, Command):
        raise TypeError(f"command: expected a madtp.cli.Command, got {type(command).__name__}")
    if command.name in COMMANDS:
        raise ValueError(f"command: {command.name!r} is registered already")
    COMMANDS[command.name] = command
    return command


# ------------------------------------------------------------------ presets (models built from a config)

def _tiny_clip(seed: int):
    import torch
    from transformers import CLIPConfig, CLIPModel

    from .data import tokenizer as tok

    torch.manual_seed(seed)
    width = 64
    config = CLIPConfig(
        text_config=dict(**tok.text_config_kwargs(), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32)
    return CLIPModel(config), None


def _tiny_blip_config():
    from transformers import BlipConfig

    from .data import tokenizer as tok

    width = 64
    return BlipConfig(
        text_config=dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * width,
                         vocab_size=tok.VOCAB_SIZE, max_position_embeddings=tok.CONTEXT_LENGTH,
                         bos_token_id=tok.BOS_ID, sep_token_id=tok.EOS_ID, eos_token_id=tok.EOS_ID,
                         pad_token_id=tok.PAD_ID),
        vision_config=dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                           intermediate_size=2 * width),
        image_text_hidden_size=32)


def _tiny_blip(cls_name: str):
    def build(seed: int):
        import torch
        import transformers

        torch.manual_seed(seed)
        return getattr(transformers, cls_name)(_tiny_blip_config()), None
    return build


def _shapes_clip(seed: int):
    from .pretrained import load_shapes_clip

    model, tokenizer = load_shapes_clip()
    return model, tokenizer


def _shapes_clip_available() -> bool:
    import importlib.util

    here = Path(__file__).resolve().parent
    return importlib.util.find_spec("madtp.pretrained") is not None and \
        (here / "assets" / "shapes_clip" / "model.safetensors").is_file()


@dataclass(frozen=True)
class Preset:
    name: str
    help: str
    build: Callable[[int], tuple]                 # seed -> (model, tokenizers.Tokenizer | None (the shapes one))
    available: Callable[[], bool] = lambda: True


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tiny-clip", "a small random CLIPModel (2+2 layers, width 64, 32 px images, the shapes vocabulary)",
           _tiny_clip),
    Preset("tiny-blip-retrieval", "a small random BlipForImageTextRetrieval (32 px, the shapes vocabulary)",
           _tiny_blip("BlipForImageTextRetrieval")),
    Preset("tiny-blip-vqa", "a small random BlipForQuestionAnswering (32 px, the shapes vocabulary)",
           _tiny_blip("BlipForQuestionAnswering")),
    Preset("shapes-clip", "the small CLIP trained on the shapes data that ships with madtp (madtp.pretrained)",
           _shapes_clip, _shapes_clip_available),
)}


def available_presets() -> list[str]:
    return [name for name, p in PRESETS.items() if p.available()]


# ------------------------------------------------------------------ tasks

@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                       # annotation file stem (write_shapes_annotations): retrieval, matching, vqa
    models: tuple[str, ...]         # model classes it runs on
    help: str

    def make(self):
        from . import tasks

        return {"clip-retrieval": tasks.ClipRetrieval, "blip-retrieval": tasks.BlipRetrieval,
                "matching": tasks.ImageTextMatching, "vqa": tasks.BlipVQA}[self.name]()

    def dataset(self, annotation_file, image_root, image_size: int):
        from .data import annotations as ann

        cls = {"retrieval": ann.RetrievalDataset, "matching": ann.MatchingDataset, "vqa": ann.VQADataset}[self.kind]
        return cls(annotation_file, image_root, image_size)

    def collate(self, tokenize, model):
        from . import tasks

        if self.kind == "retrieval":
            return tasks.RetrievalCollate(tokenize)
        if self.kind == "matching":
            return tasks.MatchingCollate(tokenize)
        text = model.config.text_config
        start = getattr(model, "decoder_start_token_id", None)
        return tasks.VQACollate(tokenize, answer_bos=int(text.bos_token_id if start is None else start))


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("clip-retrieval", "retrieval", ("CLIPModel",), "CLIP image-text retrieval (InfoNCE, recall@1)"),
    TaskSpec("blip-retrieval", "retrieval", ("BlipForImageTextRetrieval",), "BLIP retrieval (ITC + ITM)"),
    TaskSpec("matching", "matching", ("CLIPModel", "BlipForImageTextRetrieval"),
             "NLVR2-style image-text matching (accuracy)"),
    TaskSpec("vqa", "vqa", ("BlipForQuestionAnswering",), "visual question answering (exact-match accuracy)"),
)}


# ------------------------------------------------------------------ loading models, tokenizers, data

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt", "added_tokens.json", "spiece.model")


@dataclass
class Loaded:
    model: object
    tokenize: Callable
    source: Path | None            # the model directory (None for a preset)
    shapes_tokenizer: object = None  # a tokenizers.Tokenizer to save beside the compressed model


def _text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", cfg)


def _shapes_tokenize(model, tokenizer, option: str):
    from functools import partial

    from .data import tokenizer as tok

    text = _text_config(model)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    need = tokenizer.get_vocab_size() if tokenizer is not None else tok.VOCAB_SIZE
    if vocab < need:
        raise ValueError(f"{option}: the model has no tokenizer files (tokenizer_config.json / tokenizer.json) and "
                         f"its text vocabulary ({vocab}) is smaller than the shapes tokenizer's ({need})")
    return partial(tok.encode, tokenizer=tokenizer)


def load_model_dir(directory: str | os.PathLike, option: str = "--model") -> Loaded:
    """A model directory: the model (madtp.serialization.load) and its tokenizer (a Hugging Face tokenizer where
    tokenizer_config.json is present, read locally; else a `tokenizers` tokenizer.json; else the shapes one)."""
    from .serialization import load

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{option}: {directory} is not a directory (expected config.json + model.safetensors)")
    model = load(directory)
    if (directory / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        from .tasks import hf_tokenize

        try:
            hf_tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{directory / 'tokenizer_config.json'}: the tokenizer files cannot be read "
                             f"({' '.join(str(e).split())[:300]})") from None
        length = getattr(_text_config(model), "max_position_embeddings", None)
        return Loaded(model, hf_tokenize(hf_tok, max_length=length), directory)
    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        from .data import tokenizer as tok

        tokenizer = tok.load_tokenizer(directory)
    return Loaded(model, _shapes_tokenize(model, tokenizer, option), directory, tokenizer)


def load_preset(name: str, seed: int) -> Loaded:
    preset = PRESETS.get(name)
    if preset is None or not preset.available():
        raise ValueError(f"--preset: unknown preset {name!r}; available: {', '.join(available_presets())}")
    model, tokenizer = preset.build(seed)
    if tokenizer is None:
        from .data import tokenizer as tok

        tokenizer = tok.build_tokenizer()
    return Loaded(model, _shapes_tokenize(model, tokenizer, "--preset"), None, tokenizer)


def _image_size(model) -> int:
    vision = getattr(model.config, "vision_config", model.config)
    size = getattr(vision, "image_size", None)
    if not isinstance(size, int):
        raise ValueError(f"--model: {type(model).__name__} has no vision image_size in its config")
    return size


def _check_task(spec: TaskSpec, model, option: str) -> None:
    name = type(model).__name__
    if name not in spec.models:
        raise ValueError(f"--task: {spec.name} runs on {' or '.join(spec.models)}; {option} gives a {name}")


def _annotation_file(args, spec: TaskSpec, split: str, override: str | None, option: str) -> Path:
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"{option}: annotation file {path} does not exist")
        return path
    path = Path(args.data) / f"{spec.kind}_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"--data: annotation file {path} does not exist (a data folder holds "
                                f"{spec.kind}_<split>.json, as --generate-data writes it; or name the file with "
                                f"{option})")
    return path


def _check_data_dir(args) -> None:
    data = Path(args.data)
    if data.exists() and not data.is_dir():
        raise FileNotFoundError(f"--data: {data} is not a directory")
    if not data.is_dir() and not getattr(args, "generate_data", 0):
        raise FileNotFoundError(f"--data: data directory {data} does not exist (pass --generate-data N to write a "
                                "generated miniature dataset there)")
    if getattr(args, "image_root", None) and not Path(args.image_root).is_dir():
        raise FileNotFoundError(f"--image-root: {args.image_root} is not a directory")


def _generate(args, model) -> None:
    from .data import ShapesConfig
    from .data.annotations import write_shapes_annotations

    config = ShapesConfig(image_size=max(16, _image_size(model)))
    n_eval = max(16, args.generate_data // 4)
    write_shapes_annotations(args.data, args.generate_data, config, seed=args.data_seed, split=args.train_split,
                             num_negatives=args.data_negatives)
    write_shapes_annotations(args.data, n_eval, config, seed=args.data_seed + 1, split=args.eval_split,
                             num_negatives=args.data_negatives)


def _save_tokenizer(loaded: Loaded, model_dir: Path) -> None:
    """The tokenizer beside the compressed model, so `madtp eval` reads text as training did."""
    from .serialization import add_files

    written = []
    if loaded.source is not None:
        for name in TOKENIZER_FILES:
            if (loaded.source / name).is_file():
                shutil.copyfile(loaded.source / name, model_dir / name)   # the umask's modes, not the source's
                written.append(name)
    elif loaded.shapes_tokenizer is not None:
        from .data import tokenizer as tok

        tok.save_tokenizer(model_dir / "tokenizer.json", loaded.shapes_tokenizer)
        written.append("tokenizer.json")
    if written:
        add_files(model_dir, written)   # in the manifest, so `load` checks them too


# ------------------------------------------------------------------ option help

TRAIN_HELP = {
    "output_dir": "the run's directory (the same as --output)",
    "max_steps": "optimizer steps (default: --epochs worth of steps)",
    "micro_batch_size": "samples per forward/backward; also the eval, calibration and latency batch size "
                        "(default: %(default)s)",
    "accumulation": "micro-batches per optimizer step (default: %(default)s)",
    "lr": "peak learning rate of AdamW (default: %(default)s)",
    "weight_decay": "AdamW weight decay (default: %(default)s)",
    "betas": "AdamW betas (default: %(default)s)",
    "schedule": "learning rate after warmup: cosine (down to --min-lr-ratio) or constant (default: %(default)s)",
    "warmup_steps": "linear learning-rate warmup steps (default: %(default)s)",
    "min_lr_ratio": "the cosine schedule's floor, a fraction of --lr (default: %(default)s)",
    "grad_clip": "clip the global gradient norm to this value (default: no clipping)",
    "amp": "mixed precision on CUDA: none, bf16 or fp16 (default: %(default)s)",
    "seed": "seed of the data order, dropout, the alignment tokens and a preset's weights (default: %(default)s)",
    "shuffle": "shuffle the training set every epoch (default: on)",
    "checkpoint_dir": "checkpoint directory (default: OUTPUT/checkpoints)",
    "checkpoint_every": "write a resumable checkpoint every N steps; 0: only at the end (default: %(default)s)",
    "checkpoint_at_end": "write a checkpoint after the last step (default: on)",
    "keep_last": "checkpoints to keep (default: %(default)s)",
    "resume": "continue a killed run from the latest checkpoint in the checkpoint directory (or from PATH); "
              "without a checkpoint yet, start from step 0",
    "log_every": "append the training logs to OUTPUT/metrics.jsonl every N steps (default: %(default)s)",
    "eval_every": "also evaluate the task metric every N training steps; 0: not during training "
                  "(default: %(default)s)",
    "progress": "show a progress bar (default: on)",
    "num_workers": "DataLoader worker processes (default: %(default)s)",
    "device": "auto (CUDA when available), cpu or cuda (default: %(default)s)",
    "find_unused_parameters": "DDP's find_unused_parameters, for torchrun runs (default: off)",
}


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    TrainConfig.add_arguments(parser)
    for action in parser._actions:   # the TrainConfig flags come without help and with required fields
        if action.dest in TRAIN_HELP and (not action.help or action.dest == "resume"):
            action.help = TRAIN_HELP[action.dest]
        if action.dest in ("output_dir", "max_steps", "micro_batch_size"):
            action.required = False
    parser.set_defaults(micro_batch_size=16, lr=1e-4, checkpoint_every=50)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text}")
    return value


# ------------------------------------------------------------------ compress

# CompressConfig's defaults, repeated so that `madtp --help` need not import transformers (madtp.compress does);
# tests/madtp/test_pipeline.py checks that they are CompressConfig's.
COMPRESS_DEFAULTS = dict(weight_sparsity="2:4", num_alignment_tokens=16, prune_vision=True, prune_text=True,
                         execution="ragged", importance="minmax",
                         temperatures=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
                         calibration_batches=4, alpha=0.1, beta_v=1.0, beta_t=1.0, gamma=1.0, kd_temperature=2.0,
                         srste_decay=2e-4, controller_kp=0.2, controller_ki=0.3, settle_steps=8, latency_repeats=5)


def _add_compress(parser: argparse.ArgumentParser) -> None:
    d = COMPRESS_DEFAULTS
    g = parser.add_argument_group("model and data")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="a saved Hugging Face / madtp model directory (config.json + "
                     "model.safetensors), read with madtp.serialization.load (safetensors only, no remote code)")
    src.add_argument("--preset", metavar="NAME", choices=available_presets(),
                     help="a model built here instead: " + "; ".join(
                         f"{n}: {PRESETS[n].help}" for n in available_presets()))
    g.add_argument("--task", required=True, choices=list(TASKS),
                   help="the downstream task: " + "; ".join(f"{t.name}: {t.help}" for t in TASKS.values()))
    g.add_argument("--data", required=True, metavar="DIR",
                   help="folder with BLIP-format annotation JSON (<kind>_<split>.json) and the images they name")
    g.add_argument("--generate-data", type=_positive_int, default=0, metavar="N",
                   help="first write a generated miniature shapes dataset into --data: N training samples and "
                        "max(16, N/4) eval samples at the model's image size (default: 0, none)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of --generate-data (default: %(default)s)")
    g.add_argument("--data-negatives", type=_positive_int, default=3, metavar="K",
                   help="hard-negative captions per image in --generate-data's retrieval files (default: %(default)s)")
    _add_data_files(g, train=True)

    c = parser.add_argument_group("compression")
    c.add_argument("--target-gflops-reduction", type=float, nargs="+", required=True, metavar="R",
                   help="fraction of the dense model's GFLOPs per sample to remove, in (0, 1); several values "
                        "compress one model each (one point each in the plot)")
    c.add_argument("--weight-sparsity", default=d["weight_sparsity"], metavar="PATTERN",
                   help="2:4 (Sparse Tensor Cores; its Linear layers count at half), none, or another N:M with "
                        "--allow-unaccelerated (default: %(default)s)")
    c.add_argument("--allow-unaccelerated", action="store_true",
                   help="accept an N:M pattern other than 2:4: trained and reported, but no hardware runs it faster")
    c.add_argument("--num-alignment-tokens", type=int, default=d["num_alignment_tokens"],
                   help="MAG alignment tokens shared by the two modalities (default: %(default)s)")
    c.add_argument("--prune-layers", type=int, nargs="+", default=None, metavar="L",
                   help="encoder layers (0-based) that prune tokens (default: every layer)")
    c.add_argument("--prune-vision", action=argparse.BooleanOptionalAction, default=d["prune_vision"],
                   help="prune image tokens (default: on)")
    c.add_argument("--prune-text", action=argparse.BooleanOptionalAction, default=d["prune_text"],
                   help="prune text tokens (default: on)")
    c.add_argument("--execution", choices=EXECUTIONS, default=d["execution"],
                   help="how the pruned model runs: ragged (packed tokens), padded (the same decisions, each layer "
                        "padded to the batch's longest sample) or published (the published code's policy: every "
                        "sample keeps the batch's largest keep count; padded) (default: %(default)s)")
    c.add_argument("--importance", choices=IMPORTANCES, default=d["importance"],
                   help="token importance formula: minmax (each term min-max normalised per sample) or official "
                        "(the published MADTP formula: received and alignment sum-normalised, CLS unnormalised) "
                        "(default: %(default)s)")
    c.add_argument("--temperatures", type=float, nargs="+", default=list(d["temperatures"]), metavar="T",
                   help="temperature grid of the sensitivity measurement and the budget split "
                        "(default: %(default)s)")
    c.add_argument("--calibration-batches", type=int, default=d["calibration_batches"],
                   help="training batches the sensitivity table and the GFLOPs cost model are measured on "
                        "(default: %(default)s)")
    c.add_argument("--alpha", type=float, default=d["alpha"],
                   help="weight of the MAG alignment loss (default: %(default)s)")
    c.add_argument("--beta-v", type=float, default=d["beta_v"],
                   help="weight of the vision layer-summary distillation MSE (default: %(default)s)")
    c.add_argument("--beta-t", type=float, default=d["beta_t"],
                   help="weight of the text layer-summary distillation MSE (default: %(default)s)")
    c.add_argument("--gamma", type=float, default=d["gamma"],
                   help="weight of the T^2 KL distillation of the task's logits (default: %(default)s)")
    c.add_argument("--kd-temperature", type=float, default=d["kd_temperature"],
                   help="temperature T of the KL distillation (default: %(default)s)")
    c.add_argument("--srste-decay", type=float, default=d["srste_decay"],
                   help="SR-STE decay pulling pruned weights to zero (default: %(default)s)")
    c.add_argument("--controller-kp", type=float, default=d["controller_kp"],
                   help="proportional gain of the GFLOPs controller (default: %(default)s)")
    c.add_argument("--controller-ki", type=float, default=d["controller_ki"],
                   help="integral gain of the GFLOPs controller (default: %(default)s)")
    c.add_argument("--settle-steps", type=int, default=d["settle_steps"],
                   help="no-grad forwards after training over which the controller settles the temperatures on "
                        "the final weights (default: %(default)s)")
    c.add_argument("--latency-repeats", type=int, default=d["latency_repeats"],
                   help="timed forwards per latency figure; the median is reported (default: %(default)s)")

    r = parser.add_argument_group("run")
    r.add_argument("--output", metavar="DIR", help="output directory: model/, report.json, report.md, "
                   "accuracy_vs_gflops.png, metrics.jsonl, checkpoints/ (required; --output-dir is the same)")
    r.add_argument("--epochs", type=float, default=None,
                   help="training epochs, instead of --max-steps (default: 1 when neither is given)")
    r.add_argument("--quiet", action="store_true", help="no progress messages (the report table is still printed)")
    _add_threads(r)
    _add_train_arguments(parser)


def _add_threads(group) -> None:
    group.add_argument("--threads", type=int, default=None, metavar="N",
                       help="CPU threads torch may use (default: torch's own choice; on a shared machine 1 avoids "
                            "the slowdown of oversubscribed threads)")


def _set_threads(args) -> None:
    if getattr(args, "threads", None) is None:
        return
    if args.threads < 1:
        raise ValueError(f"--threads: expected an int >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def _add_data_files(group, *, train: bool) -> None:
    if train:
        group.add_argument("--train-split", default="train",
                           help="split name of the training annotations <kind>_<split>.json (default: %(default)s)")
        group.add_argument("--train-annotations", metavar="FILE",
                           help="the training annotation file itself (default: DATA/<kind>_<train-split>.json)")
        group.add_argument("--eval-split", default="val",
                           help="split name of the eval annotations (default: %(default)s)")
        group.add_argument("--eval-annotations", metavar="FILE",
                           help="the eval annotation file itself (default: DATA/<kind>_<eval-split>.json)")
    else:
        group.add_argument("--split", default="val",
                           help="split name of the annotations <kind>_<split>.json (default: %(default)s)")
        group.add_argument("--annotations", metavar="FILE",
                           help="the annotation file itself (default: DATA/<kind>_<split>.json)")
    group.add_argument("--image-root", metavar="DIR",
                       help="folder the annotations' image paths are relative to (default: --data)")


def _configs(args):
    """CompressConfig and TrainConfig from the options (max_steps settled later, from --epochs if need be)."""
    from .compress.pipeline import CompressConfig
    from .train import TrainConfig

    output = args.output or args.output_dir
    if args.output and args.output_dir and os.path.normpath(args.output) != os.path.normpath(args.output_dir):
        raise ValueError(f"--output: {args.output} and --output-dir {args.output_dir} differ; give one")
    if not output:
        raise ValueError("--output: required (the directory for the model, report and plot)")
    if args.epochs is not None and args.max_steps is not None:
        raise ValueError("--epochs: give --epochs or --max-steps, not both")
    if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
        raise ValueError(f"--epochs: expected a number > 0, got {args.epochs}")
    targets = args.target_gflops_reduction
    config = CompressConfig(
        target_gflops_reduction=targets[0] if len(targets) == 1 else tuple(targets),
        weight_sparsity=args.weight_sparsity, allow_unaccelerated=args.allow_unaccelerated,
        num_alignment_tokens=args.num_alignment_tokens, prune_vision=args.prune_vision, prune_text=args.prune_text,
        prune_layers=tuple(args.prune_layers) if args.prune_layers else None, execution=args.execution,
        importance=args.importance, temperatures=tuple(args.temperatures),
        calibration_batches=args.calibration_batches, alpha=args.alpha,
        beta_v=args.beta_v, beta_t=args.beta_t, gamma=args.gamma, kd_temperature=args.kd_temperature,
        srste_decay=args.srste_decay, controller_kp=args.controller_kp, controller_ki=args.controller_ki,
        settle_steps=args.settle_steps, latency_repeats=args.latency_repeats)
    values = vars(args) | {"output_dir": output, "max_steps": 1 if args.max_steps is None else args.max_steps}
    train = TrainConfig.from_args(argparse.Namespace(**values))   # checked now, before anything loads
    _check_resume(train)
    return config, train


def _check_resume(train) -> None:
    """A --resume checkpoint that is not one, or is damaged, fails before the model loads and calibrates (the
    trainer checks it again when it restores it)."""
    from .train import checkpoint as ckpt

    if train.resume is True:
        path = ckpt.latest_checkpoint(train.checkpoint_dir)   # IntegrityError for a damaged one `latest` names
    elif train.resume:
        path = Path(train.resume)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume: {path} is not a checkpoint directory")
        try:
            ckpt.read_meta(path)
        except ckpt.IntegrityError:
            raise
        except ValueError:
            raise ValueError(f"--resume: {path} is not a complete checkpoint (no readable {ckpt.STATE_JSON})") \
                from None
    else:
        return
    if path is not None:
        ckpt.verify_checkpoint(path)


def run_compress(args) -> int:
    from .compress.pipeline import compress, format_table
    _set_threads(args)

    config, train = _configs(args)
    spec = TASKS[args.task]
    _check_data_dir(args)
    if not args.generate_data:
        train_file = _annotation_file(args, spec, args.train_split, args.train_annotations, "--train-annotations")
        eval_file = _annotation_file(args, spec, args.eval_split, args.eval_annotations, "--eval-annotations")
    option = "--model" if args.model else "--preset"
    loaded = load_model_dir(args.model) if args.model else load_preset(args.preset, train.seed)
    model = loaded.model
    _check_task(spec, model, option)
    if args.generate_data:
        _generate(args, model)
        train_file = _annotation_file(args, spec, args.train_split, args.train_annotations, "--train-annotations")
        eval_file = _annotation_file(args, spec, args.eval_split, args.eval_annotations, "--eval-annotations")
    root = args.image_root or args.data
    size = _image_size(model)
    train_set = spec.dataset(train_file, root, size)
    eval_set = spec.dataset(eval_file, root, size)
    collate = spec.collate(loaded.tokenize, model)
    global_batch = train.micro_batch_size * train.accumulation * int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = len(train_set) // global_batch
    if per_epoch < 1:
        raise ValueError(f"--micro-batch-size: {train_file} has {len(train_set)} samples, fewer than one global batch "
                         f"of {global_batch} (micro-batch size x accumulation x world size)")
    max_steps = args.max_steps if args.max_steps is not None else max(1, math.ceil((args.epochs or 1.0) * per_epoch))
    train = dataclasses.replace(train, max_steps=max_steps)
    config = dataclasses.replace(config, train=train)
    result = compress(model, spec.make(), train_set, eval_set, config, collate, train.output_dir,
                      verbose=not args.quiet)
    for target in result.targets:
        _save_tokenizer(loaded, target.model_dir)
    if args.quiet:
        print(format_table(json.loads(result.report_json.read_text())))
    for target in result.targets:
        print(f"model (target {target.target_gflops_reduction:g}): {target.model_dir}")
    print(f"report: {result.report_json} and {result.report_md}\nplot: {result.plot}")
    return 0


# ------------------------------------------------------------------ eval

def _add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a model directory (config.json + model.safetensors, e.g. OUTPUT/model of compress)")
    parser.add_argument("--task", required=True, choices=list(TASKS),
                        help="the task whose metric to compute: " + ", ".join(TASKS))
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="folder with BLIP-format annotation JSON (<kind>_<split>.json) and images")
    g = parser.add_argument_group("data files")
    _add_data_files(g, train=False)
    parser.add_argument("--batch-size", type=int, default=32, help="eval batch size (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (CUDA when available), cpu or cuda (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers to this JSON file")
    _add_threads(parser)


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but torch.cuda.is_available() is False")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _write_json(path: str | None, data: dict) -> None:
    if path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2))


def run_eval(args) -> int:
    import torch
    from torch.utils.data import DataLoader
    _set_threads(args)

    from .compress.pipeline import measure

    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected an int >= 1, got {args.batch_size}")
    spec = TASKS[args.task]
    _check_data_dir(args)
    file = _annotation_file(args, spec, args.split, args.annotations, "--annotations")
    device = _device(args.device)
    loaded = load_model_dir(args.model)
    model = loaded.model.to(device)
    _check_task(spec, model, "--model")
    dataset = spec.dataset(file, args.image_root or args.data, _image_size(model))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                        collate_fn=spec.collate(loaded.tokenize, model))
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in loader]
    task = spec.make()
    m = measure(model, task, batches, Path(args.model).name, latency_inputs=None)
    print(f"{type(task).__name__} on {type(model).__name__} ({args.model}), {len(dataset)} samples of {file}")
    for name, value in m.metric.items():
        print(f"  {name:>20}: {value:.4f}")
    for name, value in m.gflops.items():
        print(f"  {'GFLOPs/sample ' + name:>20}: {value:.6g}")
    print(f"  {'parameters':>20}: {m.parameters:,} ({m.nonzero:,} non-zero)")
    _write_json(args.json, {"model": str(args.model), "task": args.task, "annotations": str(file),
                            "samples": len(dataset), **m.to_dict()})
    return 0


# ------------------------------------------------------------------ bench

def _add_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="the compressed model directory (e.g. OUTPUT/model of compress)")
    parser.add_argument("--dense", metavar="DIR",
                        help="the dense model to compare with (default: the compressed model with its 2:4 layers "
                             "made dense and token pruning removed)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per timed forward (default: %(default)s)")
    parser.add_argument("--text-length", type=int, default=None,
                        help="longest generated text, in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed forwards per figure; the median is reported (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated inputs (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (CUDA when available), cpu or cuda (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the table to this JSON file")
    _add_threads(parser)


def bench_inputs(model, batch: int, text_length: int | None, seed: int) -> dict:
    """Random inputs the model's forward takes: images of its size, right-padded texts of random lengths
    (BOS ... EOS) over its vocabulary without the special ids."""
    import torch

    g = torch.Generator().manual_seed(seed)
    name = type(model).__name__
    inputs = {}
    if name != "CLIPTextModel":
        inputs["pixel_values"] = torch.randn(batch, 3, _image_size(model), _image_size(model), generator=g)
    if name == "CLIPVisionModel":
        return inputs
    text = _text_config(model)
    ids = [getattr(text, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id")]
    bos, eos, pad, _ = ids
    special = {i for i in ids if i is not None}
    longest = min(text_length or text.max_position_embeddings, text.max_position_embeddings)
    if longest < 3:
        raise ValueError(f"--text-length: expected at least 3 tokens, got {longest}")
    words = torch.tensor([i for i in range(text.vocab_size) if i not in special])
    lengths = torch.randint(3, longest + 1, (batch,), generator=g)
    input_ids = torch.full((batch, longest), pad if pad is not None else 0, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        input_ids[b, :n] = words[torch.randint(len(words), (n,), generator=g)]
        if bos is not None:
            input_ids[b, 0] = bos
        if eos is not None:
            input_ids[b, n - 1] = eos
    inputs["input_ids"] = input_ids
    inputs["attention_mask"] = (torch.arange(longest) < lengths[:, None]).long()
    if name == "BlipForImageTextRetrieval":
        inputs["use_itm_head"] = True
    if name == "BlipForQuestionAnswering":
        inputs["decoder_input_ids"] = input_ids[:, :4].clone()
        inputs["decoder_attention_mask"] = inputs["attention_mask"][:, :4].clone()
    return inputs


def densify(model):
    """A copy of `model` without token pruning and with every SparseLinear made a dense nn.Linear."""
    from madtp_kernels import SparseLinear

    from .patch import ATTRIBUTE, MADTPState, remove

    dense = copy.deepcopy(model)
    if isinstance(getattr(dense, ATTRIBUTE, None), MADTPState):
        remove(dense)
    for parent in list(dense.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, SparseLinear):
                setattr(parent, child_name, child.to_dense())
    return dense.eval()


def run_bench(args) -> int:
    import torch
    _set_threads(args)

    from .compress.pipeline import device_label, time_forward
    from .flops import count_flops
    from .patch import ATTRIBUTE, MADTPState, set_execution

    for name in ("batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    device = _device(args.device)
    compressed = load_model_dir(args.model).model.to(device).eval()
    if not isinstance(getattr(compressed, ATTRIBUTE, None), MADTPState):
        raise ValueError(f"--model: {args.model} has no token pruning (no madtp.json with a MADTP config): "
                         "nothing to compare padded and ragged execution on")
    dense = (load_model_dir(args.dense, "--dense").model if args.dense else densify(compressed)).to(device).eval()
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
              for k, v in bench_inputs(compressed, args.batch_size, args.text_length, args.seed).items()}
    label = device_label(device)
    rows = []
    saved = getattr(compressed, ATTRIBUTE).execution
    try:
        for execution, model in (("dense", dense), ("padded", compressed), ("ragged", compressed)):
            if execution != "dense":
                set_execution(model, execution)
            ms = time_forward(model, inputs, args.repeats)
            gflops = count_flops(model, **inputs)
            rows.append({"execution": execution, "latency_ms": ms, "gflops": gflops})
    finally:
        set_execution(compressed, saved)
    base = rows[0]["latency_ms"]
    for row in rows:
        row["speedup"] = base / row["latency_ms"] if row["latency_ms"] else float("nan")
    print(f"{type(compressed).__name__} ({args.model}), batch {args.batch_size}, median of {args.repeats} forwards "
          f"on {label}")
    head = ("execution", f"{label.split(' (')[0]} ms", "GFLOPs/sample", "speedup vs dense")
    body = [(r["execution"], f"{r['latency_ms']:.3f}", f"{r['gflops']['total']:.4g}", f"{r['speedup']:.2f}x")
            for r in rows]
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]
    for row in (head, tuple("-" * w for w in widths), *body):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                              strict=True))))
    _write_json(args.json, {"model": str(args.model), "dense": str(args.dense) if args.dense else "densified",
                            "device": label, "batch_size": args.batch_size, "repeats": args.repeats, "rows": rows})
    return 0


register(Command("compress", "compress a model for a task: token pruning + 2:4 weights + distillation, to a "
                 "GFLOPs target", _add_compress, run_compress,
                 description="Compress a dense CLIP/BLIP model with MADTP++ (madtp.compress.pipeline) and write the "
                             "model, report.json/report.md and an accuracy-vs-GFLOPs plot into --output."))
register(Command("eval", "evaluate a model directory on a task's data: metric and GFLOPs", _add_eval, run_eval,
                 description="Print a saved model's task metric and GFLOPs per sample on an annotation file."))
register(Command("bench", "time a compressed model: dense vs padded vs ragged, on generated inputs",
                 _add_bench, run_bench,
                 description="Median forward latency and GFLOPs of the dense model and of the compressed one in "
                             "its padded and ragged executions, on random inputs of the model's shapes."))


def _add_demo(parser: argparse.ArgumentParser) -> None:
    from . import demo
    demo.add_arguments(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo
    return demo.main(args)


register(Command("demo", "MADTP++ end to end on CPU on the shipped shapes CLIP: compress to 50%% and 80%% fewer "
                 "GFLOPs, print the table", _add_demo, _run_demo,
                 description="Load the small CLIP shipped with madtp (trained on generated shapes data), measure it "
                             "dense, compress it (token pruning + 2:4 weights + distillation) at each GFLOPs "
                             "target with a brief fine-tune, and print GFLOPs, parameters, non-zero parameters, "
                             "10-way retrieval accuracy with hard negatives and CPU latency dense / padded / "
                             "ragged; writes report.json and accuracy_vs_gflops.png into --output."))


# ------------------------------------------------------------------ main

class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description="MADTP++ compression of vision-language models: "
                                     "token pruning on ragged token sets and 2:4 weights, to a GFLOPs target.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                help=f"one of {', '.join(COMMANDS)}; `{PROG} COMMAND --help` lists its options")
    for command in COMMANDS.values():
        p = sub.add_parser(command.name, help=command.help, description=command.description or command.help)
        command.add_arguments(p)
        p.set_defaults(_command=command, _parser=p)
    return parser


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    out = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs:
            out[action.dest] = longs[0]
    out["output_dir"] = out.get("output", out.get("output_dir", "--output"))
    return out


def _message(error: BaseException, parser: argparse.ArgumentParser | None) -> str:
    """One line; a leading `field:` and underscored field names become the options that set them."""
    text = str(error)
    # An error re-raised by a DataLoader worker carries the worker's traceback; its last line is the message.
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    text = " ".join(text.split()) or type(error).__name__
    if parser is None:
        return text
    flags = _flags(parser)
    head = re.match(r"^([a-z][a-z0-9_]*):", text)
    if head and head.group(1) in flags:
        text = flags[head.group(1)] + text[len(head.group(1)):]
    for dest, flag in flags.items():
        if "_" in dest:
            text = re.sub(rf"(?<![-\w]){re.escape(dest)}(?!\w)", flag, text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Run `madtp` with argv (default sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # --help, --version (0) and argparse's usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    command: Command = args._command
    try:
        return int(command.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG} {command.name}: error: {_message(e, args._parser)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        if e.filename is None:   # not about a file the user named: a bug or the system, shown as a traceback
            raise
        print(f"{PROG} {command.name}: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG} {command.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
