"""A float64 oracle of MADTP's pruning decision and of the alignment features, written from the formulas
(madtp_kernels.score_and_prune's docstring, python/madtp/alignment.py's), one sample at a time, in plain loops
over Python lists and small tensors. It calls nothing of madtp or madtp_kernels: it is what they are tested
against.

Per sample, over its candidates i (every row but the first and the protected ones):
  r_i = max_h received[i, h],  c_i = sum_h w_h cls[i, h] with w_h = ||o[first, h]||_2 / sum_h' ||o[first, h']||_2,
  a_i = max_k A[i, k],  TIS_i = (r~_i + c~_i + a~_i) / 3,  ~ = min-max over the candidates (0 if constant)
  theta = min_k sum_i softmax_i(A[i, k] / tau) TIS_i   (0 for a sample without candidates)
  keep: the first row, the protected rows, the candidates with TIS_i > theta, in order; then (merge) one row,
  the TIS-weighted mean of the dropped rows (their plain mean if those TIS sum to 0).
  No saving, no pruning: with merge, a sample that would drop exactly one candidate drops none (the official
  Block.Reduce_token returns x unchanged when `reduce_num <= 1`).

importance="official" transcribes double125/MADTP models/vit.py (Attention.forward, Block.Reduce_token) with the
official tensors' roles: the candidates are its patch tokens (`[:, 1:]`),
  self_attn_w = attn[:, :, 1:, 1:].max(1)[0].sum(dim=1)  -> headmax[i] (given: sum over non-first queries of the
                                                             max over heads), then / (sum over candidates + 1e-8)
  token_attn_w = token_attn.max(2)[0] / (its sum + 1e-8)  -> max_k A[i, k] over the candidates' sum
  head_importance = attn_out[..., 1:, :].norm(dim=-1) / (its sum over heads + 1e-8)   (each token's own heads)
  cls_attn = (attn[:, :, 0, 1:] * head_importance).sum(heads)  -> sum_h cls[i, h] n_ih / (sum_h n_ih + 1e-8)
  Importance_score = (self_attn_w + token_attn_w + cls_attn) / 3; the threshold as above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

f64 = torch.float64


def d(t):
    return t.detach().to(f64)


@dataclass
class SampleDecision:
    tis: dict[int, float]          # candidate -> TIS
    theta: float
    kept: list[int]                # rows of the sample that stay, in order
    dropped: list[int]
    merged: torch.Tensor | None    # [C] f64, or None (nothing dropped, or merge off)

    def ambiguous(self, eps: float) -> list[int]:
        """Candidates whose TIS is within eps of theta: a float32 computation may decide them either way. Not
        where every TIS is 0 (each term constant over the candidates, one candidate): theta is then exactly 0
        in any precision, and TIS > theta drops them all."""
        if all(t == 0 for t in self.tis.values()):
            return []
        return [i for i, t in self.tis.items() if abs(t - self.theta) <= eps]


def _minmax(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]


OFFICIAL_EPS = 1e-8   # models/vit.py: "/ (... .sum(dim=1, keepdim=True) + 1e-8)"


def _official_tis(cand, headmax, cls, attn_out, align) -> list[float]:
    """Block.Reduce_token's Importance_score over the candidates (see the module docstring), in float64."""
    self_attn_w = [float(headmax[i]) for i in cand]
    total = sum(self_attn_w)
    self_attn_w = [v / (total + OFFICIAL_EPS) for v in self_attn_w]
    token_attn_w = [max(float(v) for v in align[i]) for i in cand]
    total = sum(token_attn_w)
    token_attn_w = [v / (total + OFFICIAL_EPS) for v in token_attn_w]
    cls_attn = []
    for i in cand:
        head_importance = [math.sqrt(sum(float(v) ** 2 for v in attn_out[i, h])) for h in range(attn_out.shape[1])]
        total = sum(head_importance)
        cls_attn.append(sum(float(cls[i, h]) * v / (total + OFFICIAL_EPS) for h, v in enumerate(head_importance)))
    return [(p + q + s) / 3 for p, q, s in zip(self_attn_w, token_attn_w, cls_attn, strict=True)]


def decide(x, received, cls, attn_out, align, protected, temperature: float, merge: bool,
           flip: frozenset[int] = frozenset(), *, importance: str = "minmax", headmax=None) -> SampleDecision:
    """One sample: x [L, C], received/cls [L, H], attn_out [L, H, D], align [L, K], protected: list[bool] (len L),
    headmax [L] (importance="official"). `flip`: candidates whose keep decision is inverted (to follow a float32
    decision on an ambiguous token), applied before the no-saving rule."""
    x, received, cls, attn_out, align = (d(t) for t in (x, received, cls, attn_out, align))
    n = x.shape[0]
    cand = [i for i in range(1, n) if not protected[i]]
    if not cand:
        return SampleDecision({}, 0.0, list(range(n)), [], None)
    if importance == "official":
        tis = _official_tis(cand, d(headmax), cls, attn_out, align)
    else:
        assert importance == "minmax", importance
        norms = [math.sqrt(sum(float(v) ** 2 for v in attn_out[0, h])) for h in range(attn_out.shape[1])]
        w = [v / sum(norms) for v in norms]
        r = [max(float(v) for v in received[i]) for i in cand]
        c = [sum(w[h] * float(cls[i, h]) for h in range(len(w))) for i in cand]
        a = [max(float(v) for v in align[i]) for i in cand]
        tis = [(p + q + s) / 3 for p, q, s in zip(_minmax(r), _minmax(c), _minmax(a), strict=True)]
    sums = []
    for k in range(align.shape[1]):
        logits = [float(align[i, k]) / temperature for i in cand]
        top = max(logits)
        e = [math.exp(v - top) for v in logits]
        sums.append(sum(ei / sum(e) * t for ei, t in zip(e, tis, strict=True)))
    theta = min(sums)
    by = dict(zip(cand, tis, strict=True))
    stays = {i: (by[i] > theta) != (i in flip) for i in cand}
    if merge and sum(not v for v in stays.values()) == 1:   # reduce_num <= 1: the official returns x as it is
        stays = dict.fromkeys(cand, True)
    kept = [i for i in range(n) if i not in by or stays[i]]
    dropped = [i for i in cand if not stays[i]]
    merged = None
    if merge and dropped:
        weights = [by[i] for i in dropped]
        total = sum(weights)
        weights = [v / total for v in weights] if total != 0 else [1 / len(dropped)] * len(dropped)
        merged = sum(wi * x[i] for wi, i in zip(weights, dropped, strict=True))
    return SampleDecision(by, theta, kept, dropped, merged)


