"""Downstream tasks (madtp.tasks) on tiny CLIP / BLIP models over the generated shapes data, and the BLIP annotation
readers (madtp.data.annotations) on a generated miniature dataset: losses are finite and fall when a fixed batch is
fitted, metrics are fractions that reach 1 for an oracle, the MADTP records after a task's forward describe its
paired pass, and every kind of bad input is reported with the file (and entry, key) named."""
import json

import madtp
import pytest
import torch
from madtp.data import ShapesConfig, ShapesDataset, ShapesMatchingDataset
from madtp.data import tokenizer as tok
from madtp.data.annotations import (
    AnnotationError,
    ImageDecodeError,
    MatchingDataset,
    RetrievalDataset,
    VQADataset,
    load_image,
    read_annotations,
    write_shapes_annotations,
)
from madtp.tasks import (
    BlipRetrieval,
    BlipVQA,
    ClipRetrieval,
    ImageTextMatching,
    MatchingCollate,
    RetrievalCollate,
    TaskOutput,
    VQACollate,
    hf_tokenize,
    retrieval_recall,
)
from torch.utils.data import DataLoader
from transformers import BlipConfig, BlipForImageTextRetrieval, BlipForQuestionAnswering, CLIPConfig, CLIPModel

CFG = ShapesConfig(image_size=32)
WIDTH = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clip_model(seed=0):
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(**tok.text_config_kwargs(), hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                         num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16)
    return CLIPModel(config)


def blip_config():
    return BlipConfig(
        text_config=dict(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * WIDTH,
                         vocab_size=tok.VOCAB_SIZE, max_position_embeddings=tok.CONTEXT_LENGTH,
                         bos_token_id=tok.BOS_ID, sep_token_id=tok.EOS_ID, eos_token_id=tok.EOS_ID,
                         pad_token_id=tok.PAD_ID),
        vision_config=dict(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                           patch_size=8, intermediate_size=2 * WIDTH),
        image_text_hidden_size=16)


def blip_model(cls, seed=0):
    torch.manual_seed(seed)
    return cls(blip_config())


def retrieval_batch(n=8, k=0, seed=1):
    return RetrievalCollate()([ShapesDataset(n, CFG, seed=seed, num_negatives=k)[i] for i in range(n)])


def matching_batch(n=8, seed=2):
    return MatchingCollate()([ShapesMatchingDataset(n, CFG, seed=seed)[i] for i in range(n)])


