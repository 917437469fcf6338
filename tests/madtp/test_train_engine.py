"""The training engine: DDP equivalence, accumulation equivalence, exact resume (in-process mid-epoch and after a
SIGKILL), crash-safe checkpoints, bad input. Toy model and task live in _train_toy.py (also run as a script)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _train_toy import RegressionTask, TempController, ToyDataset, ToyMLP, build, main
from madtp.train import GlobalBatchSampler, TrainConfig, Trainer, latest_checkpoint, list_checkpoints
from madtp.train import checkpoint as ckpt
from madtp.train.checkpoint import flatten_state, unflatten_state
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
TOY = HERE / "_train_toy.py"
SRC = HERE.parents[1] / "python"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return env


def _cfg(out, **kw):
    kw = {"max_steps": 8, "micro_batch_size": 4, "progress": False, **kw}
    return TrainConfig(output_dir=str(out), **kw)


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _ckpt_weights(ckpt_dir):
    return load_file(str(latest_checkpoint(ckpt_dir) / ckpt.MODEL_FILE))


def _metrics(out):
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("elapsed_s")
    return lines


def _assert_equal_weights(a, b, atol=0.0):
    # a state_dict lists a tied weight under both names; a safetensors file stores it once
    common = set(a) & set(b)
    assert common and {"fc1.weight", "fc2.weight", "head.weight"} <= common
    for k in sorted(common):
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# ---------------------------------------------------------------------------------------------------------------
# Sharding and accumulation
# ---------------------------------------------------------------------------------------------------------------
def test_sampler_same_micro_batches_for_any_world_size():
    n, b = 50, 3
    layouts = [(1, 4), (2, 2), (4, 1)]                     # (world_size, accumulation), global batch 12
    per_layout = []
    for world, accum in layouts:
        micro = {}                                         # (epoch, step, j) -> indices
        for r in range(world):
            s = GlobalBatchSampler(n, b, accum, world, r, seed=7)
            assert s.global_batch_size == 12 and s.steps_per_epoch == 4
            for epoch in range(2):
                s.set_epoch(epoch)
                for i, idx in enumerate(s):
                    step, a = divmod(i, accum)
                    micro[(epoch, step, r * accum + a)] = idx
        per_layout.append(micro)
    assert per_layout[0] == per_layout[1] == per_layout[2]
    s = GlobalBatchSampler(n, b, 4, 1, 0, seed=7)
    for epoch in range(2):
        seen = [i for step in range(4) for i in s.global_batch(epoch, step)]
        assert len(set(seen)) == 48                        # no sample twice in an epoch; the last 2 dropped
        for step in range(4):
            assert sum((per_layout[0][(epoch, step, j)] for j in range(4)), []) == s.global_batch(epoch, step)
    assert s.permutation(0).tolist() != s.permutation(1).tolist()
    s.set_epoch(1, start_step=2)                           # a resume mid-epoch continues at the exact sample
    assert list(s) == [per_layout[0][(1, step, j)] for step in (2, 3) for j in range(4)]


def test_accumulation_equals_larger_batch(tmp_path):
    common = {"max_steps": 6, "warmup_steps": 2, "grad_clip": 0.5, "checkpoint_at_end": False}
    big = build(_cfg(tmp_path / "a", micro_batch_size=8, accumulation=1, **common))
    big.fit()
    acc = build(_cfg(tmp_path / "b", micro_batch_size=4, accumulation=2, num_workers=1, **common))
    acc.fit()
    _assert_equal_weights(_weights(big), _weights(acc), atol=1e-6)
    for x, y in zip(_metrics(tmp_path / "a"), _metrics(tmp_path / "b"), strict=True):
        assert x["step"] == y["step"]
        for k in ("loss", "mae", "lr", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k


def test_two_process_gloo_matches_one_process(tmp_path):
    """torchrun, 2 ranks x accumulation 1 == 1 process x accumulation 2 (global batch 8), dropout on."""
    args = ["--max-steps", "7", "--micro-batch-size", "4", "--dropout", "0.2", "--warmup-steps", "2",
            "--grad-clip", "1.0", "--checkpoint-every", "3", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(TOY),
         "--output-dir", str(tmp_path / "ddp"), "--accumulation", "1", *args],
        env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = build(_cfg(tmp_path / "one", max_steps=7, accumulation=2, warmup_steps=2, grad_clip=1.0), dropout=0.2)
    one.fit()
    ckpts = list_checkpoints(tmp_path / "ddp" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000006", "step_00000007"]   # keep_last=2, rank 0 only
    assert ckpt.read_meta(ckpts[-1])["world_size"] == 2
    _assert_equal_weights(_ckpt_weights(tmp_path / "ddp" / "checkpoints"), _weights(one), atol=1e-5)
    ddp_logs, one_logs = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "one")
    assert [x["step"] for x in ddp_logs] == list(range(1, 8))               # one line per step, rank 0 only
    for x, y in zip(ddp_logs, one_logs, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), x["step"]


# ---------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------
def test_resume_mid_epoch_is_exact(tmp_path):
    # 36 samples / global batch 6 = 6 steps an epoch; stop at 9 = middle of epoch 2
    common = {"max_steps": 16, "micro_batch_size": 3, "accumulation": 2, "warmup_steps": 3, "grad_clip": 1.0,
              "eval_every": 5, "log_every": 2}
    eval_loader = torch.utils.data.DataLoader(ToyDataset(12), batch_size=6)
    ref = build(_cfg(tmp_path / "ref", **common), samples=36, dropout=0.3, eval_loader=eval_loader)
    ref.fit()

    first = build(_cfg(tmp_path / "run", **common), samples=36, dropout=0.3, eval_loader=eval_loader)
    first.fit(stop_at=9)
    assert first.step == 9 and latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000009"
    meta = ckpt.read_meta(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 3)

    # a different init seed: everything must come from the checkpoint
    resumed = build(_cfg(tmp_path / "run", resume=True, **common), samples=36, dropout=0.3, init_seed=99,
                    eval_loader=eval_loader)
    assert resumed.step == 9
    assert resumed.model.fc3.weight is resumed.model.fc2.weight              # tie survives the round trip
    resumed.fit()
    _assert_equal_weights(_weights(ref), _weights(resumed))
    ctl_ref, ctl_res = ref.callbacks[0], resumed.callbacks[0]
    assert ctl_ref.temperature == ctl_res.temperature and torch.equal(ctl_ref.history, ctl_res.history)
    assert len(ctl_res.history) == 16
    for a, b in zip(ref.optimizer.state.values(), resumed.optimizer.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert ref.scheduler.state_dict() == resumed.scheduler.state_dict()
    assert _metrics(tmp_path / "ref") == _metrics(tmp_path / "run")          # incl. eval/mse at 5, 10, 15, 16
    assert "eval/mse" in _metrics(tmp_path / "ref")[-1]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    out = tmp_path / "run"
    ckdir = out / "checkpoints"
    args = ["--output-dir", str(out), "--max-steps", "60", "--micro-batch-size", "4", "--accumulation", "2",
            "--dropout", "0.1", "--warmup-steps", "5", "--checkpoint-every", "3", "--keep-last", "3"]
    proc = subprocess.Popen([sys.executable, str(TOY), *args, "--sleep", "0.03"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        checks = 0
        while True:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint past step 9 appeared"
            try:
                name = (ckdir / ckpt.LATEST).read_text().strip()
            except OSError:
                name = ""
            if name:
                # `latest` always names a complete checkpoint (or has moved on when a prune raced this read)
                if not ckpt.is_complete(ckdir / name):
                    assert (ckdir / ckpt.LATEST).read_text().strip() != name, name
                checks += 1
                if int(name.split("_")[1]) >= 9:
                    break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL and checks > 0
    killed_at = latest_checkpoint(ckdir)
    assert killed_at is not None and 9 <= ckpt.read_meta(killed_at)["step"] < 60
    assert all(ckpt.is_complete(p) for p in ckdir.glob("step_*"))

    main([*args, "--no-progress", "--sleep", "0.0001", "--resume"])        # the script's --resume, in-process
    ref = build(_cfg(tmp_path / "ref", max_steps=60, accumulation=2, warmup_steps=5), dropout=0.1)
    ref.fit()
    assert not any(p.name.startswith(".tmp-") for p in ckdir.iterdir())
    _assert_equal_weights(_ckpt_weights(ckdir), _weights(ref))
    assert _metrics(out) == _metrics(tmp_path / "ref")


def test_partial_checkpoints_are_ignored(tmp_path, monkeypatch):
    ckdir = tmp_path / "checkpoints"
    t = build(_cfg(tmp_path, max_steps=4, checkpoint_every=2))
    t.fit()
    assert [p.name for p in list_checkpoints(ckdir)] == ["step_00000002", "step_00000004"]

    # a write that dies half-way leaves `latest` and the old checkpoints alone
    def broken_save_file(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "save_file", broken_save_file)
    t.step = 5
    with pytest.raises(OSError, match="disk full"):
        t.save_checkpoint()
    monkeypatch.undo()
    assert latest_checkpoint(ckdir).name == "step_00000004"
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_00000002", "step_00000004"]

    # what a SIGKILL mid-write can leave, and a pointer to a checkpoint that is not complete
    tmp = ckdir / ".tmp-step_00000006-xyz"
    tmp.mkdir()
    (tmp / ckpt.MODEL_FILE).write_bytes(b"\0" * 7)
    bad = ckdir / "step_00000008"
    bad.mkdir()
    (bad / ckpt.MODEL_FILE).write_bytes(b"\0" * 7)
    truncated = ckdir / "step_00000010"
    truncated.mkdir()
    for f in (ckpt.MODEL_FILE, ckpt.STATE_TENSOR_FILE, ckpt.STATE_JSON):
        (truncated / f).write_bytes((ckdir / "step_00000004" / f).read_bytes())
    with open(truncated / ckpt.MODEL_FILE, "r+b") as f:
        f.truncate(100)
    (ckdir / ckpt.LATEST).write_text("step_00000010\n")
    assert [p.name for p in list_checkpoints(ckdir)] == ["step_00000002", "step_00000004"]
    # `latest` names it, so it was complete once: damaged since, an error rather than a silent older resume
    with pytest.raises(ckpt.IntegrityError, match=r"step_00000010/model\.safetensors: truncated"):
        latest_checkpoint(ckdir)
    with pytest.raises(ckpt.IntegrityError, match=r"step_00000010/model\.safetensors: truncated"):
        build(_cfg(tmp_path, max_steps=6, checkpoint_every=2, resume=True))
    shutil.rmtree(truncated)   # what the user does about it: `latest` names nothing now, the newest complete wins
    assert latest_checkpoint(ckdir).name == "step_00000004"

    resumed = build(_cfg(tmp_path, max_steps=6, checkpoint_every=2, resume=True))
    assert resumed.step == 4
    resumed.fit()
    assert not tmp.exists()
    assert latest_checkpoint(ckdir).name == "step_00000006"
    assert (ckdir / ckpt.LATEST).stat().st_mode & 0o044                     # readable like an ordinary file


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fname", [ckpt.MODEL_FILE, ckpt.STATE_TENSOR_FILE, ckpt.STATE_JSON])
def test_checkpoint_hashes_catch_a_flipped_bit(tmp_path, fname):
    ckdir = tmp_path / "checkpoints"
    t = build(_cfg(tmp_path, max_steps=2, checkpoint_every=2))
    t.fit()
    step = latest_checkpoint(ckdir)
    meta = json.loads((step / ckpt.STATE_JSON).read_text())
    assert meta["format"] == 2 and set(meta["files"]) == {ckpt.MODEL_FILE, ckpt.STATE_TENSOR_FILE}
    for name, entry in meta["files"].items():
        assert entry == {"size": (step / name).stat().st_size,
                         "sha256": __import__("hashlib").sha256((step / name).read_bytes()).hexdigest()}
    ckpt.load_checkpoint(step, build(_cfg(tmp_path / "x", max_steps=2)).model)   # intact: loads
    f = step / fname
    if fname == ckpt.STATE_JSON:   # a digit of the step: valid JSON, another value
        text = f.read_text()
        f.write_text(text.replace('"step": 2', '"step": 3', 1))
        assert f.read_text() != text
    else:                          # a bit in the last tensor's data: same size, still valid safetensors
        _flip(f, f.stat().st_size - 1)
    bad = rf"{step.name}/{fname.replace('.', '[.]')}: corrupted"
    with pytest.raises(ckpt.IntegrityError, match=bad):
        ckpt.load_checkpoint(step, build(_cfg(tmp_path / "x", max_steps=2)).model)
    with pytest.raises(ckpt.IntegrityError, match=bad):
        build(_cfg(tmp_path, max_steps=4, checkpoint_every=2, resume=True))
    with pytest.raises(ckpt.IntegrityError, match=bad):
        build(_cfg(tmp_path, max_steps=4, checkpoint_every=2, resume=str(step)))


def test_checkpoint_missing_file_and_format_1(tmp_path):
    ckdir = tmp_path / "checkpoints"
    t = build(_cfg(tmp_path, max_steps=2, checkpoint_every=2))
    t.fit()
    step = latest_checkpoint(ckdir)
    saved = (step / ckpt.STATE_TENSOR_FILE).read_bytes()
    (step / ckpt.STATE_TENSOR_FILE).unlink()
    with pytest.raises(ckpt.IntegrityError, match=r"state\.safetensors: missing"):
        build(_cfg(tmp_path, max_steps=4, resume=True))
    (step / ckpt.STATE_TENSOR_FILE).write_bytes(saved)
    # a format-1 checkpoint (sizes, no hashes) still resumes; its sizes are still checked
    meta = json.loads((step / ckpt.STATE_JSON).read_text())
    meta.pop("manifest_sha256")
    meta["format"] = 1
    meta["files"] = {k: v["size"] for k, v in meta["files"].items()}
    (step / ckpt.STATE_JSON).write_text(json.dumps(meta))
    assert build(_cfg(tmp_path, max_steps=4, resume=True)).step == 2
    with open(step / ckpt.MODEL_FILE, "r+b") as f:
        f.truncate(50)
    with pytest.raises(ckpt.IntegrityError, match=r"model\.safetensors: truncated"):
        build(_cfg(tmp_path, max_steps=4, resume=True))


def test_state_flattening_round_trips():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], betas=(0.8, 0.9))
    p.grad = torch.ones(3)
    opt.step()
    shared = torch.arange(6.0)
    state = {"optimizer": opt.state_dict(), "t": (1, 2.5, "x", None), "views": [shared[:3], shared[3:]],
             "nested": {"__tensor__": 1, 3: [True, float("inf")]}}
    spec, tensors = flatten_state(state)
    json.dumps(spec)
    back = unflatten_state(json.loads(json.dumps(spec)), tensors)
    assert back["t"] == (1, 2.5, "x", None) and back["nested"] == {"__tensor__": 1, 3: [True, float("inf")]}
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert list(back["optimizer"]["state"]) == [0]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state[p]["exp_avg"])
    assert torch.equal(back["views"][1], shared[3:])
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    opt2.load_state_dict(back["optimizer"])
    with pytest.raises(TypeError, match="without pickle"):
        flatten_state({"f": object()})


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"accumulation": 0}, "accumulation"),
    ({"micro_batch_size": 0}, "micro_batch_size"),
    ({"max_steps": 0}, "max_steps"),
    ({"lr": -1.0}, "lr"),
    ({"amp": "fp8"}, "amp"),
    ({"schedule": "linear"}, "schedule"),
    ({"grad_clip": 0.0}, "grad_clip"),
    ({"keep_last": 0}, "keep_last"),
    ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
    ({"betas": (0.9,)}, "betas"),
])
def test_bad_config_values(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, **kw)


def test_bad_paths_and_resume(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="checkpoint_dir: .* is a file"):
        _cfg(tmp_path / "out", checkpoint_dir=str(a_file))
    with pytest.raises(ValueError, match="output_dir: .* is a file"):
        _cfg(a_file)
    with pytest.raises(ValueError, match="resume: no complete checkpoint found"):
        build(_cfg(tmp_path / "empty", resume=True))
    with pytest.raises(ValueError, match="resume: .* is not a complete checkpoint"):
        build(_cfg(tmp_path / "empty", resume=str(tmp_path)))
    t = build(_cfg(tmp_path / "run", max_steps=2))
    t.fit()
    with pytest.raises(ValueError, match="resume: .*global batch of 4.*has 8"):
        build(_cfg(tmp_path / "run", max_steps=4, accumulation=2, resume=True))
    with pytest.raises(ValueError, match="resume: .*seed"):
        build(_cfg(tmp_path / "run", max_steps=4, seed=1, resume=True))


def test_bad_runtime_input(tmp_path):
    with pytest.raises(ValueError, match="micro_batch_size: the dataset has 40 samples, fewer than one global"):
        build(_cfg(tmp_path, micro_batch_size=16, accumulation=4))
    with pytest.raises(ValueError, match="amp: 'bf16' needs a CUDA device"):
        build(_cfg(tmp_path, amp="bf16", device="cpu"))
    with pytest.raises(TypeError, match="task"):
        Trainer(ToyMLP(), object(), ToyDataset(), _cfg(tmp_path))
    with pytest.raises(TypeError, match="callbacks\\[0\\]"):
        Trainer(ToyMLP(), RegressionTask(), ToyDataset(), _cfg(tmp_path), callbacks=[object()])

    class NoLossKey:
        def loss(self, model, batch):
            return {"mse": model(batch["x"]).mean()}
    with pytest.raises(ValueError, match="Task.loss: expected a dict with a 'loss' entry"):
        Trainer(ToyMLP(), NoLossKey(), ToyDataset(), _cfg(tmp_path)).fit()
    t = build(_cfg(tmp_path / "cb", max_steps=2))
    t.fit()
    with pytest.raises(ValueError, match="callbacks: .* holds the state of 1 callbacks, this trainer has 2"):
        Trainer(ToyMLP(), RegressionTask(), ToyDataset(), _cfg(tmp_path / "cb", resume=True),
                callbacks=[TempController(), TempController()])
