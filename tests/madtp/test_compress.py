"""The MADTP++ compression pipeline on a tiny CLIP: HWP (SR-STE, one-shot, export), distillation, the budget split
and the GFLOPs controller. Oracles: madtp_kernels.prune_2to4, hand-written formulas, madtp.count_flops."""
import copy
import math
import warnings

import _decision_oracle as oracle
import madtp
import pytest
import test_blip as blip
import torch
from madtp.compress import (
    SensitivityEntry,
    SensitivityTable,
    TemperatureController,
    distillation_loss,
    export_sparse,
    kd_loss,
    make_teacher,
    measure_sensitivity,
    one_shot,
    prepare_sparse_training,
    sparsity_report,
    split_budget,
    teacher_forward,
    teacher_summaries,
)
from madtp.compress.budget import CostModel
from madtp.compress.hwp import NMSparsity, nm_mask
from madtp.compress.pipeline import CompressConfig
from madtp.train import TrainConfig, Trainer
from test_clip import inputs, tiny_config
from torch import nn
from torch.nn.utils import parametrize
from transformers import BlipForImageTextRetrieval, CLIPModel

from madtp_kernels import SparseLinear, prune_2to4

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return CLIPModel(tiny_config()).eval()


def clip_loss(model, batch):
    return model(**batch, return_loss=True).loss


def sparse_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and parametrize.is_parametrized(m)}


def per_group_nonzeros(w, m=4):
    return (w.reshape(w.shape[0], -1, m) != 0).sum(-1)


# ------------------------------------------------------------------ HWP