def fit(task, model, batch, steps=6, lr=3e-3):
    """Loss before and after `steps` Adam steps on one batch."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps + 1):
        out = task.loss(model, batch)
        loss = out["loss"]
        assert loss.dim() == 0 and torch.isfinite(loss)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses[0], losses[-1]


def check_fractions(metrics, keys):
    assert set(metrics) == set(keys)
    for key, value in metrics.items():
        assert isinstance(value, float) and 0.0 <= value <= 1.0, (key, value)


# ------------------------------------------------------------------ retrieval

def test_clip_retrieval_trains_and_leaves_the_paired_records():
    model = madtp.apply(clip_model(), madtp.MADTPConfig(num_alignment_tokens=4))
    batch = retrieval_batch(k=3)
    task = ClipRetrieval()
    outputs, logs = task.forward(model, batch)
    assert task.logits(outputs).shape == (8, 8)
    assert {"loss", "loss_i2t", "loss_t2i", "logit_scale", "hard_negative_acc"} <= set(logs)
    # the negatives' text pass ran first: the records pair the 8 images with their 8 captions
    assert model.madtp.records["text"].pooled.shape[0] == 8
    assert torch.isfinite(madtp.alignment_loss(model))
    # a teacher's own forward on model_inputs gives logits of the same kind
    with torch.no_grad():
        raw = model(**task.model_inputs(batch))
    torch.testing.assert_close(task.logits(raw), task.logits(outputs).detach())
    first, last = fit(task, model, batch)
    assert last < first


def test_blip_retrieval_trains_and_restores_the_itc_records():
    model = madtp.apply(blip_model(BlipForImageTextRetrieval), madtp.MADTPConfig(num_alignment_tokens=4))
    batch = retrieval_batch()
    task = BlipRetrieval()
    outputs, logs = task.forward(model, batch)
    assert set(logs) == {"loss", "loss_itc", "loss_itm", "itm_acc"}
    assert task.logits(outputs).shape == (8, 8)
    # ITM ran last over positives + negatives (> 8 pairs); the records are the ITC pass's again
    assert outputs.extras["itm_logits"].shape[0] > 8
    assert model.madtp.records["text"].pooled.shape[0] == 8
    assert torch.isfinite(madtp.alignment_loss(model))
    first, last = fit(task, model, batch)
    assert last < first
    # provided hard negatives replace the in-batch ones on the text side
    outputs, _ = task.forward(model, retrieval_batch(k=2))
    assert outputs.extras["itm_labels"].tolist().count(0) == 16


def test_retrieval_metrics_are_fractions():
    loader = DataLoader(ShapesDataset(12, CFG, seed=5, num_negatives=3), batch_size=6,
                        collate_fn=RetrievalCollate())
    clip = clip_model().eval()
    check_fractions(ClipRetrieval().metric(clip, loader), {"i2t_r1", "t2i_r1", "hard_negative_acc"})
    blip = blip_model(BlipForImageTextRetrieval).eval()
    check_fractions(BlipRetrieval().metric(blip, loader), {"i2t_r1", "t2i_r1", "itm_acc", "hard_negative_acc"})
    plain = DataLoader(ShapesDataset(12, CFG, seed=5), batch_size=6, collate_fn=RetrievalCollate())
    check_fractions(BlipRetrieval().metric(blip, plain), {"i2t_r1", "t2i_r1", "itm_acc"})


def test_retrieval_recall_oracle():
    # 3 images; image 1 has two captions; pairs 0 and 3 (images 0 and 2) have the same text "a"
    groups, keys = [0, 1, 1, 2], ["a", "b", "c", "a"]
    proto = torch.eye(3)
    images, texts = proto[groups], proto[groups] + 0.01 * torch.arange(4.0)[:, None]
    assert retrieval_recall(images, texts, groups, keys) == (1.0, 1.0)
    # image 0 now retrieves text 3: image 2's pair, but the same text as image 0's own, so right
    swapped = texts.clone()
    swapped[0] = -proto[0]
    swapped[3] = proto[0] + 0.5 * proto[2]
    assert retrieval_recall(images, swapped, groups, keys)[0] == 1.0
    # text 0 now retrieves image 1 (wrong); the other three texts still their own image
    assert retrieval_recall(images, swapped, groups, keys)[1] == 0.75
    with pytest.raises(ValueError, match="4 pairs"):
        retrieval_recall(images, texts[:3], groups, keys)


class OracleClip(torch.nn.Module):
    """Embeds an image by the class id written into its first pixel, a text by its caption's class id: every
    true pair is the most similar one."""

    def __init__(self, classes):
        super().__init__()
        self.classes = classes
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def get_image_features(self, pixel_values):
        return torch.nn.functional.one_hot(pixel_values[:, 0, 0, 0].long(), 64).float()

    def get_text_features(self, input_ids, attention_mask):
        ids = [tuple(r[m.bool()].tolist()) for r, m in zip(input_ids, attention_mask, strict=True)]
        return torch.nn.functional.one_hot(torch.tensor([self.classes.setdefault(t, len(self.classes))
                                                         for t in ids]), 64).float()


def test_clip_retrieval_metric_oracle():
    batches, classes = [], {}
    oracle = OracleClip(classes)
    for seed in (7, 8):
        batch = retrieval_batch(n=6, k=2, seed=seed)
        batch["image_index"] = batch["image_index"] + 100 * seed
        feats = oracle.get_text_features(batch["input_ids"], batch["attention_mask"])
        batch["pixel_values"][:, 0, 0, 0] = feats.argmax(dim=1).float()
        batches.append(batch)
    assert ClipRetrieval().metric(oracle, batches) == {"i2t_r1": 1.0, "t2i_r1": 1.0, "hard_negative_acc": 1.0}


# ------------------------------------------------------------------ matching

@pytest.mark.parametrize("family", ["blip", "clip"])
def test_matching_trains(family):
    task = ImageTextMatching()
    model = blip_model(BlipForImageTextRetrieval) if family == "blip" else clip_model()
    batch = matching_batch()
    if family == "clip":
        with pytest.raises(ValueError, match="prepare"):
            task.loss(model, batch)
        task.prepare(model)
        assert model.matching_head.bias.requires_grad
    outputs, logs = task.forward(model, batch)
    assert task.logits(outputs).shape == (8, 2) and set(logs) == {"loss", "acc"}
    first, last = fit(task, model, batch)
    assert last < first
    loader = DataLoader(ShapesMatchingDataset(8, CFG, seed=3), batch_size=4, collate_fn=MatchingCollate())
    check_fractions(task.metric(model.eval(), loader), {"accuracy"})


class OracleItm(torch.nn.Module):
    itm_head = None

    def forward(self, input_ids, attention_mask, pixel_values, use_itm_head=True):
        truth = pixel_values[:, 0, 0, 0].long()            # the label, written into the image
        return type("Out", (), {"itm_score": torch.nn.functional.one_hot(truth, 2).float()})()


def test_matching_metric_oracle():
    batch = matching_batch()
    batch["pixel_values"][:, 0, 0, 0] = batch["labels"].float()
    oracle = OracleItm()
    oracle.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))
    assert ImageTextMatching().metric(oracle, [batch]) == {"accuracy": 1.0}


# ------------------------------------------------------------------ VQA

@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    paths = write_shapes_annotations(root, 8, CFG, seed=3, split="train", num_negatives=2)
    test_paths = write_shapes_annotations(root, 4, CFG, seed=4, split="test")
    return root, paths, test_paths


def vqa_loader(shapes_root, batch_size=8):
    root, paths, _ = shapes_root
    return DataLoader(VQADataset(paths["vqa"], root, image_size=32), batch_size=batch_size,
                      collate_fn=VQACollate())


def test_vqa_trains_and_scores(shapes_root):
    model = madtp.apply(blip_model(BlipForQuestionAnswering), madtp.MADTPConfig(num_alignment_tokens=4))
    batch = next(iter(vqa_loader(shapes_root)))
    task = BlipVQA(max_answer_length=4)
    outputs, logs = task.forward(model, batch)
    n_predicted = int(batch["labels_attention_mask"][:, 1:].sum())
    assert task.logits(outputs).shape == (n_predicted, tok.VOCAB_SIZE)
    first, last = fit(task, model, batch, steps=8)
    assert last < first
    check_fractions(task.metric(model.eval(), vqa_loader(shapes_root, 4)), {"accuracy"})
    # fitted to the 8 questions, its greedy answers (pruning on, ragged execution) are all right
    madtp.set_temperature(model, vision=1.0, text=1.0)
    fit(task, model, batch, steps=70)
    assert task.metric(model.eval(), vqa_loader(shapes_root, 4)) == {"accuracy": 1.0}
    vision_tokens = (32 // 8) ** 2 + 1
    assert min(int(v.min()) for v in madtp.pruning_report(model).values()) < vision_tokens   # it did prune
    wrong = dict(batch, labels=batch["labels"].clone())
    wrong["labels"][:, 0] = tok.UNK_ID
    with pytest.raises(ValueError, match="start token"):
        task.loss(model, wrong)


def test_vqa_metric_oracle(shapes_root):
    batch = next(iter(vqa_loader(shapes_root)))

    class Oracle(torch.nn.Module):
        config = blip_config()

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **kw):
            # the true answers, then end token, then padding: what a perfect model generates
            out = torch.cat([batch["labels"], torch.full((len(input_ids), 2), tok.PAD_ID)], dim=1)
            return out

    assert BlipVQA().metric(Oracle(), [batch]) == {"accuracy": 1.0}


# ------------------------------------------------------------------ the Trainer

def test_tasks_run_in_the_trainer(tmp_path):
    from madtp.train import Task, TrainConfig, Trainer

    task = ClipRetrieval()
    assert isinstance(task, Task)
    train = ShapesDataset(8, CFG, seed=11, num_negatives=2)
    evaluation = DataLoader(ShapesDataset(6, CFG, seed=12, num_negatives=2), batch_size=6,
                            collate_fn=RetrievalCollate())
    config = TrainConfig(output_dir=str(tmp_path), max_steps=2, micro_batch_size=4, progress=False,
                         checkpoint_at_end=False, device="cpu")
    logs = Trainer(clip_model(), task, train, config, collate_fn=RetrievalCollate(),
                   eval_loader=evaluation).fit()
    assert {"eval/i2t_r1", "eval/t2i_r1", "eval/hard_negative_acc", "loss_i2t"} <= set(logs)


# ------------------------------------------------------------------ annotations

def test_shapes_annotations_round_trip(shapes_root):
    root, paths, test_paths = shapes_root
    generated = ShapesDataset(8, CFG, seed=3, num_negatives=2)
    data = RetrievalDataset(paths["retrieval"], root, image_size=32)
    assert len(data) == 8 and len(data.images) == 8
    for i in (0, 5):
        item, ref = data[i], generated[i]
        torch.testing.assert_close(item["pixel_values"], ref["pixel_values"], atol=0, rtol=0)
        assert (item["caption"], item["negatives"], item["image_index"]) == (ref["caption"], ref["negatives"], i)
    matching, ref = MatchingDataset(paths["matching"], root, image_size=32), ShapesMatchingDataset(8, CFG, seed=3)
    for i in range(8):
        assert (matching[i]["caption"], matching[i]["label"]) == (ref[i]["caption"], ref[i]["label"])
    torch.testing.assert_close(matching[3]["pixel_values"], ref[3]["pixel_values"], atol=0, rtol=0)
    vqa = VQADataset(paths["vqa"], root, image_size=32)
    for i in range(8):
        item, scene = vqa[i], generated.scene(i)
        assert item["answer"] in {o.colour for o in scene.objects} | {o.shape for o in scene.objects}
        # the question names exactly one object, by two of its attributes, and asks for the third
        named = set(item["question"].split()) - {"what", "colour", "shape", "is", "the", "object"}
        referents = [o for o in scene.objects if named <= {o.size, o.colour, o.shape}]
        assert len(named) == 2 and len(referents) == 1 and item["answer"] in {referents[0].colour, referents[0].shape}
    # the test split lists captions per image; a batch from the reader feeds the tasks' collates and metrics
    test = json.loads(test_paths["retrieval"].read_text())
    assert all(isinstance(e["caption"], list) for e in test)
    loader = DataLoader(RetrievalDataset(test_paths["retrieval"], root, image_size=32), batch_size=4,
                        collate_fn=RetrievalCollate())
    check_fractions(ClipRetrieval().metric(clip_model().eval(), loader), {"i2t_r1", "t2i_r1"})


def test_caption_lists_flatten_and_share_the_image(tmp_path, shapes_root):
    root, paths, _ = shapes_root
    entries = [{"image": "images/train/000000.png", "caption": ["a small red circle", "a large blue star"]},
               {"image": "images/train/000001.png", "caption": ["a small red circle"]},
               {"image": "images/train/000000.png", "caption": "a small white cross"}]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(entries))
    data = RetrievalDataset(path, root, image_size=16)
    assert len(data) == 4 and data.images == ["images/train/000000.png", "images/train/000001.png"]
    assert [data[i]["image_index"] for i in range(4)] == [0, 0, 1, 0]
    assert data[0]["pixel_values"].shape == (3, 16, 16)
    batch = RetrievalCollate()([data[i] for i in range(4)])
    assert batch["image_index"].tolist() == [0, 0, 1, 0]
    from madtp.tasks.retrieval import positives
    # pairs 0, 1, 3 show one image; pairs 0 and 2 have the same caption
    assert positives(batch).int().tolist() == [[1, 1, 1, 1], [1, 1, 0, 1], [1, 0, 1, 0], [1, 1, 0, 1]]


def test_vqa_reader_answers(tmp_path, shapes_root):
    root = shapes_root[0]
    entries = [{"question_id": 7, "image": "images/test/000000.png", "question": "what colour",
                "answer": ["red", "blue", "blue", "red", "blue"]},
               {"question_id": 8, "image": "images/test/000001.png", "question": "what shape", "answer": "star"}]
    path = tmp_path / "vqa.json"
    path.write_text(json.dumps(entries))
    data = VQADataset(path, root, image_size=32)
    assert (data[0]["answer"], data[0]["question_id"], data[1]["answers"]) == ("blue", 7, ["star"])
    path.write_text(json.dumps([{k: v for k, v in e.items() if k != "answer"} for e in entries]))
    items = [VQADataset(path, root, image_size=32)[i] for i in range(2)]
    assert "answer" not in items[0]
    batch = VQACollate()(items)
    assert "labels" not in batch and batch["question_id"].tolist() == [7, 8]


def test_nlvr2_pairs_are_side_by_side(tmp_path):
    from PIL import Image

    Image.new("RGB", (10, 20), (255, 0, 0)).save(tmp_path / "left.png")
    Image.new("RGB", (40, 40), (0, 0, 255)).save(tmp_path / "right.png")   # scaled to height 20: 20 wide
    path = tmp_path / "nlvr.json"
    path.write_text(json.dumps([{"images": ["left.png", "right.png"], "sentence": "two", "label": "False"}]))
    item = MatchingDataset(path, tmp_path, image_size=30)[0]
    red = load_image(tmp_path / "left.png", 4)[:, 0, 0]
    blue = load_image(tmp_path / "right.png", 4)[:, 0, 0]
    assert item["label"] == 0 and item["pixel_values"].shape == (3, 30, 30)
    torch.testing.assert_close(item["pixel_values"][:, 15, 2], red, atol=1e-3, rtol=0)
    torch.testing.assert_close(item["pixel_values"][:, 15, 27], blue, atol=1e-3, rtol=0)


def test_hf_tokenizer_collate():
    tokenize = hf_tokenize(tok.build_hf_tokenizer())
    items = [ShapesDataset(3, CFG, seed=1, num_negatives=2)[i] for i in range(3)]
    batch = RetrievalCollate(tokenize)(items)
    ref = RetrievalCollate()(items)
    length = batch["input_ids"].shape[1]
    assert batch["negatives_input_ids"].shape[:2] == (3, 2)
    assert torch.equal(batch["input_ids"], ref["input_ids"][:, :length])
    with pytest.raises(ValueError, match="same number of hard negatives"):
        RetrievalCollate()([items[0], {**items[1], "negatives": ["a red star"]}])
    with pytest.raises(ValueError, match=r"items\[1\].*caption"):
        RetrievalCollate()([items[0], {"pixel_values": items[1]["pixel_values"]}])


# ------------------------------------------------------------------ bad input

def test_bad_annotation_files(tmp_path, shapes_root):
    root = shapes_root[0]
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        RetrievalDataset(missing, root)
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"image": "x.png",\n   "caption": "a" "b"}\n]')
    with pytest.raises(AnnotationError, match=r"bad.json: malformed JSON at line 3, column 19"):
        read_annotations(bad)
    bad.write_text(json.dumps({"image": "x.png"}))
    with pytest.raises(AnnotationError, match="bad.json: expected a JSON list"):
        read_annotations(bad)
    good = {"image": "images/train/000000.png", "caption": "a small red circle"}
    cases = [
        (RetrievalDataset, [good, {"image": "images/train/000001.png"}], r"entry 1 has no 'caption' key"),
        (RetrievalDataset, [good, 3], r"entry 1: expected a JSON object"),
        (RetrievalDataset, [{**good, "caption": []}], r"entry 0: 'caption' must be a string or a non-empty list"),
        (RetrievalDataset, [{**good, "negatives": ["x"]}, good], r"entry 1 has no 'negatives' key"),
        (MatchingDataset, [{"images": ["images/train/000000.png"], "label": "True"}], r"entry 0 has no 'sentence'"),
        (MatchingDataset, [{"images": ["images/train/000000.png"], "sentence": "s", "label": "yes"}],
         r"entry 0: 'label' must be"),
        (MatchingDataset, [{"sentence": "s", "label": True}], r"entry 0 has no 'images' key"),
        (VQADataset, [{"question_id": 1, "image": "images/train/000000.png"}], r"entry 0 has no 'question' key"),
    ]
    for cls, entries, message in cases:
        bad.write_text(json.dumps(entries))
        with pytest.raises(AnnotationError, match=r"bad\.json: " + message):
            cls(bad, root, image_size=32)


def test_bad_images(tmp_path, shapes_root):
    root = shapes_root[0]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([{"image": "images/train/000000.png", "caption": "a"},
                                {"image": "images/train/missing.png", "caption": "b"}]))
    with pytest.raises(FileNotFoundError, match=r"ann\.json: entry 1: image .*missing\.png does not exist"):
        RetrievalDataset(path, root, image_size=32)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    path.write_text(json.dumps([{"question_id": 1, "image": "corrupt.png", "question": "q", "answer": ["a"]}]))
    data = VQADataset(path, tmp_path, image_size=32)       # it exists; decoding fails when it is read
    with pytest.raises(ImageDecodeError, match=r"corrupt\.png: cannot decode"):
        data[0]
    with pytest.raises(FileNotFoundError, match="image_root"):
        VQADataset(path, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        write_shapes_annotations(tmp_path, 1, CFG, split="../x")


def test_bad_task_input():
    batch = retrieval_batch(n=4)
    with pytest.raises(ValueError, match=r"missing \['attention_mask'\]"):
        ClipRetrieval().loss(clip_model(), {k: v for k, v in batch.items() if k != "attention_mask"})
    with pytest.raises(TypeError, match="BlipForImageTextRetrieval or a CLIPModel"):
        ImageTextMatching().loss(torch.nn.Linear(2, 2), matching_batch(n=2))
    with pytest.raises(ValueError, match="temperature"):
        BlipRetrieval(temperature=0)
    with pytest.raises(TypeError, match="TaskOutput"):
        BlipVQA().logits(object())
    assert set(TaskOutput.__dataclass_fields__) == {"logits", "output", "extras"}
