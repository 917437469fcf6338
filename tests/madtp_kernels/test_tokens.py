"""pack / unpack / prune_tokens: every backend against a float64 per-sample oracle, gradients, opcheck."""
from __future__ import annotations

import pytest
import torch
from backend_params import backend_dtype_params, backend_params
from hypothesis import given, settings
from hypothesis import strategies as st

import madtp_kernels as mk
from madtp_kernels import _dispatch
from madtp_kernels.reference import tokens as ref

# Kept rows are copies and must match bit for bit. A merged row m = sum_d w_d x_d / W is accumulated in float32
# and rounded once to the dtype: |m~ - m| <= u_dtype |m| + gamma_(2n+1) (M + |m|) for n dropped rows, where
# M = sum_d |w_d x_d| / |W| (|x_d| / n for the plain mean) and gamma_k = k u / (1 - k u) at fp32's u = 2**-24
# (numerator, denominator and the division each round; Higham's bound for sums, in any order).
FP32_UNIT_ROUNDOFF = 2.0**-24


# ------------------------------------------------------------------ the oracle: a loop over samples, float64

def oracle_prune(x, cu, scores, threshold, keep_first, merge):
    ys, idx, counts, terms, magnitude = [], [], [], [], []
    x64, s64 = x.double(), scores.double()
    for b in range(cu.numel() - 1):
        lo, hi = int(cu[b]), int(cu[b + 1])
        kept, dropped = [], []
        for t in range(hi - lo):
            (kept if t < keep_first or s64[lo + t] > float(threshold[b]) else dropped).append(lo + t)
        ys += [x64[r] for r in kept]
        idx += kept
        terms += [0] * len(kept)
        magnitude += [x64.new_zeros(x.shape[1])] * len(kept)
        if merge and dropped:
            w = s64[dropped]
            rows = x64[dropped]
            ys.append((w[:, None] * rows).sum(0) / w.sum() if w.sum() != 0 else rows.mean(0))
            magnitude.append(((w.abs()[:, None] * rows.abs()).sum(0) / w.sum().abs() if w.sum() != 0
                              else rows.abs().mean(0)).detach())
            terms.append(len(dropped))
            idx.append(-1)
        counts.append(len(kept) + int(merge and bool(dropped)))
    y = torch.stack(ys) if ys else x64.new_zeros((0, x.shape[1]))
    cu_new = torch.tensor([0] + torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    magnitude = torch.stack(magnitude) if magnitude else x64.new_zeros((0, x.shape[1]))
    return y, cu_new, torch.tensor(idx, dtype=torch.int32), torch.tensor(terms, dtype=torch.float64), magnitude


@st.composite
def ragged_batches(draw, max_batch=6, max_len=12):
    """Random ragged batches, with empty samples, length-1 samples and (sometimes) one much longer sample."""
    batch = draw(st.integers(0, max_batch))
    lengths = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 8, max_len]), min_size=batch, max_size=batch))
    if batch and draw(st.booleans()):
        lengths[draw(st.integers(0, batch - 1))] = draw(st.integers(40, 120))  # skew
    channels = draw(st.sampled_from([1, 3, 37, 64]))
    seed = draw(st.integers(0, 2**31 - 1))
    return lengths, channels, seed


def make_prune_inputs(lengths, channels, seed, dtype, device, score_dtype=torch.float32, zero_scores=False):
    g = torch.Generator().manual_seed(seed)
    rows = sum(lengths)
    x = torch.randn(rows, channels, generator=g).to(dtype)
    scores = torch.rand(rows, generator=g)
    if zero_scores:
        scores = torch.where(scores < 0.5, 0.0, scores)
    threshold = torch.rand(len(lengths), generator=g) * 0.8
    cu = ref.offsets_of(torch.tensor(lengths, dtype=torch.int32))
    return (x.to(device), cu.to(device), scores.to(score_dtype).to(device), threshold.to(score_dtype).to(device))


