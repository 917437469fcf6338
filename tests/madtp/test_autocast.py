"""Issue 15 B4: the alignment scores (and the pooled features' softmax) stay fp32 under autocast.

Autocast runs matmuls in fp16/bf16 even on fp32 inputs, so `h.float() @ tokens.float().t()` came back in the
autocast dtype: the pruning op refused it, and where it was taken, A / temperature at temperature 1e-3 holds what
fp16 cannot (a NaN threshold). The ops themselves must compute in what they are given (their products inside an
autocast region would be recast too).
"""
import math

import madtp
import madtp.pruning
import pytest
import torch
from madtp.alignment import AlignmentTokens
from test_clip import text_batch, tiny_config
from transformers import CLIPModel

from madtp_kernels import RaggedLayout

DTYPES = [torch.bfloat16, torch.float16]   # CPU autocast takes both in torch 2.14
TAU = 1e-3                                  # the smallest temperature the controller allows


def _alignment(seed=0):
    torch.manual_seed(seed)
    align = AlignmentTokens(5, {"vision": 24, "text": 16})
    with torch.no_grad():
        align.tokens.normal_(0, 1.0)   # the official init: scores far above fp16's 65504 * TAU
    return align


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("branch,width", [("vision", 24), ("text", 16)])   # identity map; a Linear map
def test_scores_are_fp32_under_autocast(dtype, branch, width):
    align = _alignment()
    x = torch.randn(37, width, generator=torch.Generator().manual_seed(1)) * 10
    with torch.autocast("cpu", dtype=dtype):
        scores, h = align.scores(x, branch)
    with torch.no_grad():
        h64 = x.double() if branch == "vision" else x.double() @ align.maps[branch].weight.double().t()
        want = h64 @ align.tokens.double().t()
    assert scores.dtype == torch.float32
    assert float(want.abs().max()) > 65504 * TAU   # A / TAU is out of fp16's range here
    # fp32's own rounding of these products is ~1e-6 relative; fp16/bf16 products are off by 1e-3..1e-2
    torch.testing.assert_close(scores.double(), want, rtol=2e-6, atol=2e-6 * float(want.abs().max()))
    torch.testing.assert_close(h.double(), h64, rtol=2e-6, atol=2e-6 * float(h64.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pooled_is_fp32_under_autocast(dtype):
    align = _alignment()
    lengths = [6, 1, 9]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(sum(lengths), 24, generator=g) * 4
    candidates = torch.rand(sum(lengths), generator=g) < 0.7
    layout = RaggedLayout.from_cu_seqlens(torch.tensor([0, 6, 7, 16], dtype=torch.int32))
    with torch.autocast("cpu", dtype=dtype):
        scores, h = align.scores(x, "vision")
        pooled = align.pooled(scores, h, layout, candidates)
    assert pooled.dtype == torch.float32
    # the formula: per sample and token k, softmax over its candidate rows i of A_ik / sqrt(d), weighting h_i
    a64, h64 = x.double() @ align.tokens.detach().double().t(), x.double()
    want = torch.zeros(len(lengths), 5, 24, dtype=torch.float64)
    start = 0
    for b, n in enumerate(lengths):
        rows = [start + i for i in range(n) if candidates[start + i]]
        if rows:
            w = torch.softmax(a64[rows] / math.sqrt(align.dim), dim=0)   # [n_c, K]
            want[b] = w.t() @ h64[rows]
        start += n
    torch.testing.assert_close(pooled.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _steps(monkeypatch):
    steps = []
    real = madtp.pruning.score_and_prune

    def spy(x, layout, *args, **kwargs):
        out = real(x, layout, *args, **kwargs)
        steps.append((x.shape[1], out))
        return out

    monkeypatch.setattr(madtp.pruning, "score_and_prune", spy)
    return steps


@pytest.mark.parametrize("dtype", DTYPES)
def test_autocast_forward_keeps_what_fp32_keeps(monkeypatch, dtype):
    torch.manual_seed(0)
    model = madtp.apply(CLIPModel(tiny_config()).eval(), madtp.MADTPConfig(num_alignment_tokens=8, temperature=TAU))
    with torch.no_grad():
        model.madtp.alignment.tokens.normal_(0, 1.0)
    ids, mask = text_batch([9, 2, 6, 5, 12, 16, 3, 8], seed=0)
    x = dict(input_ids=ids, attention_mask=mask,
             pixel_values=torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    steps = _steps(monkeypatch)
    runs = {}
    for name, ctx in (("fp32", torch.autocast("cpu", enabled=False)), ("amp", torch.autocast("cpu", dtype=dtype))):
        steps.clear()
        with torch.no_grad(), ctx:
            out = model(**x)
        runs[name] = list(steps)
        assert torch.isfinite(out.logits_per_image).all()
    fp32, amp = runs["fp32"], runs["amp"]
    assert len(amp) == len(fp32) == 3 + 2   # every layer of both towers prunes
    for _width, res in amp:
        assert res.threshold.dtype == torch.float32 and bool(torch.isfinite(res.threshold).all()), res.threshold
        assert bool(torch.isfinite(res.importance).all())
    # The first step of each tower sees the same rows in both runs: its kept sets nearly agree (measured on
    # this case, CPU: Jaccard 0.94-1.0 for bf16, 1.0 for fp16 over 6 seeds and two token inits).
    for width in (64, 96):
        a, b = (next(set(r.kept_index.tolist()) for w, r in run if w == width) for run in (fp32, amp))
        assert len(a & b) / len(a | b) >= 0.9, (width, sorted(a ^ b))
    # Over all layers the rows kept stay within 5% (measured: within 2.6%, CPU).
    kept32, kept = (sum(r.kept_index.numel() for _, r in run) for run in (fp32, amp))
    assert abs(kept / kept32 - 1) <= 0.05, (kept, kept32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_autocast_training_step(dtype):
    torch.manual_seed(0)
    model = madtp.apply(CLIPModel(tiny_config()), madtp.MADTPConfig(num_alignment_tokens=8, temperature=TAU))
    ids, mask = text_batch([9, 2, 6, 5], seed=0)
    x = dict(input_ids=ids, attention_mask=mask, return_loss=True,
             pixel_values=torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    with torch.autocast("cpu", dtype=dtype):
        out = model(**x)
        loss = out.loss + madtp.alignment_loss(model)
    assert model.madtp.records["vision"].pooled.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(loss)
    grad = model.madtp.alignment.tokens.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)
