"""The budget, the sensitivity table, the GFLOPs controller and the report count the same passes (issue 15, B1):
what the task's inference runs per sample (`task.cost_inputs`; BLIP retrieval: ITC + ITM on the true pairs),
training-only hard negatives (`madtp.tasks.auxiliary_pass`) left out. Oracle: `count_gflops`, the report's own
count (madtp.count_flops over each pass), on the same batches at the same temperatures."""
import madtp
import pytest
import torch
from madtp.compress import TemperatureController, make_teacher, split_budget
from madtp.compress.pipeline import count_gflops, sensitivity
from madtp.data import tokenizer as tok
from madtp.tasks import BlipRetrieval, ClipRetrieval, ImageTextMatching, auxiliary_pass, in_auxiliary_pass
from test_tasks import blip_model, clip_model, matching_batch, retrieval_batch
from transformers import BlipForImageTextRetrieval

GRID = (0.03, 0.3, 3.0, 30.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calibration(k):
    # two batch sizes pin the cost model down; k hard-negative captions per image
    return [retrieval_batch(n=4, k=k, seed=1), retrieval_batch(n=2, k=k, seed=2), retrieval_batch(n=4, k=k, seed=3)]


def counted_at(model, task, batches, **temperatures):
    madtp.set_temperature(model, **temperatures)
    try:
        return count_gflops(model, task, batches)
    finally:
        madtp.set_temperature(model, vision=None, text=None)


@pytest.fixture(scope="module")
def blip():
    task = BlipRetrieval()
    model = blip_model(BlipForImageTextRetrieval).eval()
    calib = calibration(k=2)
    reference = count_gflops(make_teacher(model), task, calib)["total"]   # the budget's dense reference
    madtp.apply(model, madtp.MADTPConfig(num_alignment_tokens=4))
    return model, task, calib, reference, sensitivity(model, task, calib, GRID)


@pytest.fixture(scope="module")
def clip():
    task = ClipRetrieval()
    model = madtp.apply(clip_model().eval(), madtp.MADTPConfig(num_alignment_tokens=4))
    calib = calibration(k=3)
    return model, task, calib, sensitivity(model, task, calib, GRID)


def test_cost_inputs_are_the_inference_passes():
    batch = retrieval_batch(n=3, k=2)
    itc, itm = BlipRetrieval().cost_inputs(batch)
    assert itc["use_itm_head"] is False and itm["use_itm_head"] is True
    for x in (itc, itm):
        assert x["input_ids"] is batch["input_ids"] and x["pixel_values"] is batch["pixel_values"]
    (clip,) = ClipRetrieval().cost_inputs(batch)
    assert clip.keys() == {"input_ids", "attention_mask", "pixel_values"} and clip["input_ids"] is batch["input_ids"]
    pairs = matching_batch()
    (itm,) = ImageTextMatching().cost_inputs(pairs)
    assert itm["use_itm_head"] is True and itm["input_ids"] is pairs["input_ids"]


def test_blip_itm_split_into_true_and_false_pairs_equals_one_call_and_takes_a_single_pair():
    model = madtp.apply(blip_model(BlipForImageTextRetrieval).eval(), madtp.MADTPConfig(num_alignment_tokens=4,
                                                                                        temperature=1.0))
    task, batch = BlipRetrieval(), retrieval_batch(n=4, k=1)
    with torch.no_grad():
        out, _ = task.forward(model, batch)
        pix, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        neg_ids, neg_mask = batch["negatives_input_ids"][:, 0], batch["negatives_attention_mask"][:, 0]
        length = max(ids.shape[1], neg_ids.shape[1])
        pad = lambda t: torch.nn.functional.pad(t, (0, length - t.shape[1]))  # noqa: E731 (pad id 0, mask 0)
        assert tok.PAD_ID == 0
        # the true pairs and the provided false texts (first) in one call, as the task ran them before the split
        one = model(input_ids=torch.cat([pad(ids), pad(neg_ids)]), attention_mask=torch.cat([pad(mask), pad(neg_mask)]),
                    pixel_values=torch.cat([pix, pix]), use_itm_head=True).itm_score
    torch.testing.assert_close(out.extras["itm_logits"][:8], one, atol=1e-5, rtol=1e-5)
    single = retrieval_batch(n=1)
    logs = task.loss(model, single)
    assert torch.isfinite(logs["loss"]) and task.forward(model, single)[0].extras["itm_labels"].tolist() == [1]


def test_auxiliary_pass_nests_and_is_per_model():
    a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with auxiliary_pass(a):
        with auxiliary_pass(a):
            assert in_auxiliary_pass(a) and not in_auxiliary_pass(b)
        assert in_auxiliary_pass(a)
    assert not in_auxiliary_pass(a) and not vars(a).get("_madtp_auxiliary_passes")


def test_blip_table_counts_what_the_report_counts(blip):
    model, task, calib, reference, table = blip
    assert table.cost_model.passes == {"vision": 2.0, "text": 2.0}   # ITC and ITM each run both towers
    for key, value in count_gflops(model, task, calib).items():      # pruning off
        assert table.dense.gflops[key] == pytest.approx(value, rel=1e-9), key
    for branch, entries in table.entries.items():
        for e in entries:
            counted = counted_at(model, task, calib, **{branch: e.temperature})
            for key in ("vision", "text", "total"):
                assert e.gflops[key] == pytest.approx(counted[key], rel=1e-9), (branch, e.temperature, key)
    assert max(table.cost_model.residual.values()) < 1e-9   # ITC's unimodal and ITM's grounded text in one fit


def test_blip_target_inside_the_measured_range_is_accepted_and_met(blip):
    model, task, calib, reference, table = blip
    single = [1 - e.gflops["total"] / reference for entries in table.entries.values() for e in entries]
    assert min(single) < max(single)
    for target in (min(single), (min(single) + max(single)) / 2, max(single)):
        temps = split_budget(table, target, dense_gflops=reference, weight_sparsity=None)
        chosen = {b: t for b, t in temps.items() if t is not None}
        reached = 1 - counted_at(model, task, calib, **chosen)["total"] / reference
        # branches taken as additive; in BLIP the text cross-attends to fewer image rows: never less saved
        assert reached >= target - 1e-9, (target, temps, reached)
    deepest = 1 - counted_at(model, task, calib, vision=GRID[-1], text=GRID[-1])["total"] / reference
    with pytest.raises(ValueError, match="best reachable with this grid is") as refused:
        split_budget(table, deepest + 0.01, dense_gflops=reference, weight_sparsity=None)
    named = float(str(refused.value).split("grid is ")[1].split()[0])
    assert max(single) - 1e-4 <= named <= deepest + 1e-4


class _UnmarkedNegatives(BlipRetrieval):
    """A task whose loss runs a training-only pass outside auxiliary_pass."""

    def loss(self, model, batch):
        out = super().loss(model, batch)
        model(**self.cost_inputs(batch)[1])
        return out


def test_compress_refuses_a_task_whose_loss_counts_other_passes(blip):
    from madtp.compress.pipeline import _check_same_passes

    model, task, calib, _, table = blip
    _check_same_passes(model, table, task, calib)
    bad = _UnmarkedNegatives()
    with pytest.raises(ValueError, match=r"task: _UnmarkedNegatives.loss runs .* madtp.tasks.auxiliary_pass"):
        _check_same_passes(model, sensitivity(model, bad, calib, (1.0,)), bad, calib)


def test_blip_estimate_counts_the_image_rows_the_text_no_longer_projects(blip):
    """split_budget's estimate of a combination takes off the text's key/value Linear work that vision pruning
    saves (measured in the vision entries, text unpruned), and nothing of the cross-attention products: it lies
    between the purely additive estimate and what the combination measures."""
    from madtp.compress.budget import _gflops

    model, task, calib, reference, table = blip
    d = table.dense
    for v in (table.entries["vision"][0], table.entries["vision"][-1]):
        for t in (table.entries["text"][0], table.entries["text"][-1]):
            additive = d.gflops["other"] + v.gflops["vision"] + t.gflops["text"]
            saved = (d.linear["text"] - v.linear["text"]) + (d.linear["vision"] - t.linear["vision"])
            assert d.linear["vision"] == t.linear["vision"] and saved > 0    # the text does not shrink the image
            estimate = _gflops({"vision": v, "text": t}, table, 1.0)
            assert estimate == pytest.approx(additive - saved, rel=1e-12)
            measured = counted_at(model, task, calib, vision=v.temperature, text=t.temperature)["total"]
            assert measured <= estimate < additive, (v.temperature, t.temperature)
    # a target past the additive estimate's deepest but within the measured reach: accepted, and met
    deepest = counted_at(model, task, calib, vision=GRID[-1], text=GRID[-1])["total"]
    additive_best = 1 - min(d.gflops["other"] + v.gflops["vision"] + t.gflops["text"]
                            for v in table.entries["vision"] for t in table.entries["text"]) / reference
    target = (additive_best + 1 - deepest / reference) / 2
    temps = split_budget(table, target, dense_gflops=reference, weight_sparsity=None)
    reached = 1 - counted_at(model, task, calib, **{b: t for b, t in temps.items() if t})["total"] / reference
    assert reached >= target, (target, temps, reached)


def test_plan_targets_hand_the_cross_saving_to_the_branch_that_runs_it():
    """Synthetic: vision pruning saves 0.5 of the text's Linear work (its keys and values). The text's controller
    target is its own entry less that 0.5 (what it measures with vision pruned), its start temperature read off
    its own curve at the target plus 0.5, and the targets add up to the budget."""
    from madtp.compress.budget import CostModel, SensitivityEntry, SensitivityTable
    from madtp.compress.pipeline import plan_targets

    def entry(t, v, vl, tx, tl):
        return SensitivityEntry(t, 1.0, {"vision": v, "text": tx, "other": 0.0, "total": v + tx},
                                {"vision": vl, "text": tl})
    dense = entry(None, 8.0, 6.0, 4.0, 3.0)
    vision = [entry(1.0, 7.0, 5.0, 3.5, 2.5), entry(2.0, 5.0, 3.0, 3.5, 2.5)]   # the text 0.5 cheaper
    text = [entry(1.0, 8.0, 6.0, 3.0, 2.0), entry(2.0, 8.0, 6.0, 2.0, 1.0)]
    table = SensitivityTable([1.0, 2.0], dense, {"vision": vision, "text": text}, CostModel({}, {}, "ragged"),
                             "ragged")
    # vision t=2 + text t=2: 5 + 2 - 0.5 = 6.5 (additively 7: a 0.33 reduction of 12 would be refused)
    assert split_budget(table, 1 - 6.5 / 12, weight_sparsity=None) == {"vision": 2.0, "text": 2.0}
    targets, starts = plan_targets(table, {"vision": 2.0, "text": 2.0}, 7.0, None)
    # slack 0.5, shared as the branches save (3 and 2): vision 5 + 0.3, text 2 - 0.5 + 0.2
    assert targets == pytest.approx({"vision": 5.3, "text": 1.7})
    assert sum(targets.values()) == pytest.approx(7.0)
    # text: 1.7 + 0.5 = 2.2 on its own curve (3 at t=1, 2 at t=2): log-linear, 80% of the way
    assert starts["text"] == pytest.approx(2 ** 0.8)


def controller_reading(model, task, table, batches, branch, temperature):
    """What the controller measures over training-mode forwards of task.forward at `temperature`."""
    ctl = TemperatureController(model, table.cost_model, {branch: 1.0}, {branch: temperature}, {branch: -1.0})
    try:
        model.train()
        with torch.no_grad():
            for batch in batches:
                task.forward(model, batch)
        return ctl.measure()[branch]
    finally:
        ctl.close()
        model.eval()
        madtp.set_temperature(model, vision=None, text=None)


@pytest.mark.parametrize("which", ["clip", "blip"])
def test_controller_measures_what_the_table_measured(which, request):
    fixture = request.getfixturevalue(which)
    model, task, calib, table = fixture[0], fixture[1], fixture[2], fixture[-1]
    for branch in ("vision", "text"):
        for e in (table.entries[branch][0], table.entries[branch][-1]):
            got = controller_reading(model, task, table, calib, branch, e.temperature)
            assert got == pytest.approx(e.gflops[branch], rel=1e-9), (which, branch, e.temperature)


def test_clip_table_leaves_the_hard_negatives_out(clip):
    model, task, calib, table = clip
    for branch, entries in table.entries.items():
        for e in entries:
            counted = counted_at(model, task, calib, **{branch: e.temperature})
            assert e.gflops["text"] == pytest.approx(counted["text"], rel=1e-9), (branch, e.temperature)


def test_compress_blip_retrieval_budgets_and_reports_itc_plus_itm(tmp_path):
    """compress end to end on a 2-layer BLIP: the dense reference, the budget and the compressed model's GFLOPs
    are ITC + ITM per pair (oracle: madtp.count_flops of the two calls, summed), and the report says so."""
    import copy
    import json

    from madtp.compress.pipeline import CompressConfig, compress
    from madtp.data import ShapesConfig, ShapesDataset
    from madtp.data import tokenizer as tok
    from madtp.tasks import RetrievalCollate
    from madtp.train import TrainConfig
    from transformers import BlipConfig

    width = 32
    config = BlipConfig(
        text_config=dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * width,
                         vocab_size=tok.VOCAB_SIZE, max_position_embeddings=tok.CONTEXT_LENGTH,
                         bos_token_id=tok.BOS_ID, sep_token_id=tok.EOS_ID, eos_token_id=tok.EOS_ID,
                         pad_token_id=tok.PAD_ID),
        vision_config=dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                           patch_size=4, intermediate_size=2 * width),
        image_text_hidden_size=16)
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(config).eval()
    shapes = ShapesConfig(image_size=32)
    train = [ShapesDataset(32, shapes, seed=1, num_negatives=1)[i] for i in range(32)]
    held_out = ShapesDataset(16, shapes, seed=2, num_negatives=1)
    collate, task = RetrievalCollate(), BlipRetrieval()
    eval_batches = [collate([held_out[i] for i in range(s, s + 8)]) for s in range(0, 16, 8)]

    def itc_plus_itm(m):
        total = 0.0
        for b in eval_batches:
            x = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}
            total += sum(madtp.count_flops(m, **x, use_itm_head=itm)["total"] for itm in (False, True))
        return total / len(eval_batches)   # equal batch sizes

    dense = itc_plus_itm(model)
    target = 0.2
    cfg = CompressConfig(target_gflops_reduction=target, weight_sparsity=None, num_alignment_tokens=4,
                         temperatures=(0.01, 0.1, 1.0, 10.0), calibration_batches=2, settle_steps=4,
                         latency_repeats=1, train=TrainConfig(output_dir=str(tmp_path), max_steps=2,
                                                              micro_batch_size=8, lr=1e-4, progress=False,
                                                              checkpoint_at_end=False))
    result = compress(copy.deepcopy(model), task, train, eval_batches, cfg, collate, tmp_path, verbose=False)
    assert result.dense.gflops["total"] == pytest.approx(dense, rel=1e-9)
    t = result.targets[0]
    assert t.budget_gflops == pytest.approx((1 - target) * dense, rel=1e-9)
    assert t.measurement.gflops["total"] == pytest.approx(itc_plus_itm(result.model), rel=1e-9)
    assert t.achieved_gflops_reduction == pytest.approx(1 - t.measurement.gflops["total"] / dense, rel=1e-9)
    notes = " ".join(json.loads(result.report_json.read_text())["notes"])
    assert "ITC (ranking) and ITM on the true pairs (re-ranking)" in notes