def assert_pruned_matches(out, expected, dtype):
    y, layout, idx = out
    cu_new = layout.cu_seqlens
    ey, ecu, eidx, n, magnitude = expected
    assert layout.offsets == tuple(ecu.tolist()), "the returned layout's host offsets"
    assert torch.equal(cu_new.cpu(), ecu)
    assert torch.equal(idx.cpu(), eidx)
    assert y.dtype == dtype and y.shape == ey.shape
    kept = eidx >= 0
    assert torch.equal(y.cpu()[kept], ey[kept].to(dtype)), "kept rows must be exact copies"
    k = 2 * n[~kept, None] + 1
    gamma = k * FP32_UNIT_ROUNDOFF / (1 - k * FP32_UNIT_ROUNDOFF)
    finfo = torch.finfo(dtype)
    u = finfo.eps / 2
    exact = ey[~kept]
    bound = u * exact.abs() + (1 + u) * gamma * (magnitude[~kept] + exact.abs()) + finfo.smallest_normal * u
    excess = ((y.cpu()[~kept].double() - exact).abs() - bound).clamp_min(0)
    assert excess.numel() == 0 or excess.max() == 0, f"merged rows beyond the rounding bound by {excess.max():.3g}"


# ------------------------------------------------------------------ prune_tokens


# bf16 on a GPU only: Triton's interpreter truncates fp32 -> bf16 stores (0.061942 -> 0.061768, not the nearest
# 0.062012), one ulp past the merged row's round-once bound; cvt.rn on a GPU rounds to nearest.
@pytest.mark.parametrize("backend,device,dtype",
                         backend_dtype_params("prune_tokens", (torch.float32, torch.float16), cpu_bf16=False))
@settings(max_examples=25, deadline=None)
@given(batch=ragged_batches(), keep_first=st.sampled_from([0, 1, 3, 1000]), merge=st.booleans(),
       zero_scores=st.booleans())
def test_prune_tokens_matches_oracle(backend, device, dtype, batch, keep_first, merge, zero_scores):
    lengths, channels, seed = batch
    x, cu, scores, threshold = make_prune_inputs(lengths, channels, seed, dtype, device, zero_scores=zero_scores)
    with mk.use_backend(backend):
        out = mk.prune_tokens(x, cu, scores, threshold, keep_first=keep_first, merge=merge)
    assert_pruned_matches(out, oracle_prune(x.cpu(), cu.cpu(), scores.cpu(), threshold.cpu(), keep_first, merge),
                          dtype)


@pytest.mark.parametrize("backend,device", backend_params("prune_tokens"))
@pytest.mark.parametrize("score_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_prune_tokens_score_dtypes_and_edges(backend, device, score_dtype):
    # All dropped (threshold above every score), none dropped, and a batch of only empty samples.
    lengths = [0, 1, 7, 0, 30]
    x, cu, scores, _ = make_prune_inputs(lengths, 5, 0, torch.float32, device, score_dtype)
    for thr_value, keep_first in ((2.0, 0), (-1.0, 0), (2.0, 1), (0.5, 2)):
        threshold = torch.full((len(lengths),), thr_value, dtype=score_dtype, device=device)
        with mk.use_backend(backend):
            out = mk.prune_tokens(x, cu, scores, threshold, keep_first=keep_first)
        assert_pruned_matches(out, oracle_prune(x.cpu(), cu.cpu(), scores.cpu(), threshold.cpu(), keep_first,
                                                True), torch.float32)
    empty = torch.zeros(4, dtype=torch.int32, device=device)
    with mk.use_backend(backend):
        y, layout, idx = mk.prune_tokens(x[:0], empty, scores[:0], threshold[:3])
    assert y.shape == (0, 5) and idx.shape == (0,)
    assert torch.equal(layout.cu_seqlens.cpu(), torch.zeros(4, dtype=torch.int32))


@pytest.mark.parametrize("backend,device", backend_params("prune_tokens"))
def test_prune_tokens_noncontiguous_inputs(backend, device):
    x, cu, scores, threshold = make_prune_inputs([4, 0, 9], 16, 3, torch.float32, device)
    x_nc = torch.cat([x, x], 1)[:, ::2]
    assert not x_nc.is_contiguous()
    with mk.use_backend(backend):
        out = mk.prune_tokens(x_nc, cu, scores, threshold)
    assert_pruned_matches(out, oracle_prune(x_nc.cpu(), cu.cpu(), scores.cpu(), threshold.cpu(), 1, True),
                          torch.float32)


def _gradcheck_inputs(seed=0):
    # Scores stay 0.1 away from the thresholds, so finite differences never flip a keep decision.
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 0, 1, 9]
    rows = sum(lengths)
    x = torch.randn(rows, 6, generator=g, dtype=torch.float64, requires_grad=True)
    scores = (torch.rand(rows, generator=g, dtype=torch.float64) * 0.3 + 0.1)
    scores = torch.where(torch.rand(rows, generator=g) < 0.5, scores, scores + 0.5).requires_grad_()
    threshold = torch.full((4,), 0.5, dtype=torch.float64)
    return x, ref.offsets_of(torch.tensor(lengths, dtype=torch.int32)), scores, threshold


