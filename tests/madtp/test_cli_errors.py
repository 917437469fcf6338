"""The command line keeps its promise: every user error (an option, a file, the data) ends with exactly one line
on stderr that names the option or the file, and exit status 2; no traceback. A catalogue of bad invocations and
damaged files, built in tmp_path from one tiny model export, run in-process through `madtp.cli.main` (and a few
as real subprocesses)."""
from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

import madtp
import pytest
import torch
from madtp import cli, serialization
from madtp.data import ShapesConfig
from madtp.data.annotations import write_shapes_annotations
from madtp.integrity import seal
from madtp.train import checkpoint as ckpt

SRC = Path(__file__).resolve().parents[2] / "python"


# ------------------------------------------------------------------ fixtures: one tiny export, one data folder

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """{"model": a compressed tiny CLIP export with its tokenizer, "dense": the same model plain, "data": a data
    folder of 4 samples}. Cases copy from these and damage the copy."""
    root = tmp_path_factory.mktemp("cli_errors")
    model, _ = cli.PRESETS["tiny-clip"].build(0)
    model.eval()
    dense = serialization.save(copy.deepcopy(model), root / "dense")
    cli._save_tokenizer(cli.Loaded(model, None, None, _shapes_tokenizer()), dense)
    madtp.apply(model, madtp.MADTPConfig(num_alignment_tokens=4, temperature=1.0))
    madtp.sparsify(model)
    export = serialization.save(model, root / "model")
    cli._save_tokenizer(cli.Loaded(model, None, None, _shapes_tokenizer()), export)
    data = root / "data"
    write_shapes_annotations(data, 4, ShapesConfig(image_size=32), seed=0, split="val")
    return {"model": export, "dense": dense, "data": data, "root": root}


def _shapes_tokenizer():
    from madtp.data import tokenizer as tok
    return tok.build_tokenizer()


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))


def _edit_manifest(directory: Path, edit, reseal: bool = True) -> None:
    """Change madtp.json as a hand edit would; reseal=True also updates its own hash (a consistent edit whose
    content is wrong), reseal=False leaves the hash stale (damage)."""
    path = directory / "madtp.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(seal(meta) if reseal else meta))


def _plain(directory: Path) -> Path:
    """The export as a plain Hugging Face directory: no manifest, so no hashes to catch what follows."""
    (directory / "madtp.json").unlink()
    return directory


