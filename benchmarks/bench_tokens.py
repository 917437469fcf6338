"""Token ops vs what a user writes without them: boolean-mask compaction of a padded batch.

Each case is timed for every backend that can run on this device and for the baseline, in the same run.
"""
from dataclasses import dataclass

import pytest
import torch
from conftest import BATCH, DEVICE, record, run

import madtp_kernels as mk
from madtp_kernels import _dispatch


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    channels: int
    keep_ratio: float


CASES = [Case("vit-b16", 197, 768, 0.5), Case("vit-b16", 197, 768, 0.3), Case("vit-l14-336", 577, 1024, 0.5)]
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32


def backends(op):
    return [b for b in _dispatch.available_backends()
            if b in _dispatch.implementations(op) and DEVICE.type in _dispatch.BACKENDS[b].devices]


def make(case: Case):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, case.tokens, case.channels, generator=g).to(DEVICE, DTYPE)
    scores = torch.rand(BATCH, case.tokens, generator=g).to(DEVICE)
    threshold = torch.full((BATCH,), 1 - case.keep_ratio, device=DEVICE)
    return x, scores, threshold


def baseline_prune(x, scores, threshold, keep_first=1):
    """Boolean-mask compaction of the padded batch plus a score-weighted merged token per sample."""
    positions = torch.arange(x.shape[1], device=x.device)
    keep = (positions < keep_first) | (scores > threshold[:, None])
    w = torch.where(keep, 0.0, scores)
    merged = (w[..., None] * x.float()).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-12)
    return torch.cat([x[keep], merged.to(x.dtype)]), keep.sum(1)


def bytes_of(case, x, kept_rows):
    elem = x.element_size()
    return x.numel() * elem + kept_rows * case.channels * elem + x.shape[0] * case.tokens * 4


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.name}-keep{c.keep_ratio}")
@pytest.mark.parametrize("impl", ["baseline"] + backends("prune_tokens"))
def test_prune_tokens(benchmark, case, impl):
    x, scores, threshold = make(case)
    packed, cu = mk.pack(x, torch.full((BATCH,), case.tokens, device=DEVICE))
    flat_scores = scores.reshape(-1)
    if impl == "baseline":
        fn = lambda: baseline_prune(x, scores, threshold)  # noqa: E731
    else:
        def fn():
            with mk.use_backend(impl):
                return mk.prune_tokens(packed, cu, flat_scores, threshold)
    benchmark.group = f"prune_tokens {case.name} keep {case.keep_ratio}"
    out = run(benchmark, fn)
    kept_rows = out[0].shape[0]
    record(benchmark, backend=impl, bytes_moved=bytes_of(case, x, kept_rows), rows_out=kept_rows, batch=BATCH)


@pytest.mark.parametrize("case", CASES[::2], ids=lambda c: c.name)
@pytest.mark.parametrize("impl", ["baseline"] + backends("pack"))
def test_pack(benchmark, case, impl):
    x, scores, _ = make(case)
    mask = scores > 1 - case.keep_ratio
    if impl == "baseline":
        fn = lambda: (x[mask], mask.sum(1).cumsum(0))  # noqa: E731
    else:
        def fn():
            with mk.use_backend(impl):
                return mk.pack(x, mask=mask)
    benchmark.group = f"pack {case.name}"
    packed = run(benchmark, fn)[0]
    record(benchmark, backend=impl, bytes_moved=(x.numel() + packed.numel()) * x.element_size(), batch=BATCH)


@pytest.mark.parametrize("case", CASES[::2], ids=lambda c: c.name)
@pytest.mark.parametrize("impl", ["baseline"] + backends("unpack"))
def test_unpack(benchmark, case, impl):
    x, scores, _ = make(case)
    mask = scores > 1 - case.keep_ratio
    packed, cu = mk.pack(x, mask=mask)
    lengths = mask.sum(1)
    max_len = int(lengths.max())
    if impl == "baseline":
        def fn():
            out = packed.new_zeros(BATCH, max_len, case.channels)
            out[torch.arange(max_len, device=DEVICE) < lengths[:, None]] = packed
            return out
    else:
        def fn():
            with mk.use_backend(impl):
                return mk.unpack(packed, cu, max_len=max_len)
    benchmark.group = f"unpack {case.name}"
    out = run(benchmark, fn)
    record(benchmark, backend=impl, bytes_moved=(packed.numel() + out.numel()) * x.element_size(), batch=BATCH)