@pytest.mark.parametrize("keep_first,merge", [(1, True), (0, True), (2, False)])
def test_prune_tokens_gradcheck(keep_first, merge):
    x, cu, scores, threshold = _gradcheck_inputs()
    with mk.use_backend("torch"):
        torch.autograd.gradcheck(
            lambda x, s: mk.prune_tokens(x, cu, s, threshold, keep_first=keep_first, merge=merge).x,
            (x, scores))


def test_prune_tokens_gradient_zero_score_sum_is_plain_mean():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    out = mk.prune_tokens(x, cu, scores, torch.tensor([0.5], dtype=torch.float64))
    assert out.kept_index.tolist() == [0, -1]
    torch.testing.assert_close(out.x[1], x[1:].mean(0))
    out.x[1].sum().backward()
    torch.testing.assert_close(x.grad[1:], torch.full((3, 3), 1 / 3, dtype=torch.float64))
    assert torch.count_nonzero(scores.grad) == 0


@pytest.mark.parametrize("backend,device", backend_params("prune_tokens"))
@pytest.mark.parametrize("lengths", [[5, 0, 1, 9], [300, 2]], ids=["short", "two-tiles"])
def test_prune_tokens_gradients_match_float64_formula(backend, device, lengths):
    # The backward is shared by every backend; this checks it (fed by each backend's forward) against autograd
    # through the oracle, which builds each sample's kept rows and merged mean from the formula in float64.
    g = torch.Generator().manual_seed(1)
    rows = sum(lengths)
    x = torch.randn(rows, 6, generator=g, dtype=torch.float64)
    scores = torch.rand(rows, generator=g, dtype=torch.float64) * 0.3 + 0.1
    scores = torch.where(torch.rand(rows, generator=g) < 0.5, scores, scores + 0.5)  # 0.1 clear of 0.5
    cu = ref.offsets_of(torch.tensor(lengths, dtype=torch.int32))
    threshold = torch.full((len(lengths),), 0.5, dtype=torch.float64)
    weights = torch.randn(rows + len(lengths), 6, generator=g, dtype=torch.float64)
    x64, s64 = x.clone().requires_grad_(), scores.clone().requires_grad_()
    want_y = oracle_prune(x64, cu, s64, threshold, 1, True)[0]
    want = torch.autograd.grad((want_y * weights[:want_y.shape[0]]).sum(), (x64, s64))
    xi = x.to(device, torch.float32).requires_grad_()
    si = scores.to(device, torch.float32).requires_grad_()
    with mk.use_backend(backend):
        y = mk.prune_tokens(xi, cu.to(device), si, threshold.to(device, torch.float32)).x
    assert y.shape == want_y.shape
    got = torch.autograd.grad((y * weights[:y.shape[0]].to(device, torch.float32)).sum(), (xi, si))
    for g_, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g_.cpu().double(), w_, atol=1e-4, rtol=1e-4)