def _bomb_png(path: Path, side: int = 20000) -> None:
    """A valid PNG header claiming side x side pixels (400 M: past PIL's decompression-bomb limit)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (side * 3 + 1))   # one row; PIL refuses before it decodes any
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# ------------------------------------------------------------------ the catalogue

@dataclass(frozen=True)
class Case:
    id: str
    argv: object            # (base, tmp) -> list of arguments
    names: str              # what the one line must name: an option or a file name (substring)
    setup: object = None    # (base, tmp) -> None: writes the damaged files under tmp


def ev(model="model", *extra, data=None):
    """`madtp eval` of tmp/model when a case wrote one there, else of base[model]."""
    return lambda b, t: ["eval", "--model", str(t / "model" if (t / "model").exists() else b[model]), "--task",
                         "clip-retrieval", "--data", str(data(b, t) if data else b["data"]), "--threads", "1",
                         *[str(x(b, t)) if callable(x) else str(x) for x in extra]]


def damaged(source="model"):
    """setup: copy base[source] to tmp/model, then apply fn to the copy."""
    def wrap(fn):
        def setup(b, t):
            fn(_copy_tree(b[source], t / "model"))
        return setup
    return wrap


plain = damaged(source="dense")   # the dense export's copy (each plain case drops its manifest with _plain)


def compress(*extra, output=True):
    def argv(b, t):
        return ["compress", "--preset", "tiny-clip", "--task", "clip-retrieval", "--data", str(b["data"]),
                "--eval-split", "val", "--train-split", "val", "--target-gflops-reduction", "0.5",
                *(["--output", str(t / "out")] if output else []), "--micro-batch-size", "2", "--threads", "1",
                "--no-progress", "--quiet", *[str(x(b, t)) if callable(x) else str(x) for x in extra]]
    return argv


def _damaged_checkpoint(b, t):
    d = t / "ckpts"
    ckpt.save_checkpoint(d, 1, torch.nn.Linear(2, 2), {"x": torch.zeros(3)})
    _flip_last_byte(d / "step_00000001" / ckpt.MODEL_FILE)


def _data_with(fn):
    def data(b, t):
        d = t / "data"
        if not d.exists():
            _copy_tree(b["data"], d)
            fn(d)
        return d
    return data


def _entries(d: Path, edit):
    path = d / "retrieval_val.json"
    entries = json.loads(path.read_text())
    edit(entries)
    path.write_text(json.dumps(entries))


def _swap_words(path: Path):
    """Two words trade ids: still a valid tokenizer, only its hash tells (the model would read other words)."""
    doc = json.loads(path.read_text())
    vocab = doc["model"]["vocab"]
    a, b = sorted(w for w in vocab if w.isalpha())[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(doc))


def _pickled(d: Path):
    torch.save({"w": torch.zeros(2)}, d / "model.safetensors")


def _model_type(d: Path):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "blip"
    (d / "config.json").write_text(json.dumps(cfg))


def _architectures(d: Path):
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2Model"]
    (d / "config.json").write_text(json.dumps(cfg))


def _bad_width(d: Path):
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_config"]["num_attention_heads"] = 7     # 64 is not a multiple of 7
    (d / "config.json").write_text(json.dumps(cfg))


def _set(path, value):
    def edit(meta):
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


CASES = [
    # ---- options: argparse's own
    Case("no-command", lambda b, t: [], "COMMAND"),
    Case("unknown-command", lambda b, t: ["frobnicate"], "frobnicate"),
    Case("eval-missing-model", lambda b, t: ["eval", "--task", "clip-retrieval", "--data", "x"], "--model"),
    Case("eval-bad-task", ev("model", "--task", "bogus"), "--task"),
    Case("eval-batch-size-not-int", ev("model", "--batch-size", "x"), "--batch-size"),
    Case("compress-model-and-preset", compress("--model", "x"), "--model"),
    Case("compress-unknown-preset", lambda b, t: compress()(b, t)[:1] + ["--preset", "nope"] + compress()(b, t)[3:],
         "--preset"),
    # ---- options: checked by the command
    Case("eval-batch-size-0", ev("model", "--batch-size", "0"), "--batch-size"),
    Case("eval-threads-0", ev("model", "--threads", "0"), "--threads"),
    Case("eval-model-missing", lambda b, t: ev()(b, t)[:2] + [str(t / "nothing")] + ev()(b, t)[3:], "--model"),
    Case("eval-model-is-a-file", lambda b, t: ev()(b, t)[:2] + [str(b["data"] / "vqa_val.json")] + ev()(b, t)[3:],
         "--model"),
    Case("eval-data-missing", ev("model", data=lambda b, t: t / "nodata"), "--data"),
    Case("eval-annotations-missing", ev("model", "--annotations", lambda b, t: t / "none.json"), "--annotations"),
    Case("eval-image-root-missing", ev("model", "--image-root", lambda b, t: t / "noimages"), "--image-root"),
    Case("eval-json-under-a-file", ev("model", "--json", lambda b, t: b["data"] / "vqa_val.json" / "out.json"),
         "vqa_val.json"),
    Case("eval-task-wrong-model", lambda b, t: [("vqa" if a == "clip-retrieval" else a) for a in ev()(b, t)],
         "--task"),
    Case("bench-repeats-0", lambda b, t: ["bench", "--model", str(b["model"]), "--repeats", "0"], "--repeats"),
    Case("bench-batch-size-0", lambda b, t: ["bench", "--model", str(b["model"]), "--batch-size", "0"],
         "--batch-size"),
    Case("bench-text-length-1", lambda b, t: ["bench", "--model", str(b["model"]), "--text-length", "1",
                                              "--repeats", "1", "--threads", "1"], "--text-length"),
    Case("bench-dense-model", lambda b, t: ["bench", "--model", str(b["dense"])], "--model"),
    Case("bench-dense-missing", lambda b, t: ["bench", "--model", str(b["model"]), "--dense", str(t / "no")],
         "--dense"),
    Case("compress-epochs-0", compress("--epochs", "0"), "--epochs"),
    Case("compress-epochs-and-steps", compress("--epochs", "1", "--max-steps", "2"), "--epochs"),
    Case("compress-max-steps-0", compress("--max-steps", "0"), "--max-steps"),
    Case("compress-target-1.5", lambda b, t: [("1.5" if a == "0.5" else a) for a in compress()(b, t)],
         "--target-gflops-reduction"),
    Case("compress-prune-layers-negative", compress("--prune-layers", "-1"), "--prune-layers"),
    Case("compress-prune-layers-99", compress("--prune-layers", "99", "--max-steps", "1"), "--prune-layers"),
    Case("compress-sparsity-3:8", compress("--weight-sparsity", "3:8"), "--weight-sparsity"),
    Case("compress-no-output", compress(output=False), "--output"),
    Case("compress-output-is-a-file", compress("--output-dir", lambda b, t: b["data"] / "vqa_val.json",
                                               output=False), "--output"),
    Case("compress-micro-batch-too-big", compress("--micro-batch-size", "64", "--max-steps", "1"),
         "--micro-batch-size"),
    Case("compress-alignment-tokens-0", compress("--num-alignment-tokens", "0"), "--num-alignment-tokens"),
    Case("compress-temperatures-negative", compress("--temperatures", "-1", "1"), "--temperatures"),
    Case("compress-lr-negative", compress("--lr", "-1"), "--lr"),
    Case("compress-resume-not-a-checkpoint", compress("--resume", lambda b, t: b["data"], "--max-steps", "1"),
         "--resume"),
    Case("compress-resume-damaged", compress("--resume", "--checkpoint-dir", lambda b, t: t / "ckpts",
                                             "--max-steps", "1"), "step_00000001/model.safetensors",
         setup=_damaged_checkpoint),
    Case("demo-threads-0", lambda b, t: ["demo", "--threads", "0", "--output", str(t / "o")], "--threads"),
    Case("demo-targets-1.5", lambda b, t: ["demo", "--targets", "1.5", "--output", str(t / "o")], "--targets"),
    Case("demo-steps-0", lambda b, t: ["demo", "--steps", "0", "--output", str(t / "o")], "--steps"),
    Case("demo-lr-0", lambda b, t: ["demo", "--lr", "0", "--quick", "--output", str(t / "o")], "--lr"),
    Case("demo-model-missing", lambda b, t: ["demo", "--model", str(t / "none"), "--output", str(t / "o")],
         "--model"),
    # ---- files of the model directory (with its manifest: the hashes catch them)
    Case("weights-truncated", ev(), "model.safetensors",
         damaged()(lambda d: _truncate(d / "model.safetensors"))),
    Case("weights-empty", ev(), "model.safetensors",
         damaged()(lambda d: (d / "model.safetensors").write_bytes(b""))),
    Case("weights-bit-flip", ev(), "model.safetensors",
         damaged()(lambda d: _flip_last_byte(d / "model.safetensors"))),
    Case("weights-missing", ev(), "model.safetensors",
         damaged()(lambda d: (d / "model.safetensors").unlink())),
    Case("config-truncated", ev(), "config.json", damaged()(lambda d: _truncate(d / "config.json"))),
    Case("config-missing", ev(), "config.json", damaged()(lambda d: (d / "config.json").unlink())),
    Case("tokenizer-truncated", ev(), "tokenizer.json", damaged()(lambda d: _truncate(d / "tokenizer.json"))),
    Case("tokenizer-words-swapped", ev(), "tokenizer.json", damaged()(lambda d: _swap_words(d / "tokenizer.json"))),
    Case("manifest-edited-unsealed", ev(), "madtp.json",
         damaged()(lambda d: _edit_manifest(d, _set(["madtp", "temperature", "vision"], 2.0), reseal=False))),
    Case("manifest-malformed", ev(), "madtp.json", damaged()(lambda d: _truncate(d / "madtp.json"))),
    Case("manifest-not-an-object", ev(), "madtp.json",
         damaged()(lambda d: (d / "madtp.json").write_text("[1, 2]"))),
    # ---- consistent (resealed) manifests whose content is wrong
    Case("manifest-missing-layer", ev(), "madtp.json",
         damaged()(lambda d: _edit_manifest(d, lambda m: m["sparse_layers"].append("vision_model.nope.fc1")))),
    Case("manifest-unknown-key", ev(), "madtp.json",
         damaged()(lambda d: _edit_manifest(d, _set(["extra"], 1)))),
    Case("manifest-unknown-config-field", ev(), "madtp.json",
         damaged()(lambda d: _edit_manifest(d, _set(["madtp", "config", "speed"], 3)))),
    Case("manifest-wrong-type", ev(), "madtp.json",
         damaged()(lambda d: _edit_manifest(d, _set(["madtp", "temperature", "vision"], "hot")))),
    Case("manifest-negative-temperature", ev(), "madtp.json",
         damaged()(lambda d: _edit_manifest(d, _set(["madtp", "config", "temperature"], -1.0)))),
    Case("manifest-bool-merge", ev(), "madtp.json",
         damaged()(lambda d: _edit_manifest(d, _set(["madtp", "config", "merge_pruned"], "no")))),
    Case("manifest-prune-layers-int", ev(), "madtp.json",
         damaged()(lambda d: _edit_manifest(d, _set(["madtp", "config", "prune_layers"], 5)))),
    Case("manifest-layers-not-a-list", ev(), "madtp.json",
         damaged()(lambda d: _edit_manifest(d, _set(["sparse_layers"], "fc1")))),
    Case("manifest-unknown-format", ev(), "madtp.json",
         damaged()(lambda d: _edit_manifest(d, _set(["format"], "madtp-compressed/9")))),
    # ---- a plain Hugging Face directory (no manifest, nothing to check against): the readers' own errors
    Case("plain-weights-truncated", ev(), "model.safetensors",
         plain(lambda d: _truncate(_plain(d) / "model.safetensors", 0.2))),
    Case("plain-weights-empty", ev(), "model.safetensors",
         plain(lambda d: (_plain(d) / "model.safetensors").write_bytes(b""))),
    Case("plain-weights-pickled", ev(), "model.safetensors", plain(lambda d: _pickled(_plain(d)))),
    Case("plain-weights-other-model", ev(), "model.safetensors", setup=lambda b, t: (   # 2:4 weights, dense config
        _plain(_copy_tree(b["dense"], t / "model")) / "model.safetensors").write_bytes(
            (b["model"] / "model.safetensors").read_bytes())),
    Case("plain-config-truncated", ev(), "config.json", plain(lambda d: _truncate(_plain(d) / "config.json"))),
    Case("plain-config-model-type", ev(), "config.json", plain(lambda d: _model_type(_plain(d)))),
    Case("plain-config-architectures", ev(), "config.json", plain(lambda d: _architectures(_plain(d)))),
    Case("plain-config-bad-heads", ev(), "config.json", plain(lambda d: _bad_width(_plain(d)))),
    Case("plain-tokenizer-truncated", ev(), "tokenizer.json",
         plain(lambda d: _truncate(_plain(d) / "tokenizer.json"))),
    # ---- data
    Case("data-decompression-bomb", ev("model", data=_data_with(lambda d: _bomb_png(d / "images/val/000001.png"))),
         "000001.png"),
    Case("data-image-garbage", ev("model", data=_data_with(
        lambda d: (d / "images/val/000002.png").write_bytes(b"not a png"))), "000002.png"),
    Case("data-image-missing", ev("model", data=_data_with(lambda d: (d / "images/val/000003.png").unlink())),
         "000003.png"),
    Case("data-annotations-malformed", ev("model", data=_data_with(
        lambda d: _truncate(d / "retrieval_val.json"))), "retrieval_val.json"),
    Case("data-annotations-missing-key", ev("model", data=_data_with(
        lambda d: _entries(d, lambda e: e[0].pop("caption")))), "retrieval_val.json"),
    Case("data-annotations-wrong-type", ev("model", data=_data_with(
        lambda d: _entries(d, lambda e: e[1].update(image=7)))), "retrieval_val.json"),
]


def run_main(argv, capsys):
    """(exit status, stdout, stderr, traceback or None) of `madtp argv`, in-process."""
    tb = None
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:   # main should return, but a SystemExit out of it is still an exit status
        code = e.code
    except BaseException:
        code, tb = 1, traceback.format_exc()
    out, err = capsys.readouterr()
    return code, out, err, tb


def check_one_line(code, err, tb, names):
    assert tb is None, f"raised instead of exiting 2:\n{tb}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and err.endswith("\n"), (code, err)
    assert names in lines[0], f"the message does not name {names!r}: {lines[0]}"
    assert lines[0].startswith("madtp"), lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_error_is_one_line_exit_2(case, base, tmp_path, capsys):
    if case.setup is not None:
        case.setup(base, tmp_path)
    code, _, err, tb = run_main(case.argv(base, tmp_path), capsys)
    check_one_line(code, err, tb, case.names)


def test_catalogue_size():
    assert len(CASES) >= 40


def test_a_bug_is_a_traceback(base, monkeypatch, capsys):
    """Not a user error: main does not turn it into exit 2; Python prints the traceback (exit 1)."""
    def broken(*a, **k):
        raise KeyError("a bug")
    monkeypatch.setattr(cli, "load_model_dir", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(ev()(base, Path("/nonexistent")))


@pytest.mark.parametrize("case_id", ["weights-bit-flip", "plain-weights-pickled", "demo-threads-0"])
def test_as_a_subprocess(case_id, base, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
    if case.setup is not None:
        case.setup(base, tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, "-m", "madtp.cli", *case.argv(base, tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    check_one_line(proc.returncode, proc.stderr, None, case.names)


def test_a_good_export_evaluates(base, capsys):
    """The catalogue's base is sound: the same invocation on the undamaged export exits 0."""
    code, out, err, tb = run_main(ev()(base, Path("/nonexistent")), capsys)
    assert tb is None and code == 0, (code, err, tb)
    assert "i2t_r1" in out
