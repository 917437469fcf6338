"""One applied model called from several threads at once (what a server does): every call must compute exactly
what the same call computes alone, raise nothing, and leave its own pruning report and records (with
`madtp.recording`) to the thread that made it.

The oracle is the same call made single-threaded on the same model. Outputs are compared bit for bit: with one
intra-op thread (set below) every op runs the same code on the same values whichever Python thread calls it, so
any difference is state leaking between calls; and a pruning decision is discrete, so a leak shows as a changed
token set rather than a rounding error.
"""
import copy
import io
import os
import random
import threading
from contextlib import nullcontext

import madtp
import pytest
import test_blip
import test_clip
import torch

import madtp_kernels as mk

THREADS = 4
# mixed batch sizes, one job each; every thread runs every job. Triton runs under the interpreter here (seconds
# per call): fewer, smaller jobs.
BATCHES = {"torch": (1, 3, 2, 5, 4, 1), "triton": (1, 2)}
ROUNDS = {"torch": 4, "triton": 1}   # times each thread runs each job


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def serial_interpreter(monkeypatch):
    """Triton's CPU interpreter runs one kernel at a time: while a kernel runs it patches triton.language and
    keeps one global grid index (two at once fail with "Did you forget to add @triton.jit ?"). On a GPU, launches
    from several threads are fine. Only the interpreted kernel bodies are serialised here; everything around
    them (the model, madtp, the dispatch and launch set-up) still runs in all threads at once."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    lock, run = threading.Lock(), interpreter.GridExecutor.__call__

    def one_at_a_time(self, *args, **kwargs):
        with lock:
            return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", one_at_a_time)


def clip_jobs(seed, batches):
    rng = random.Random(seed)
    jobs = []
    for i, batch in enumerate(batches):
        lengths = [rng.randint(2, 9) for _ in range(batch)]
        jobs.append(test_clip.inputs(batch=batch, lengths=lengths, seed=seed + i))
    return jobs


def blip_jobs(seed, batches):
    rng = random.Random(seed)
    jobs = []
    for i, batch in enumerate(batches):
        x = test_blip.inputs([rng.randint(2, 9) for _ in range(batch)], seed=seed + i)
        jobs.append({**x, "use_itm_head": i % 2 == 0})   # ITM (text cross-attends the pruned image) and ITC
    return jobs


MODELS = {
    "clip": (lambda: test_clip.CLIPModel(test_clip.tiny_config()).eval(), clip_jobs),
    "blip": (lambda: test_blip.build(test_blip.BlipForImageTextRetrieval), blip_jobs),
}


def _tensors(out):
    """Every tensor of a model output, by name (nested outputs flattened)."""
    found = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            found[key] = value
        elif hasattr(value, "items"):
            found.update({f"{key}.{k}": v for k, v in _tensors(value).items()})
    return found


def call(model, x, backend, record):
    """One forward and what it leaves for its own thread: outputs, pruning report, alignment loss."""
    with torch.no_grad(), mk.use_backend(backend), (madtp.recording(model) if record else nullcontext()):
        out = _tensors(model(**x))
        report = madtp.pruning_report(model)
        records = model.madtp.records
        # inference does no training work: a recording mode leaking in from another thread shows here
        out["recorded"] = torch.tensor([r.pooled is not None for r in records.values()])
        if record:
            out["alignment_loss"] = madtp.alignment_loss(model)
            for branch, rec in records.items():
                out[f"summaries.{branch}"] = torch.stack(rec.summaries)
    return out, report


def hammer(model, jobs, backend, record, rounds=1):
    """Every thread runs every job (in its own order) `rounds` times, odd threads inside madtp.recording if
    `record`; returns [(job, recorded, result or exception)]."""
    barrier = threading.Barrier(THREADS)
    results = [[] for _ in range(THREADS)]

    def worker(t):
        order = [j for _ in range(rounds) for j in range(len(jobs))]
        random.Random(t).shuffle(order)
        barrier.wait()
        mode = record and t % 2 == 1
        for j in order:
            try:
                results[t].append((j, mode, call(model, jobs[j], backend, mode)))
            except Exception as e:   # noqa: BLE001 - reported with the job below
                results[t].append((j, mode, e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for per_thread in results for r in per_thread]


def mismatches(expected, got):
    """Names of what differs between two call() results."""
    if isinstance(got, Exception):
        return [f"raised {type(got).__name__}: {got}"]
    (out_e, rep_e), (out_g, rep_g) = expected, got
    bad = [k for k in out_e if k not in out_g or out_e[k].shape != out_g[k].shape
           or not torch.equal(out_e[k], out_g[k])]
    bad += [f"report {k}" for k in rep_e.keys() | rep_g.keys()
            if k not in rep_e or k not in rep_g or not torch.equal(rep_e[k], rep_g[k])]
    return bad


# Every model and execution on the torch backend, with every thread at inference, and with half of them inside
# madtp.recording (a mode of the thread, not of the model); on Triton (under the interpreter, slow) the path a GPU
# serves: CLIP, ragged, both modes at once.
CASES = [(m, e, "torch", r) for m in MODELS for e in ("ragged", "padded") for r in (False, True)]
CASES += [("clip", "ragged", "triton", True)]


@pytest.mark.parametrize("name,execution,backend,record", CASES)
def test_threads_compute_what_each_call_computes_alone(name, execution, backend, record, serial_interpreter):
    if backend not in mk.available_backends():
        pytest.skip(f"backend {backend} not available")
    make, make_jobs = MODELS[name]
    torch.manual_seed(0)
    model = madtp.apply(make(), madtp.MADTPConfig(num_alignment_tokens=8, temperature=1.0, execution=execution))
    jobs = make_jobs(len(CASES) + 10 * record, BATCHES[backend])
    expected = {mode: [call(model, x, backend, mode) for x in jobs] for mode in {False, record}}
    # the jobs prune, and differently per sample: a leak between calls would show
    assert any(len(set(kept.tolist())) > 1 for _, report in expected[False] for kept in report.values())
    rounds = ROUNDS[backend]
    failures = [(j, mode, bad) for j, mode, got in hammer(model, jobs, backend, record, rounds)
                if (bad := mismatches(expected[mode][j], got))]
    assert not failures, f"{len(failures)} of {THREADS * rounds * len(jobs)} calls: {failures[:5]}"


def test_a_copy_starts_without_forwards_and_saves():
    # The per-thread and per-output state is not copied: the copy has run no forward, and torch.save works.
    model = madtp.apply(MODELS["clip"][0](), madtp.MADTPConfig(num_alignment_tokens=8, temperature=1.0))
    x = clip_jobs(0, (3,))[0]
    out, report = call(model, x, "torch", False)
    for clone in (copy.deepcopy(model), _saved_and_loaded(model, io.BytesIO())):
        assert clone.madtp.records == {} and len(clone.madtp._outputs) == 0
        got, got_report = call(clone, x, "torch", False)
        assert not mismatches((out, report), (got, got_report))
    assert madtp.pruning_report(model).keys() == report.keys()   # the original keeps its own


def _saved_and_loaded(model, buffer):
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)