# Samples on both sides of every tile bound: Triton's compaction token tile (128) and count block (1024), the
# CUDA scan tile (256), Triton's unpack tile (32 tokens); 577 is ViT-L/14-336. Channels cross the column
# blocks (64 compact, 128 unpack). Not the full cross product: the long lengths run at two widths, the
# wide rows at a few lengths.
TILE_LENGTHS = [0, 1, 127, 128, 129, 255, 256, 257, 577, 1100]
TILE_CASES = [(TILE_LENGTHS, 24), (TILE_LENGTHS, 65), ([129, 0, 577], 768), ([257, 1, 128], 1024),
              ([255, 1100], 64)]


# bf16 on a GPU; on CPU the interpreter's bf16 adds only time to these long cases.
@pytest.mark.parametrize("backend,device,dtype", backend_dtype_params("prune_tokens", (torch.float16,), cpu_bf16=False))
@pytest.mark.parametrize("lengths,channels", TILE_CASES, ids=[f"C{c}-{len(n)}" for n, c in TILE_CASES])
@pytest.mark.parametrize("keep_first,merge", [(1, True), (200, False)])
def test_prune_tokens_across_tiles(backend, device, dtype, lengths, channels, keep_first, merge):
    x, cu, scores, threshold = make_prune_inputs(lengths, channels, 29, dtype, device)
    with mk.use_backend(backend):
        out = mk.prune_tokens(x, cu, scores, threshold, keep_first=keep_first, merge=merge)
    assert_pruned_matches(out, oracle_prune(x.cpu(), cu.cpu(), scores.cpu(), threshold.cpu(), keep_first, merge),
                          dtype)


@pytest.mark.parametrize("backend,device,dtype", backend_dtype_params("pack", (torch.float16,), cpu_bf16=False))
@pytest.mark.parametrize("lengths,channels", TILE_CASES, ids=[f"C{c}-{len(n)}" for n, c in TILE_CASES])
def test_pack_unpack_across_tiles(backend, device, dtype, lengths, channels):
    g = torch.Generator().manual_seed(31)
    n = max(lengths) + 3
    x = torch.randn(len(lengths), n, channels, generator=g).to(dtype)
    # A random mask with each sample's count fixed by `lengths`, so counts sit on the tile bounds.
    order = torch.rand(len(lengths), n, generator=g).argsort(1)
    mask = order < torch.tensor(lengths)[:, None]
    with mk.use_backend(backend):
        packed, layout = mk.pack(x.to(device), mask=mask.to(device))
        out = mk.unpack(packed, layout.cu_seqlens, max_len=n, pad_value=-3.0)
    assert layout.offsets == tuple(ref.offsets_of(torch.tensor(lengths, dtype=torch.int32)).tolist())
    want = [x[b][mask[b]] for b in range(len(lengths))]
    assert torch.equal(packed.cpu(), torch.cat(want))
    for b, rows in enumerate(want):
        assert torch.equal(out[b, :rows.shape[0]].cpu(), rows)
        assert (out[b, rows.shape[0]:] == -3.0).all()


@pytest.mark.parametrize("backend,device", backend_params("prune_tokens"))
def test_prune_tokens_opcheck(backend, device):
    x, cu, scores, threshold = make_prune_inputs([3, 0, 6, 1], 8, 5, torch.float32, device)
    op = _dispatch.implementations("prune_tokens")[backend]
    torch.library.opcheck(op, (x, cu, scores, threshold, 1, True))
    torch.library.opcheck(op, (x.requires_grad_(), cu, scores.requires_grad_(), threshold, 0, True))


# ------------------------------------------------------------------ pack / unpack