def test_srste_masks_are_2to4_every_step(clip):
    model = prepare_sparse_training(copy.deepcopy(clip), decay=2e-4)
    layers = sparse_layers(model)
    # Every encoder Linear (in_features % 8 == 0), none outside the towers (the projections stay dense).
    assert len(layers) == 3 * 6 + 2 * 6 and not any("projection" in n for n in layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    masks = []
    for step in range(3):
        clip_loss(model.train(), inputs(seed=step)).backward()
        opt.step()
        opt.zero_grad()
        step_masks = {}
        for name, layer in layers.items():
            dense = layer.parametrizations.weight.original
            mask = prune_2to4(dense)
            assert bool((per_group_nonzeros(layer.weight) <= 2).all()), name
            torch.testing.assert_close(layer.weight, dense * mask, atol=0, rtol=0)   # recomputed from dense W
            step_masks[name] = mask
        masks.append(step_masks)
    assert any(not torch.equal(masks[0][n], masks[-1][n]) for n in layers), "no mask moved: not recomputed"


def test_srste_gradient_is_straight_through_plus_decay():
    torch.manual_seed(1)
    w = torch.randn(6, 16)
    x = torch.randn(5, 16)
    decay = 0.25
    grads = {}
    for d in (0.0, decay):
        layer = nn.Linear(16, 6, bias=False)
        layer.weight.data.copy_(w)
        parametrize.register_parametrization(layer, "weight", NMSparsity(2, 4, d))
        (layer(x) ** 2).sum().backward()
        grads[d] = layer.parametrizations.weight.original.grad
    mask = prune_2to4(w)
    ref = nn.Linear(16, 6, bias=False)
    ref.weight.data.copy_(w * mask)
    (ref(x) ** 2).sum().backward()
    # Straight-through: the dense W gets the sparse weight's gradient everywhere, pruned entries included.
    torch.testing.assert_close(grads[0.0], ref.weight.grad, atol=1e-6, rtol=1e-6)
    assert bool((grads[0.0][~mask] != 0).any())
    torch.testing.assert_close(grads[decay], ref.weight.grad + decay * (~mask) * w, atol=1e-6, rtol=1e-6)


def test_export_sparse_equals_masked_dense_and_flops_drop(clip):
    model = madtp.apply(prepare_sparse_training(copy.deepcopy(clip)), madtp.MADTPConfig(num_alignment_tokens=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clip_loss(model.train(), inputs(seed=3)).backward()
    opt.step()
    model.eval()
    x = inputs(seed=4)
    with torch.no_grad():
        ref = model(**x)
    before = madtp.count_flops(model, **x)
    report_before = sparsity_report(model)
    assert export_sparse(model) is model
    assert not sparse_layers(model)
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 30
    with torch.no_grad():
        out = model(**x)
    for name in ("logits_per_image", "text_embeds", "image_embeds"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=1e-5, rtol=1e-5)
    after = madtp.count_flops(model, **x)
    for branch in ("vision", "text"):
        assert after[branch] < 0.75 * before[branch], (branch, before, after)
    report = sparsity_report(model)
    for branch in ("vision", "text", "total"):
        assert report[branch]["parameters"] == report_before[branch]["parameters"]
        assert report[branch]["nonzero"] == report_before[branch]["nonzero"]
        assert 0.3 < report[branch]["sparsity"] < 0.5
    assert report["total"]["sparse_layers"] == 30


def test_unaccelerated_patterns_need_the_flag(clip):
    model = copy.deepcopy(clip)
    for pattern in ("4:8", "1:4"):
        with pytest.raises(ValueError, match=rf"{pattern}.*allow_unaccelerated"):
            prepare_sparse_training(model, pattern=pattern)
        with pytest.raises(ValueError, match=rf"{pattern}.*allow_unaccelerated"):
            one_shot(model, pattern=pattern)
    assert not sparse_layers(model)
    with pytest.raises(ValueError, match="pattern"):
        prepare_sparse_training(model, pattern="4:2", allow_unaccelerated=True)
    with pytest.warns(UserWarning, match="will not run faster"):
        prepare_sparse_training(model, pattern="4:8", allow_unaccelerated=True)
    layers = sparse_layers(model)
    assert layers
    for layer in layers.values():
        assert bool((per_group_nonzeros(layer.weight, 8) == 4).all())
    with pytest.raises(ValueError, match="4:8.*no packed format"):
        export_sparse(model)
    assert sparse_layers(model), "a refused export must change nothing"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_sparse_training(copy.deepcopy(clip))   # 2:4: no warning


def test_one_shot(clip):
    model = copy.deepcopy(clip)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    one_shot(model)
    pruned = 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        assert type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks   # no training hooks
        if "projection" in name:
            assert torch.equal(m.weight, dense[name])
        else:
            torch.testing.assert_close(m.weight, dense[name] * prune_2to4(dense[name]), atol=0, rtol=0)
            pruned += 1
    assert pruned == 30
    x = inputs(seed=5)
    with torch.no_grad():
        ref = model(**x)
        out = export_sparse(model)(**x)
    torch.testing.assert_close(out.logits_per_image, ref.logits_per_image, atol=1e-5, rtol=1e-5)
    mask = nm_mask(torch.randn(3, 8), 1, 4)
    assert bool((per_group_nonzeros(mask, 4) == 1).all())


def test_export_without_pruned_layers_raises(clip):
    with pytest.raises(ValueError, match="prepare_sparse_training or one_shot"):
        export_sparse(copy.deepcopy(clip))


# ------------------------------------------------------------------ distillation

def test_kd_term_scales_with_t_squared_once():
    torch.manual_seed(2)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    for temp in (1.0, 2.0, 4.0):
        p = torch.softmax(t / temp, -1)
        hand = temp ** 2 * (p * (p.log() - torch.log_softmax(s / temp, -1))).sum(-1).mean()
        torch.testing.assert_close(kd_loss(s, t, temp), hand, atol=1e-6, rtol=1e-6)
    # The gradient, from the formula: d/ds of T^2 KL(p_t || p_s) at temperature T is T (p_s - p_t) / batch. A T^4
    # scaling, a KL the other way round, or a sum over the batch instead of the mean all miss it.
    # (kd_loss computes in fp32: gradients of ~0.1, a few fp32 roundings off the float64 formula)
    for temp in (1.0, 4.0):
        sg = s.clone().requires_grad_()
        kd_loss(sg, t, temp).backward()
        want = temp * (torch.softmax(s.double() / temp, -1) - torch.softmax(t.double() / temp, -1)) / s.shape[0]
        torch.testing.assert_close(sg.grad.double(), want, atol=1e-6, rtol=1e-5)
    p4 = torch.softmax(t / 4, -1)
    kl4 = (p4 * (p4.log() - torch.log_softmax(s / 4, -1))).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, 4.0), 16 * kl4, atol=1e-6, rtol=1e-6)


def test_distillation_loss_zero_for_the_teacher_itself_and_parts(clip):
    student = madtp.apply(copy.deepcopy(clip), madtp.MADTPConfig(num_alignment_tokens=4))   # pruning off
    teacher = make_teacher(student)
    assert not hasattr(teacher, "madtp") and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not {p.data_ptr() for p in teacher.parameters()} & {p.data_ptr() for p in student.parameters()}
    x = inputs(batch=3, lengths=(5, 2, 9), seed=6)
    out = student(**x)
    t_out = teacher_forward(teacher, **x)
    assert len(t_out.summaries["vision"]) == 3 and len(t_out.summaries["text"]) == 2
    # From hidden states, as output_hidden_states gives them: the same summaries.
    with torch.no_grad():
        hs = teacher(**x, output_hidden_states=True)
    from_hs = teacher_summaries(teacher, hs, **x)
    for branch in ("vision", "text"):
        for a, b in zip(from_hs[branch], t_out.summaries[branch], strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    task = torch.tensor(0.7, requires_grad=True)
    kw = dict(alpha=0.5, beta_v=2.0, beta_t=3.0, gamma=4.0, temperature_kd=2.0, task_loss=task)
    parts = distillation_loss(student, teacher, out, t_out, **kw)
    values = {k: v.item() for k, v in parts.items()}
    assert values["distill_vision"] < 1e-10 and values["distill_text"] < 1e-10 and abs(values["kd"]) < 1e-7
    total = task + 0.5 * parts["alignment"] + 2 * parts["distill_vision"] + 3 * parts["distill_text"] + \
        4 * parts["kd"]
    torch.testing.assert_close(parts["loss"], total)
    pooled = [student.madtp.records[b].pooled for b in ("vision", "text")]
    torch.testing.assert_close(parts["alignment"].double(), oracle.alignment_loss(*pooled), atol=1e-6, rtol=1e-5)
    assert float(parts["alignment"]) > 0.01   # pooled features of random towers differ: the formula is exercised
    # Identical states: exactly 0.
    own = {b: student.madtp.records[b].summaries for b in ("vision", "text")}
    exact = distillation_loss(student, teacher, out, out, **kw, summaries=own)
    assert exact["distill_vision"].item() == 0 and exact["distill_text"].item() == 0 and exact["kd"].item() == 0
    parts["loss"].backward()
    assert student.madtp.alignment.tokens.grad is not None


def test_distillation_of_a_pruned_student_and_its_text_summary_is_eot(clip):
    teacher = make_teacher(clip)
    student = madtp.apply(copy.deepcopy(clip), madtp.MADTPConfig(num_alignment_tokens=4, temperature=1.0))
    x = inputs(batch=3, lengths=(9, 2, 6), seed=7)
    out = student(**x)
    t_out = teacher_forward(teacher, **x)
    eot = (x["input_ids"] == 3).int().argmax(-1)
    with torch.no_grad():
        hs = teacher(**x, output_hidden_states=True).text_model_output.hidden_states
    torch.testing.assert_close(t_out.summaries["text"][0], hs[1][torch.arange(3), eot], atol=0, rtol=0)
    parts = distillation_loss(student, teacher, out, t_out, beta_v=1.0, beta_t=1.0, gamma=1.0,
                              task_loss=out.loss if out.loss is not None else torch.zeros(()))
    assert parts["distill_vision"].item() > 0 and parts["kd"].item() > 0
    # With hidden states instead of a TeacherOutput, inputs name the EOT.
    with torch.no_grad():
        plain = teacher(**x, output_hidden_states=True)
    again = distillation_loss(student, teacher, out, plain, beta_v=1.0, beta_t=1.0, gamma=1.0,
                              task_loss=torch.zeros(()), inputs=x)
    for k in ("distill_vision", "distill_text", "kd"):
        torch.testing.assert_close(again[k], parts[k])
    prepared = prepare_sparse_training(copy.deepcopy(clip))
    with pytest.raises(ValueError, match="dense model"):
        make_teacher(prepared)


# ------------------------------------------------------------------ budget

def synthetic_table():
    def entry(t, loss, v, vl, tx, tl):
        return SensitivityEntry(t, loss, {"vision": v, "text": tx, "other": 0.0, "total": v + tx},
                                {"vision": vl, "text": tl})
    dense = entry(None, 1.0, 8.0, 6.0, 2.0, 1.5)
    vision = [entry(1.0, 1.3, 7.0, 5.25, 2.0, 1.5), entry(2.0, 1.6, 5.0, 3.75, 2.0, 1.5)]
    text = [entry(1.0, 1.05, 8.0, 6.0, 1.0, 0.75), entry(2.0, 1.2, 8.0, 6.0, 0.5, 0.375)]
    return SensitivityTable([1.0, 2.0], dense, {"vision": vision, "text": text}, CostModel({}, {}, "ragged"),
                            "ragged")


def test_split_budget_meets_the_target_with_the_cheaper_branch():
    table = synthetic_table()
    # 10% fewer GFLOPs (<= 9): vision t=1 (+0.3) or text t=1 (+0.05): text.
    assert split_budget(table, 0.1, weight_sparsity=None) == {"vision": None, "text": 1.0}
    # 20% (<= 8): vision t=1 + text t=1 (+0.35) beats vision t=2 (+0.6)
    assert split_budget(table, 0.2, 10.0, None) == {"vision": 1.0, "text": 1.0}
    # 2:4 halves the eligible Linear work: 10 - 3.75 = 6.25 without token pruning.
    assert split_budget(table, 0.3) == {"vision": None, "text": None}
    # <= 5.5: the tokens deliver the rest; text t=2 (+0.2) beats vision t=1 + text t=1 (+0.35), vision t=2 (+0.6)
    assert split_budget(table, 0.45) == {"vision": None, "text": 2.0}


@pytest.mark.parametrize("target", [1.0, 1.5, 0.5])
def test_unreachable_target_raises(target):
    table = synthetic_table()   # the least: vision t=2 + text t=2 = 5.5 of 10, a 0.45 reduction
    with pytest.raises(ValueError, match=r"target_gflops_reduction.*best reachable.* 0\.4500"):
        split_budget(table, target, weight_sparsity=None)


def test_unreachable_closest_takes_the_deepest_reduction():
    table = synthetic_table()
    assert split_budget(table, 0.5, weight_sparsity=None, unreachable="closest") == {"vision": 2.0, "text": 2.0}
    assert split_budget(table, 0.1, weight_sparsity=None, unreachable="closest") == {"vision": None, "text": 1.0}
    with pytest.raises(ValueError, match="unreachable"):
        split_budget(table, 0.5, unreachable="skip")
    with pytest.raises(ValueError, match="unreachable"):
        CompressConfig(unreachable="skip")


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    model = madtp.apply(CLIPModel(tiny_config()).eval(), madtp.MADTPConfig(num_alignment_tokens=8))
    # Two batches of different text lengths: with identical ones the text cost model's per-sample and per-pair
    # terms cannot be told apart once pruning off skips the alignment scores (no alignment work then).
    batches = [inputs(batch=4, lengths=lengths, seed=s) for s, lengths in ((10, (9, 5, 7, 9)), (11, (4, 9, 2, 8)))]
    table = measure_sensitivity(model, batches, [0.03, 0.1, 10.0], clip_loss)
    return model, table, batches


def test_measure_sensitivity_counts_like_count_flops_and_fits_the_cost_model(pruned):
    model, table, batches = pruned
    assert model.madtp.temperature == {"vision": None, "text": None}   # restored
    dense = [madtp.count_flops(model, **b) for b in batches]
    for branch in ("vision", "text"):
        assert table.dense.gflops[branch] == pytest.approx(sum(d[branch] for d in dense) / 2, rel=1e-9)
        g = [e.gflops[branch] for e in table.entries[branch]]
        assert g[0] < table.dense.gflops[branch] and g[-1] < g[0]    # a higher temperature prunes more
        assert all(e.gflops[b] == table.dense.gflops[b] for e in table.entries[branch] for b in ("vision", "text")
                   if b != branch)                                  # only that branch pruned
        assert 0 < table.entries[branch][0].linear[branch] < table.entries[branch][0].gflops[branch]
        assert table.cost_model.residual[branch] < 1e-9
    # The cost model on a batch and temperature it has not seen, against the counter.
    from madtp.compress.budget import _Watcher
    madtp.set_temperature(model, vision=0.3, text=0.05)
    x = inputs(batch=3, lengths=(9, 3, 6), seed=12)
    watcher = _Watcher(model)
    try:
        counted = madtp.count_flops(model, **x)
    finally:
        watcher.close()
        madtp.set_temperature(model, vision=None, text=None)
    for branch, rows in watcher.take():
        assert table.cost_model.estimate(branch, rows) == pytest.approx(counted[branch], rel=1e-6)


def _controller(model, table, **kw):
    slopes = TemperatureController.from_table(model, table, {"vision": 0.1, "text": 0.1}).slopes
    g = {b: [e.gflops[b] for e in table.entries[b]] for b in ("vision", "text")}
    targets = {b: (g[b][0] + g[b][1]) / 2 for b in g}       # between grid points: the loop must find it
    ctl = TemperatureController(model, table.cost_model, targets, {"vision": 1.0, "text": 1.0}, slopes, **kw)
    return ctl, targets


def test_controller_moves_temperature_the_right_way_and_state_round_trips(pruned):
    model, table, _ = pruned
    ctl, targets = _controller(model, table)
    try:
        assert all(s < 0 for s in ctl.slopes.values())
        t0 = dict(ctl.temperature)
        ctl.update({"vision": targets["vision"] * 1.2, "text": targets["text"] * 0.8})
        assert ctl.temperature["vision"] > t0["vision"] and ctl.temperature["text"] < t0["text"]
        assert model.madtp.temperature == ctl.temperature
        for _ in range(200):   # far beyond reach: clamped, and the integral does not wind up
            ctl.update({"vision": targets["vision"] * 2, "text": targets["text"] * 2})
        assert ctl.temperature["vision"] == pytest.approx(1e3)
        integral = dict(ctl.integral)
        ctl.update({"vision": targets["vision"] * 0.5})
        assert ctl.temperature["vision"] < 1e3 and integral["vision"] < 10
        state = copy.deepcopy(ctl.state_dict())
        twin, _ = _controller(model, table)
        twin.load_state_dict(state)
        assert twin.temperature == ctl.temperature and model.madtp.temperature == ctl.temperature
        step = {"vision": targets["vision"] * 1.1, "text": targets["text"] * 0.9}
        assert twin.update(step) == ctl.update(step)
        twin.close()
        with torch.no_grad():   # evaluation forwards are not counted
            model.eval()(**inputs(seed=30))
        assert ctl.measure() == {}
    finally:
        ctl.close()
        madtp.set_temperature(model, vision=None, text=None)


def test_controller_converges_on_tiny_clip(pruned):
    model, table, _ = pruned
    ctl, targets = _controller(model, table)
    batches = [inputs(batch=4, lengths=(9, 5, 7, 9), seed=s) for s in range(20, 24)]
    try:
        model.train()
        with torch.no_grad():
            for step in range(36):
                model(**batches[step % 4])
                ctl.update(ctl.measure())
        counted = [madtp.count_flops(model, **b) for b in batches]
    finally:
        ctl.close()
        model.eval()
        madtp.set_temperature(model, vision=None, text=None)
    for branch in ("vision", "text"):
        mean = sum(c[branch] for c in counted) / len(counted)
        assert mean == pytest.approx(targets[branch], rel=0.05), (branch, mean, targets[branch], ctl.temperature)


def test_blip_cost_model_with_cross_attention_and_teacher_text_summaries():
    itm = madtp.apply(blip.build(BlipForImageTextRetrieval), madtp.MADTPConfig(num_alignment_tokens=4))
    teacher = make_teacher(itm)
    x = blip.inputs(seed=3)
    out = itm(**x)
    t_out = teacher_forward(teacher, **x)    # BLIP retrieval returns no text hidden states: hooks read them
    assert len(t_out.summaries["text"]) == 2
    parts = distillation_loss(itm, teacher, out, t_out, beta_v=1.0, beta_t=1.0, task_loss=torch.zeros(()))
    assert parts["distill_vision"].item() < 1e-10 and parts["distill_text"].item() < 1e-10
    for execution in ("ragged", "padded", "published"):
        madtp.set_execution(itm, execution)
        calib = [blip.inputs(seed=4), blip.inputs(lengths=(5, 9), seed=5)]   # two shapes pin the cost model
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            table = measure_sensitivity(itm, calib, [0.05, 0.3, 3.0], lambda m, b: m(**b).itm_score.sum())
        assert max(table.cost_model.residual.values()) < 1e-9
        from madtp.compress.budget import _Watcher
        watcher = _Watcher(itm)
        madtp.set_temperature(itm, vision=0.2, text=0.5)   # both at once: the text cross-attends to fewer rows
        try:
            counted = madtp.count_flops(itm, **blip.inputs(lengths=(4, 8, 2, 7), seed=9))
        finally:
            watcher.close()
            madtp.set_temperature(itm, vision=None, text=None)
        for branch, rows in watcher.take():
            assert table.cost_model.estimate(branch, rows) == pytest.approx(counted[branch], rel=1e-6), execution
    with pytest.warns(UserWarning, match="pin down"):
        measure_sensitivity(itm, calib[:1], [1.0], lambda m, b: m(**b).itm_score.sum())


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n=8):
        self.items = []
        for s in range(n):
            x = inputs(batch=1, lengths=(7,), seed=100 + s)
            self.items.append({k: v[0] for k, v in x.items()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _DistillTask:
    def __init__(self, teacher):
        self.teacher = teacher

    def loss(self, model, batch):
        out = model(**batch, return_loss=True)
        t_out = teacher_forward(self.teacher, **batch)
        return distillation_loss(model, self.teacher, out, t_out, alpha=0.1, beta_v=1.0, beta_t=1.0, gamma=1.0,
                                 temperature_kd=2.0, task_loss=out.loss)


def test_pipeline_in_the_trainer(pruned, clip, tmp_path):
    _, table, _ = pruned
    teacher = make_teacher(clip)
    model = madtp.apply(copy.deepcopy(clip), madtp.MADTPConfig(num_alignment_tokens=8))
    prepare_sparse_training(model)
    ctl, _ = _controller(model, table)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=3, micro_batch_size=2, accumulation=2, lr=1e-3,
                      progress=False, checkpoint_at_end=False)
    logs = Trainer(model, _DistillTask(teacher), _Pairs(), cfg, callbacks=[ctl]).fit()
    ctl.close()
    for key in ("loss", "kd", "distill_vision", "distill_text", "alignment", "madtp/vision_gflops",
                "madtp/text_temperature"):
        assert math.isfinite(logs[key]), key
    assert ctl.temperature["vision"] != 1.0
    for layer in sparse_layers(model).values():
        assert bool((per_group_nonzeros(layer.weight) <= 2).all())
    export_sparse(model)
    assert not sparse_layers(model)
