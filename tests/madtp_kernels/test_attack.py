"""Property-based attack on every public op (issue 18): fresh inputs each run, valid and not.

For each drawn input, every backend that runs here (torch, Triton under the interpreter, cuda with a GPU) must
give the float64 oracle's answer (attack_oracles.py), or all must raise the same ValueError/TypeError whose
message starts with the argument's name. Never another exception, never a difference between backends.
MADTP_ATTACK_EXAMPLES sets the examples per op (default 500).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import attack_oracles as oracle
import torch
from attack_strategies import (
    BAD_FLOATS,
    BAD_INTS,
    PROFILE,
    Named,
    assert_same_nonfinite,
    assert_within,
    bad_cu,
    bad_index,
    bad_tensor,
    cu_of,
    here,
    is_finite_everywhere,
    lengths,
    outcomes,
    restrided,
    values,
)
from hypothesis import Phase, event, given, settings
from hypothesis import strategies as st
from test_pruning import check_against_oracle, make_inputs  # score_and_prune's float64 loop oracle

import madtp_kernels as mk

EXAMPLES = int(os.environ.get("MADTP_ATTACK_EXAMPLES", "500"))
# MADTP_ATTACK_NO_SHRINK=1: report the first failing example as drawn (shrinking on the interpreter is slow).
PHASES = [p for p in Phase if not (p == Phase.shrink and os.environ.get("MADTP_ATTACK_NO_SHRINK"))]
ATTACK = settings(PROFILE, max_examples=EXAMPLES, phases=PHASES)
DTYPES = (torch.float32, torch.float16, torch.float64)   # bf16 tl.dot is wrong in the interpreter
ROUNDING = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3}


def _to(device):
    return lambda t: t.to(device) if isinstance(t, torch.Tensor) and t.device.type != "meta" else t


def _maybe_layout(draw, cu, rows):
    """cu_seqlens as given, or as a RaggedLayout (trusted by the ops)."""
    if draw(st.booleans()):
        return cu
    return mk.RaggedLayout.from_cu_seqlens(cu, rows)


def _layout_to(layout, device):
    return layout.to(device) if isinstance(layout, mk.RaggedLayout) else _to(device)(layout)


def run_case(op, call, names, expect):
    """expect: "result" (valid input: every backend answers), "named" (invalid: every backend refuses with a
    named error), "either". Returns the results ({pair: value}) or None when refused."""
    try:
        results = outcomes(op, call, names)
    except Named as named:
        assert expect != "result", f"{op} refused a valid input: {named}"
        event(f"{op}: refused")
        return None
    assert expect != "named" or not results, f"{op} accepted invalid input on {sorted(results)}"
    assert expect != "result" or results, f"{op}: every backend declined a valid input"
    event(f"{op}: answered")
    return results


# ------------------------------------------------------------------ pack

@ATTACK
@given(data=st.data())
def test_pack(data):
    draw = data.draw
    lens = draw(lengths())
    batch, n = len(lens), (max(lens) if lens else 0) + draw(st.integers(0, 2))
    feature = tuple(draw(st.lists(st.sampled_from([1, 3, 0] if draw(st.integers(0, 9)) == 0 else [1, 3]),
                                  min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    x = draw(restrided(draw(values((batch, n, *feature), dtype, nonfinite=draw(st.booleans())))))
    use_mask = draw(st.booleans())
    if use_mask:
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        mask = draw(restrided(torch.rand(batch, n, generator=g) < 0.5))
        kw = {"mask": mask}
    else:
        ln = torch.tensor(lens, dtype=draw(st.sampled_from([torch.int32, torch.int64])))
        ln = draw(restrided(ln))   # an expand changes the lengths: the mask follows what is passed
        kw = {"lengths": ln}
        mask = torch.arange(n)[None, :] < ln[:, None] if batch else torch.zeros(0, n, dtype=torch.bool)
    expect = "result" if 0 not in feature else "either"
    corrupt = draw(st.sampled_from([None, None, "x", "lengths", "mask", "both", "neither", "lengths_range"]))
    if corrupt == "x":
        x, kind = bad_tensor(draw, x)
        if kind == "dtype":   # pack copies rows of any dtype; a backend may decline the dtype by name
            corrupt, expect = None, "either"
    elif corrupt in ("lengths", "mask"):
        kw = {corrupt: bad_tensor(draw, next(iter(kw.values())), floating=False)[0]}
    elif corrupt == "both":
        kw = {"lengths": torch.tensor(lens, dtype=torch.int32), "mask": mask}
    elif corrupt == "neither":
        kw = {}
    elif corrupt == "lengths_range" and batch:
        bad = torch.tensor(lens, dtype=torch.int64)
        bad[draw(st.integers(0, batch - 1))] = draw(st.sampled_from([-1, n + 1, 2**40]))
        kw = {"lengths": bad}
    else:
        corrupt = None
    if corrupt is not None:
        expect = "named"
    def call(backend, device):
        with mk.use_backend(backend):
            return mk.pack(_to(device)(x), **{k: _to(device)(v) for k, v in kw.items()})

    results = run_case("pack", call, ("x", "lengths", "mask", "pack"), expect)
    if not results:
        return
    want, offsets = oracle.pack(x, kw.get("mask", mask) if "mask" in kw else mask)
    for pair, got in results.items():
        assert got.x.dtype == x.dtype, f"{pair}: dtype {got.x.dtype}"
        assert_within(got.x, want, 0.0, f"{pair} packed")
        assert got.layout.cu_seqlens.dtype == torch.int32 and got.layout.cu_seqlens.cpu().tolist() == offsets
        assert list(got.layout.offsets) == offsets


# ------------------------------------------------------------------ unpack

@ATTACK
@given(data=st.data())
def test_unpack(data):
    draw = data.draw
    lens = draw(lengths())
    rows = sum(lens)
    feature = tuple(draw(st.lists(st.sampled_from([1, 4]), min_size=0 if draw(st.booleans()) else 1, max_size=2)))
    dtype = draw(st.sampled_from(DTYPES))
    packed = draw(restrided(draw(values((rows, *feature), dtype, nonfinite=draw(st.booleans())))))
    cu = cu_of(lens)
    layout = _maybe_layout(draw, cu, rows)
    longest = max(lens, default=0)
    max_len = draw(st.sampled_from([None, longest, longest + 1, longest + 3]))
    pad = draw(st.sampled_from([0.0, -1.5, 3, float("nan"), float("inf"), float("-inf")]))
    expect = "result"
    corrupt = draw(st.sampled_from([None, None, "cu", "packed", "max_len", "short_max_len", "pad"]))
    if corrupt == "cu":
        layout, _ = bad_cu(draw, cu)
        expect = "named"
    elif corrupt == "packed":
        packed, _ = bad_tensor(draw, packed)
        expect = "either"   # some are still valid packed rows (a dtype change, an added feature dim)
    elif corrupt == "max_len":
        max_len = draw(st.sampled_from(BAD_INTS))
        expect = "either" if max_len is None else "named"
    elif corrupt == "short_max_len" and longest:
        max_len = longest - 1
        expect = "named"
    elif corrupt == "pad":
        pad = draw(st.sampled_from(["0", None, True, [0.0], torch.tensor(0.0)]))
        expect = "named"

    def call(backend, device):
        with mk.use_backend(backend):
            return mk.unpack(_to(device)(packed), _layout_to(layout, device), max_len=max_len, pad_value=pad)

    results = run_case("unpack", call, ("packed", "cu_seqlens", "max_len", "pad_value"), expect)
    if not results:
        return
    offsets = cu.tolist()
    want = oracle.unpack(packed, offsets, longest if max_len is None else max_len, pad)
    for pair, got in results.items():
        assert got.dtype == packed.dtype
        assert_within(got, want.to(packed.dtype).double() if packed.is_floating_point() else want, 0.0,
                      f"{pair} unpacked")


# ------------------------------------------------------------------ prune_tokens

@ATTACK
@given(data=st.data())
def test_prune_tokens(data):
    draw = data.draw
    lens = draw(lengths())
    rows, batch = sum(lens), len(lens)
    channels = draw(st.sampled_from([1, 3, 7]))
    dtype = draw(st.sampled_from(DTYPES))
    sdtype = draw(st.sampled_from(DTYPES))
    nonfinite = draw(st.booleans())
    x = draw(restrided(draw(values((rows, channels), dtype, nonfinite=nonfinite and draw(st.booleans())))))
    positive = draw(st.integers(0, 4)) > 0   # importances are meant to be >= 0; signed ones are still defined
    scores = draw(restrided(draw(values((rows,), sdtype, positive=positive,
                                        nonfinite=nonfinite and draw(st.booleans())))))
    threshold = draw(restrided(draw(values((batch,), sdtype, positive=positive,
                                           nonfinite=nonfinite and draw(st.booleans())))))
    cu = cu_of(lens)
    layout = _maybe_layout(draw, cu, rows)
    keep_first = draw(st.sampled_from([0, 1, 2, 5, 2**31 - 1]))
    merge = draw(st.booleans())
    expect = "result"
    corrupt = draw(st.sampled_from([None, None, "cu", "x", "scores", "threshold", "keep_first", "merge"]))
    if corrupt == "cu":
        layout, _ = bad_cu(draw, cu)
        expect = "named"
    elif corrupt == "x":
        x, _ = bad_tensor(draw, x)
        expect = "named"
    elif corrupt == "scores":
        scores, _ = bad_tensor(draw, scores)
        expect = "named"
    elif corrupt == "threshold":
        threshold, kind = bad_tensor(draw, threshold)
        expect = "named"
    elif corrupt == "keep_first":
        keep_first = draw(st.sampled_from(BAD_INTS))
        expect = "either" if keep_first == 2**31 else "named"
    elif corrupt == "merge":
        merge = draw(st.sampled_from([1, 0, "no", None]))
        expect = "named"

    def call(backend, device):
        to = _to(device)
        with mk.use_backend(backend):
            return mk.prune_tokens(to(x), _layout_to(layout, device), to(scores), to(threshold),
                                   keep_first=keep_first, merge=merge)

    names = ("x", "cu_seqlens", "scores", "threshold", "keep_first", "merge")
    results = run_case("prune_tokens", call, names, expect)
    if not results:
        return
    want, offsets, index, bound = oracle.prune_tokens(x, cu.tolist(), scores, threshold, keep_first, merge)
    for pair, got in results.items():
        assert got.kept_index.cpu().tolist() == index, f"{pair}: kept_index {got.kept_index.tolist()} != {index}"
        assert got.cu_seqlens.cpu().tolist() == offsets and list(got.layout.offsets) == offsets
        assert got.x.dtype == x.dtype
        assert_within(got.x, want, bound, f"{pair} pruned rows")


# ------------------------------------------------------------------ varlen_attention

@ATTACK
@given(data=st.data())
def test_varlen_attention(data):
    draw = data.draw
    lens_q = draw(lengths(max_batch=4, short=(0, 1, 2, 5), long=(19,)))
    lens_k = lens_q if draw(st.booleans()) else [draw(st.sampled_from([0, 1, 3, 6])) for _ in lens_q]
    heads = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([1, 4, 8, 16]))
    dtype = draw(st.sampled_from(DTYPES))
    nonfinite = draw(st.integers(0, 3)) == 0
    tq, tk = sum(lens_q), sum(lens_k)
    use_qi, use_ki = draw(st.booleans()), draw(st.booleans())
    extra_q, extra_k = (draw(st.integers(0, 3)) if use_qi else 0), (draw(st.integers(0, 3)) if use_ki else 0)

    def tensor(rows):
        return draw(restrided(draw(values((rows, heads, head_dim), dtype, nonfinite=nonfinite and draw(
            st.booleans())))))

    q, k, v = tensor(tq + extra_q), tensor(tk + extra_k), tensor(tk + extra_k)

    def index(rows, buffer):
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        pick = torch.randperm(buffer, generator=g)[:rows] if draw(st.booleans()) else \
            torch.randint(0, max(buffer, 1), (rows,), generator=g)   # repeated rows are allowed
        return draw(restrided(pick.to(torch.int32)))

    q_index = index(tq, tq + extra_q) if use_qi else None
    kv_index = index(tk, tk + extra_k) if use_ki else None
    cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
    same = lens_q == lens_k and draw(st.booleans())
    lay_q = _maybe_layout(draw, cu_q, tq)
    lay_k = None if same and tq == tk else _maybe_layout(draw, cu_k, tk)
    longest_q, longest_k = max(lens_q, default=0), max(lens_k, default=0)
    max_q = draw(st.sampled_from([None, longest_q, longest_q + 2]))
    max_k = draw(st.sampled_from([None, longest_k, longest_k + 5]))
    scale = draw(st.sampled_from([None, None, 0.3, 1.7]))
    causal, return_stats = draw(st.booleans()), draw(st.booleans())
    expect = "result"
    corrupt = draw(st.sampled_from([None, None, "cu_q", "cu_k", "q", "k", "v", "q_index", "kv_index", "max_q",
                                    "scale", "odd_scale", "flag", "heads"]))
    if corrupt == "cu_q":
        lay_q, _ = bad_cu(draw, cu_q)
        expect = "named"
    elif corrupt == "cu_k":
        lay_k, _ = bad_cu(draw, cu_k)
        expect = "named"
    elif corrupt in ("q", "k", "v"):
        bad, kind = bad_tensor(draw, {"q": q, "k": k, "v": v}[corrupt])
        q, k, v = (bad if name == corrupt else t for name, t in (("q", q), ("k", k), ("v", v)))
        expect = "either" if kind == "grow" and corrupt == "q" and use_qi else "named"
    elif corrupt == "q_index":
        given_index = q_index if q_index is not None else torch.arange(tq, dtype=torch.int32)
        q_index, _ = bad_index(draw, given_index, q.shape[0])
        expect = "named"
    elif corrupt == "kv_index":
        kv_index, _ = bad_index(draw, kv_index if kv_index is not None else torch.arange(tk, dtype=torch.int32),
                                k.shape[0])
        expect = "named"
    elif corrupt == "max_q":
        max_q = draw(st.sampled_from(BAD_INTS + ((longest_q - 1) if longest_q else -1,)))
        expect = "either" if max_q is None else "named"
    elif corrupt == "scale":
        scale = draw(st.sampled_from([float("nan"), float("inf"), float("-inf"), "0.1", True, [0.1]]))
        expect = "named"
    elif corrupt == "odd_scale":
        scale = draw(st.sampled_from([0.0, -0.5, 1e-30, 5]))   # defined by the formula; may be refused
        expect = "either"
    elif corrupt == "flag":
        causal, return_stats = draw(st.sampled_from([(1, False), (False, "yes"), (None, False)]))
        expect = "named"
    elif corrupt == "heads":
        q, k, v = (t[:, :0] for t in (q, k, v))   # H = 0: a named error, never SIGFPE
        expect = "either"

    def call(backend, device):
        to = _to(device)
        with mk.use_backend(backend):
            return mk.varlen_attention(to(q), to(k), to(v), _layout_to(lay_q, device),
                                       None if lay_k is None else _layout_to(lay_k, device), max_seqlen_q=max_q,
                                       max_seqlen_k=max_k, scale=scale, causal=causal, q_index=to(q_index),
                                       kv_index=to(kv_index), return_stats=return_stats)

    names = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "scale", "causal",
             "q_index", "kv_index", "return_stats")
    results = run_case("varlen_attention", call, names, expect)
    if not results:
        return
    s = head_dim ** -0.5 if scale is None else scale
    args = (q, k, v, cu_q.tolist(), cu_k.tolist())
    kw = dict(scale=s, causal=causal, q_index=q_index, kv_index=kv_index)
    if os.environ.get("MADTP_ATTACK_DUMP"):   # the drawn inputs in full, to turn a failure into a reproducer
        torch.save(dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, lay_k=lay_k is not None, max_q=max_q, max_k=max_k,
                        kw=kw, return_stats=return_stats), os.environ["MADTP_ATTACK_DUMP"])
    exact = oracle.attention(*args, **kw)
    plain = oracle.attention(*args, **kw, dtype=dtype)
    for pair, got in results.items():
        out, stats = got if return_stats else (got, None)
        assert out.dtype == dtype, f"{pair}: out dtype {out.dtype}"
        pieces = [("out", out, 0)] + ([("received", stats.received, 1), ("cls", stats.cls, 2)] if stats else [])
        for what, t, i in pieces:
            want, base = exact[i], plain[i].double()
            both = torch.isfinite(want) & torch.isfinite(base)
            plain_err = (base - want).abs()[both].max().item() if both.any() else 0.0
            assert_within(t, want, 2 * plain_err + ROUNDING[dtype], f"{pair} {what}")


# ------------------------------------------------------------------ score_and_prune

@ATTACK
@given(data=st.data())
def test_score_and_prune(data):
    draw = data.draw
    lens = draw(lengths(short=(0, 1, 2, 3, 6), long=(19, 70)))
    dtype = draw(st.sampled_from(DTYPES))
    case = dict(channels=draw(st.sampled_from([1, 5])), heads=draw(st.sampled_from([1, 3])),
                head_dim=draw(st.sampled_from([1, 4])), tokens=draw(st.sampled_from([1, 4])),
                seed=draw(st.integers(0, 2**31 - 1)), protect=draw(st.sampled_from([0.0, 0.3])),
                constant=draw(st.integers(0, 7)) == 0)
    inputs = list(make_inputs(lens, dtype=dtype, **case))
    x, cu, received, cls, attn_out, align, protected = inputs
    rows = x.shape[0]
    nonfinite = draw(st.integers(0, 4)) == 0 and rows > 0
    if nonfinite:   # one non-finite entry in one input; only the backends' agreement is checked then
        which = draw(st.sampled_from([0, 2, 3, 4, 5]))
        t = inputs[which].clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(oracle_nonfinite()))
        inputs[which] = t
        x, cu, received, cls, attn_out, align, protected = inputs
    tau = draw(st.sampled_from([1e-3, 0.3, 1.0, 50.0]))
    merge = draw(st.booleans())
    views = [draw(restrided(t)) if isinstance(t, torch.Tensor) and i != 1 else t for i, t in enumerate(inputs)]
    vx, _, vrec, vcls, vout, valign, vprot = views
    inputs = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in views]   # expands change values
    layout = _maybe_layout(draw, cu, rows)
    stats = (vrec, vcls) if draw(st.booleans()) else mk.AttentionStats(vrec, vcls)
    expect = "result"
    corrupt = draw(st.sampled_from([None, None, "layout", "x", "stats", "received", "attn_out", "align",
                                    "temperature", "protected", "merge"]))
    if corrupt == "layout":
        layout, _ = bad_cu(draw, cu)
        expect = "named"
    elif corrupt == "x":
        vx, _ = bad_tensor(draw, vx)
        expect = "named"
    elif corrupt == "stats":
        stats = draw(st.sampled_from([vrec, (vrec,), [vrec, vcls, vcls], None]))
        expect = "named"
    elif corrupt == "received":
        stats = (draw(st.sampled_from([vrec.double() if dtype != torch.float64 else vrec.float(), vrec[:, :0],
                                       vrec[None], vrec.to("meta")])), vcls)
        expect = "named"
    elif corrupt == "attn_out":
        vout, _ = bad_tensor(draw, vout)
        expect = "named"
    elif corrupt == "align":
        valign = draw(st.sampled_from([valign.half(), valign[:, :0], valign[None], valign.tolist()]))
        expect = "named"
    elif corrupt == "temperature":
        tau = draw(st.sampled_from(BAD_FLOATS))
        expect = "either" if tau in (1e-30, 1e30) else "named"
    elif corrupt == "protected":
        base = vprot if vprot is not None else torch.zeros(rows, dtype=torch.bool)
        vprot = draw(st.sampled_from([base.int(), base[None], torch.zeros(rows + 1, dtype=torch.bool),
                                      base.tolist()]))
        expect = "named"
    elif corrupt == "merge":
        merge = draw(st.sampled_from([1, "no", None]))
        expect = "named"

    def call(backend, device):
        to = _to(device)
        st_ = tuple(to(t) for t in stats) if isinstance(stats, (tuple, list)) and not isinstance(
            stats, mk.AttentionStats) and len(stats) == 2 else stats
        if isinstance(stats, mk.AttentionStats):
            st_ = mk.AttentionStats(to(stats.received), to(stats.cls))
        with mk.use_backend(backend):
            return mk.score_and_prune(to(vx), _layout_to(layout, device), st_, to(vout), to(valign),
                                      temperature=tau, protected=to(vprot), merge=merge)

    names = ("x", "layout", "stats", "stats.received", "stats.cls", "attn_out", "align_scores", "temperature",
             "protected", "merge")
    results = run_case("score_and_prune", call, names, expect)
    if not results:
        return
    if is_finite_everywhere(*inputs):
        for got in results.values():
            check_against_oracle(got, lens, tuple(inputs), tau, merge)
        return
    # Non-finite input: every backend makes the same decisions and the same NaN/inf pattern.
    (first, ref), *others = results.items()
    for pair, got in others:
        assert got.kept_index.cpu().tolist() == ref.kept_index.cpu().tolist(), f"{pair} vs {first}: kept_index"
        assert list(got.layout.offsets) == list(ref.layout.offsets), f"{pair} vs {first}: layout"
        for what in ("x", "importance", "threshold"):
            a, b = getattr(got, what), getattr(ref, what)
            finite = assert_same_nonfinite(a, b, f"{pair} vs {first} {what}")
            torch.testing.assert_close(a.cpu().double()[finite], b.cpu().double()[finite],
                                       atol=ROUNDING[dtype] * 10, rtol=ROUNDING[dtype] * 10)


def oracle_nonfinite():
    return (float("nan"), float("inf"), float("-inf"))


# ------------------------------------------------------------------ 2:4 weights

def _meta(draw, n, k, valid):
    """uint8 meta [n, k/8]: every nibble a valid code, or random bytes (mostly invalid somewhere)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if valid:
        codes = torch.tensor(sorted(oracle.VALID_NIBBLES), dtype=torch.uint8)
        nib = codes[torch.randint(0, len(codes), (n, k // 4), generator=g)]
        return nib[:, 0::2] | (nib[:, 1::2] << 4)
    meta = torch.randint(0, 256, (n, k // 8), generator=g, dtype=torch.int64).to(torch.uint8)
    if draw(st.booleans()) and meta.numel():   # one bad byte among good ones
        meta = _meta(draw, n, k, True)
        meta.view(-1)[draw(st.integers(0, meta.numel() - 1))] = draw(st.sampled_from([0x00, 0xFF, 0x77, 0x41, 0x11]))
    return meta


@ATTACK
@given(data=st.data())
def test_sparse_linear(data):
    draw = data.draw
    n = draw(st.sampled_from([1, 2, 3, 8]))
    k = draw(st.sampled_from([8, 16, 24]))
    dtype = draw(st.sampled_from(DTYPES))
    lead = draw(st.sampled_from([(), (0,), (1,), (3,), (2, 3)]))
    nonfinite = draw(st.integers(0, 3)) == 0
    x = draw(restrided(draw(values((*lead, k), dtype, nonfinite=nonfinite and draw(st.booleans())))))
    vals = draw(restrided(draw(values((n, k // 2), dtype, nonfinite=nonfinite and draw(st.booleans())))))
    valid_meta = draw(st.integers(0, 3)) > 0
    meta = draw(restrided(_meta(draw, n, k, valid_meta)))
    bias = draw(restrided(draw(values((n,), dtype, nonfinite=nonfinite and draw(st.booleans()))))) \
        if draw(st.booleans()) else None
    expect = "result" if valid_meta or oracle.kept_positions(meta) is not None else "named"
    weight_kind = "sparse"
    corrupt = draw(st.sampled_from([None, None, "x", "bias", "weight", "x_dtype"]))
    if corrupt == "x":
        x, _ = bad_tensor(draw, x, kinds=("list", "int", "dtype", "meta"))
        expect = "named"
    elif corrupt == "x_dtype":
        x = x.to(draw(st.sampled_from([t for t in DTYPES if t != dtype])))
        expect = "named"
    elif corrupt == "bias":
        bias, _ = bad_tensor(draw, bias if bias is not None else vals[:, 0])
        expect = "named"
    elif corrupt == "weight":
        weight_kind = draw(st.sampled_from(["dense", "tuple"]))
        expect = "named"

    def call(backend, device):
        to = _to(device)
        if weight_kind == "dense":
            weight = to(vals)
        elif weight_kind == "tuple":
            weight = (to(vals), to(meta))
        else:
            weight = mk.SparseWeight(to(vals), to(meta))
        with mk.use_backend(backend):
            return mk.sparse_linear(to(x), weight, to(bias))

    results = run_case("sparse_linear", call, ("x", "weight", "bias", "values", "meta"), expect)
    if not results:
        return
    want, bound = oracle.sparse_linear(x.reshape(-1, k), vals, meta, bias)
    for pair, got in results.items():
        assert got.dtype == dtype and got.shape == (*lead, n), f"{pair}: {got.dtype} {tuple(got.shape)}"
        assert_within(got.reshape(-1, n), want, bound, f"{pair} sparse_linear")


@ATTACK
@given(data=st.data())
def test_sparse_weight(data):
    draw = data.draw
    n = draw(st.sampled_from([1, 3, 8]))
    k = draw(st.sampled_from([8, 16, 40]))
    dtype = draw(st.sampled_from(DTYPES))
    nonfinite = draw(st.integers(0, 4)) == 0
    dense = draw(values((n, k), dtype, nonfinite=nonfinite))
    route = draw(st.sampled_from(["construct", "compress", "prune"]))
    if route == "prune":
        w = draw(restrided(dense))
        corrupt = draw(st.sampled_from([None, None, "weight"]))
        expect = "result" if is_finite_everywhere(w) else "either"
        if corrupt:
            w = draw(st.sampled_from([w[:, :-4] if k > 8 else w[:, :4], w.int(), w[0], w.tolist()]))
            expect = "named"
        results = run_case("sparse_linear", lambda b, d: mk.prune_2to4(_to(d)(w)), ("weight",), expect)
        if results and is_finite_everywhere(w):
            for pair, mask in results.items():
                assert torch.equal(mask.cpu(), oracle.prune_2to4(w)), f"{pair}: prune_2to4 mask"
        return
    if route == "compress":
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        kept = torch.rand(n, k, generator=g) < draw(st.sampled_from([0.3, 0.5, 0.7]))
        w = draw(restrided(torch.where(kept, dense, torch.zeros((), dtype=dtype))))
        groups = (w.reshape(n, k // 4, 4) != 0).sum(-1)
        expect = "result" if bool((groups <= 2).all()) else "named"
        results = run_case("sparse_linear", lambda b, d: mk.compress_2to4(_to(d)(w)), ("weight",), expect)
        for pair, sw in (results or {}).items():
            assert_within(sw.to_dense(), w.double(), 0.0, f"{pair} compress/to_dense round trip")
            assert oracle.kept_positions(sw.meta.cpu()) is not None, f"{pair}: compress wrote an invalid code"
        return
    vals = draw(restrided(dense[:, : k // 2]))
    valid_meta = draw(st.integers(0, 2)) > 0
    meta = draw(restrided(_meta(draw, n, k, valid_meta)))
    expect = "result" if oracle.kept_positions(meta) is not None else "named"
    corrupt = draw(st.sampled_from([None, None, "values", "meta", "shape"]))
    if corrupt == "values":
        vals = draw(st.sampled_from([vals.int(), vals[0], vals.tolist(), vals.to("meta")]))
        expect = "named"
    elif corrupt == "meta":
        meta = draw(st.sampled_from([meta.to(torch.int8), meta.int(), meta[0], meta.tolist(), meta.to("meta")]))
        expect = "named"
    elif corrupt == "shape":
        meta = torch.cat([meta, meta[:, :1]], 1)
        expect = "named"
    results = run_case("sparse_linear", lambda b, d: mk.SparseWeight(_to(d)(vals), _to(d)(meta)),
                       ("values", "meta"), expect)
    for pair, sw in (results or {}).items():
        assert_within(sw.to_dense(), oracle.decompress(vals, meta), 0.0, f"{pair} to_dense")


@ATTACK
@given(data=st.data())
def test_sparse_linear_module(data):
    draw = data.draw
    in_f = draw(st.sampled_from([8, 16]))
    out_f = draw(st.sampled_from([1, 4, 5]))
    dtype = draw(st.sampled_from((torch.float32, torch.float16)))
    has_bias = draw(st.booleans())
    route = draw(st.sampled_from(["init", "from_dense", "state"]))
    if route == "init":
        # (2**31 out_features is a 32 GiB request: torch's allocator error is the honest answer there)
        bad = [b for b in BAD_INTS if b != 2**31]
        args = [draw(st.sampled_from([in_f, *bad, 0, 12])), draw(st.sampled_from([out_f, *bad, 0]))]
        bias = draw(st.sampled_from([has_bias, has_bias, "yes", None, 1]))
        ok = all(isinstance(a, int) and not isinstance(a, bool) for a in args) and isinstance(bias, bool)
        # sizes past int32 are refused by name (the kernels index in int32): 2**31 and 2**63 are multiples of 8
        ok = ok and args[0] % 8 == 0 and 8 <= args[0] < 2**31 and 1 <= args[1] < 2**31
        run_case("sparse_linear", lambda b, d: mk.SparseLinear(*args, bias=bias),
                 ("in_features", "out_features", "bias"), "result" if ok else "either" if args[1] == 0 else "named")
        return
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    linear = torch.nn.Linear(in_f, out_f, bias=has_bias).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=g))
    mask_kind = draw(st.sampled_from(["none", "pruned", "dense", "bad"]))
    mask = {"none": None, "pruned": oracle.prune_2to4(linear.weight.detach()), "dense": torch.ones(
        out_f, in_f, dtype=torch.bool), "bad": torch.ones(out_f, in_f)}[mask_kind]
    x = draw(restrided(draw(values((3, in_f), dtype))))
    if route == "from_dense":
        expect = "result" if mask_kind in ("none", "pruned") else "named"

        def call(backend, device):
            module = mk.SparseLinear.from_dense(linear.to(device), None if mask is None else mask.to(device))
            with mk.use_backend(backend):
                return module, module(_to(device)(x))

        results = run_case("sparse_linear", call, ("linear", "mask", "weight", "linear.weight"), expect)
        for pair, (module, y) in (results or {}).items():
            want, bound = oracle.sparse_linear(x, module.values.cpu(), module.meta.cpu(),
                                               linear.bias.detach() if has_bias else None)
            assert_within(y, want, bound, f"{pair} SparseLinear.from_dense")
            pruned = linear.weight.detach().double() * oracle.prune_2to4(linear.weight.detach())
            assert_within(module.weight.to_dense(), pruned, 0.0, f"{pair} from_dense weight")
        return
    # state: a forward fills the per-weight cache; then meta or values change (in place, by assignment, by
    # load_state_dict) and the next forward must use the new weight.
    change = draw(st.sampled_from(["assign_meta", "assign_values", "inplace_values", "load", "load_bad"]))
    new_meta = _meta(draw, out_f, in_f, change != "load_bad")
    new_vals = draw(values((out_f, in_f // 2), dtype))

    def call(backend, device):
        module = mk.SparseLinear.from_dense(linear).to(device)
        xd = _to(device)(x)
        with mk.use_backend(backend):
            module(xd)
            if change == "assign_meta":
                module.meta = new_meta.to(device)
            elif change == "assign_values":
                module.values = new_vals.to(device)
            elif change == "inplace_values":
                with torch.no_grad():
                    module.values.mul_(-2)
            else:
                state = {k: v.clone() for k, v in module.state_dict().items()}
                state["meta"], state["values"] = new_meta.to(device), new_vals.to(device)
                try:
                    module.load_state_dict(state)
                except RuntimeError as exc:   # torch's own load_state_dict error: it must name the tensor
                    if "Error(s) in loading state_dict" in str(exc) and "meta" in str(exc):
                        raise ValueError(f"meta: {exc}") from exc
                    raise
            return module, module(xd)

    bad_assign = change == "assign_meta" and oracle.kept_positions(new_meta) is None
    expect = "named" if change == "load_bad" and oracle.kept_positions(new_meta) is None else \
        "either" if bad_assign else "result"
    results = run_case("sparse_linear", call, ("meta", "values", "weight", "x"), expect)
    for pair, (module, y) in (results or {}).items():
        want, bound = oracle.sparse_linear(x, module.values.cpu(), module.meta.cpu(),
                                           module.bias.detach().cpu() if has_bias else None)
        assert_within(y, want, bound, f"{pair} SparseLinear after {change}")


# ------------------------------------------------------------------ degenerate shapes, in a child process

CHILD = textwrap.dedent("""
    import itertools, torch, madtp_kernels as mk
    from attack_strategies import outcomes, Named
    I32 = torch.int32
    def check(op, call, names):
        try:
            outcomes(op, call, names)
        except Named:
            pass
    for t, h, d in itertools.product((0, 1, 3), (0, 1, 2), (0, 1, 5)):
        cu = torch.tensor([0, t], dtype=I32)
        q = torch.randn(t, h, d)
        for stats in (False, True):
            def call(b, dev, q=q, cu=cu, stats=stats):
                with mk.use_backend(b):
                    return mk.varlen_attention(q, q, q, cu, return_stats=stats)
            check("varlen_attention", call, ("q", "k", "v", "cu_seqlens_q", "scale"))
    for t, c in itertools.product((0, 1, 4), (0, 1, 3)):
        x, cu = torch.randn(t, c), torch.tensor([0, t], dtype=I32)
        def call(b, dev, x=x, cu=cu, t=t):
            with mk.use_backend(b):
                return mk.prune_tokens(x, cu, torch.rand(t), torch.rand(1))
        check("prune_tokens", call, ("x", "cu_seqlens", "scores", "threshold"))
        def call(b, dev, x=x, cu=cu):
            with mk.use_backend(b):
                return mk.unpack(x, cu)
        check("unpack", call, ("packed", "cu_seqlens"))
    for n, k in itertools.product((0, 1), (0, 8)):
        def call(b, dev, n=n, k=k):
            w = mk.SparseWeight(torch.randn(n, k // 2), torch.full((n, k // 8), 0x44, dtype=torch.uint8))
            with mk.use_backend(b):
                return mk.sparse_linear(torch.randn(2, k), w)
        check("sparse_linear", call, ("x", "weight", "values", "meta"))
    print("survived")
""")


def test_degenerate_dims_do_not_kill_the_process():
    # A SIGFPE or segfault would take pytest down with it: these run in a child, which must exit 0.
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "survived" in proc.stdout, (
        f"child exited {proc.returncode} (a negative code is a signal):\n{proc.stderr[-3000:]}")


def test_backends_here():
    # The suite is only as good as the backends it compares: at least torch and Triton (interpreter) on CPU.
    pairs = set(here("varlen_attention"))
    assert {("torch", "cpu")} <= pairs
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        assert ("triton", "cpu") in pairs
    if torch.cuda.is_available():
        assert any(device == "cuda" for _, device in pairs)