def decide_batch(x, lengths, received, cls, attn_out, align, protected, temperature, merge, *,
                 importance="minmax", headmax=None):
    """Packed rows: lengths (list[int]) split the rows into samples; protected: list[bool] over all rows."""
    out, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        out.append(decide(x[s], received[s], cls[s], attn_out[s], align[s], protected[start:start + n],
                          temperature, merge, importance=importance,
                          headmax=None if headmax is None else headmax[s]))
        start += n
    return out


def clip_attention(layer, rows, lengths, causal: bool, with_headmax: bool = False):
    """A Hugging Face CLIPEncoderLayer's attention half in float64 on packed rows [T, C] (samples of `lengths`):
    -> (x after the attention residual [T, C], received [T, H], cls [T, H], per-head output [T, H, D]) and, with
    with_headmax, headmax [T]: the official received term, sum over queries 1: of the max over heads."""
    attn = layer.self_attn
    ln = layer.layer_norm1
    x = d(rows)
    h = F.layer_norm(x, ln.normalized_shape, d(ln.weight), d(ln.bias), ln.eps)
    heads, dim = attn.num_heads, attn.head_dim
    q, k, v = (F.linear(h, d(p.weight), d(p.bias)).view(-1, heads, dim) for p in (attn.q_proj, attn.k_proj,
                                                                                   attn.v_proj))
    outs, recs, clss, maxes, start = [], [], [], [], 0
    for n in lengths:
        s = slice(start, start + n)
        logits = torch.einsum("ihd,jhd->hij", q[s], k[s]) * attn.scale
        if causal:
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.softmax(logits, dim=-1)                                   # [H, Lq, Lk]
        outs.append(torch.einsum("hij,jhd->ihd", p, v[s]))
        recs.append(p.sum(1).t())
        clss.append(p[:, 0, :].t() if n else p.new_zeros(0, heads))
        maxes.append(p[:, 1:, :].amax(0).sum(0) if n else p.new_zeros(0))
        start += n
    o = torch.cat(outs)
    mid = x + F.linear(o.reshape(-1, heads * dim), d(attn.out_proj.weight), d(attn.out_proj.bias))
    out = (mid, torch.cat(recs), torch.cat(clss), o)
    return (*out, torch.cat(maxes)) if with_headmax else out


def alignment_scores(alignment, rows, branch: str):
    """A = map(x) T^T in float64 -> (A [T, K], map(x) [T, d])."""
    h = d(rows)
    if branch in alignment.maps:
        h = h @ d(alignment.maps[branch].weight).t()
    return h @ d(alignment.tokens).t(), h


def pooled(align, mapped, lengths, protected, dim: int):
    """[B, K, d]: per sample, sum_i softmax_i(A[i, k] / sqrt(dim)) map(x)_i over its candidates (first and
    protected rows excluded; zeros for a sample without candidates)."""
    out, start = [], 0
    for n in lengths:
        cand = [start + i for i in range(1, n) if not protected[start + i]]
        if not cand:
            out.append(align.new_zeros(align.shape[1], mapped.shape[1]))
        else:
            p = torch.softmax(align[cand] / math.sqrt(dim), dim=0)          # [n_cand, K]
            out.append(p.t() @ mapped[cand])
        start += n
    return torch.stack(out)


def alignment_loss(image, text):
    """mean over pairs and alignment tokens of 1 - cos(image, text), float64; cos = 0 against a zero feature (a
    sample without candidates pools nothing), as torch's cosine_similarity defines it (norms clamped at 1e-8)."""
    image, text = d(image), d(text)
    dots = (image * text).sum(-1)
    return (1 - dots / (image.norm(dim=-1) * text.norm(dim=-1)).clamp_min(1e-8)).mean()


def capture(model):
    """Pre-hooks on each encoder layer's layer_norm1 (the layer's input) and layer_norm2 (the rows after
    attention and pruning), which the executors call as modules in both executions."""
    seen, hooks = {}, []
    for tower in ("vision_model", "text_model"):
        for i, layer in enumerate(getattr(model, tower).encoder.layers):
            for part in ("layer_norm1", "layer_norm2"):
                key = (tower, i, part)
                hooks.append(getattr(layer, part).register_forward_pre_hook(
                    lambda m, args, key=key: seen.__setitem__(key, args[0].detach().clone())))
    return seen, hooks


def packed(t, lengths):
    """Packed [T, C] rows from a capture: as is (ragged), or the valid prefix of each sample (padded [B, L, C])."""
    if t.ndim == 2:
        assert t.shape[0] == sum(lengths), (t.shape, lengths)
        return t
    assert t.shape[:2] == (len(lengths), max(lengths)), (t.shape, lengths)
    return torch.cat([t[b, :n] for b, n in enumerate(lengths)])