# bf16 on a GPU only: Triton's interpreter has no bf16 constant for unpack's pad value (InterpreterBuilder.get_bf16).
@pytest.mark.parametrize("backend,device,dtype",
                         backend_dtype_params("pack", (torch.float32, torch.float16), cpu_bf16=False))
@settings(max_examples=20, deadline=None)
@given(batch=ragged_batches(), use_mask=st.booleans(), extra_dims=st.sampled_from([(), (2,), (3, 2)]))
def test_pack_unpack_roundtrip(backend, device, dtype, batch, use_mask, extra_dims):
    lengths, channels, seed = batch
    g = torch.Generator().manual_seed(seed)
    n = max(lengths, default=0) + 2
    x = torch.randn(len(lengths), n, channels, *extra_dims, generator=g).to(dtype).to(device)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    mask = torch.rand(len(lengths), n, generator=g) < 0.6 if use_mask else ref.prefix_mask(lengths_t, n)
    with mk.use_backend(backend):
        packed, layout = mk.pack(x, mask=mask.to(device)) if use_mask else mk.pack(x, lengths_t.to(device))
        cu = layout.cu_seqlens
        assert cu.dtype == torch.int32 and layout.offsets == tuple(cu.tolist())
        assert layout.max_len == max([int(m.sum()) for m in mask], default=0)
        assert torch.equal(packed.cpu(), torch.cat([x.cpu()[b][mask[b]] for b in range(len(lengths))]
                                                   or [x.cpu()[:0, 0]]))
        assert torch.equal(cu.cpu().diff().long(), mask.sum(1))
        out = mk.unpack(packed, cu, max_len=n, pad_value=-7.0)
    assert out.shape == x.shape
    for b in range(len(lengths)):
        k = int(mask[b].sum())
        assert torch.equal(out[b, :k].cpu(), x.cpu()[b][mask[b]])
        assert (out[b, k:] == -7.0).all()


@pytest.mark.parametrize("backend,device", backend_params("unpack"))
def test_unpack_default_max_len_and_empty(backend, device):
    cu = torch.tensor([0, 0, 3, 3, 4], dtype=torch.int32, device=device)
    packed = torch.arange(12.0, device=device).reshape(4, 3)
    with mk.use_backend(backend):
        out = mk.unpack(packed, cu)
        assert out.shape == (4, 3, 3)
        assert torch.equal(out[1].cpu(), packed.cpu()[:3]) and (out[0] == 0).all() and (out[3, 1:] == 0).all()
        assert mk.unpack(packed[:0], torch.zeros(3, dtype=torch.int32, device=device)).shape == (2, 0, 3)
        assert mk.unpack(packed[:0], torch.zeros(1, dtype=torch.int32, device=device)).shape == (0, 0, 3)


def test_pack_unpack_gradcheck():
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    torch.autograd.gradcheck(lambda x: mk.pack(x, mask=mask)[0], (x,))
    packed, cu = mk.pack(x.detach(), mask=mask).x, mk.pack(x.detach(), mask=mask).cu_seqlens
    torch.autograd.gradcheck(lambda p: mk.unpack(p, cu, max_len=6), (packed.requires_grad_(),))


@pytest.mark.parametrize("backend,device", backend_params("pack"))
def test_pack_unpack_opcheck(backend, device):
    x = torch.randn(3, 5, 4, device=device)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool, device=device)
    impls = {op: _dispatch.implementations(op)[backend] for op in ("pack", "unpack")}
    torch.library.opcheck(impls["pack"], (x, mask))
    torch.library.opcheck(impls["pack"], (x.requires_grad_(), mask))
    packed, cu = mk.pack(x.detach(), mask=mask).x, mk.pack(x.detach(), mask=mask).cu_seqlens
    torch.library.opcheck(impls["unpack"], (packed, cu, 6, 0.5))
    torch.library.opcheck(impls["unpack"], (packed.requires_grad_(), cu, 6, 0.5))
