"""madtp.data.shapes and madtp.data.tokenizer: the synthetic image-caption data a small CLIP trains on."""
import time

import numpy as np
import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("tokenizers")

from madtp.data import shapes as S  # noqa: E402
from madtp.data import tokenizer as T  # noqa: E402

CFG = S.ShapesConfig()
N = 240


@pytest.fixture(scope="module")
def batch():
    return S.generate(N, CFG, seed=7)


def _slots(d):
    """(object 0, object 1 or None, relation): what a hard negative may change one of."""
    return (d.objects[0], d.objects[1] if len(d.objects) > 1 else None, d.relation)


def _attribute_changes(a, b):
    return sum(getattr(a, f) != getattr(b, f) for f in ("size", "colour", "shape"))


def _changes(neg, true):
    """Slots changed from the true description, over the ways of stating the negative."""
    best = None
    for form in neg.restatements():
        n = sum(_attribute_changes(x, y) for x, y in zip(form.objects, true.objects, strict=True))
        n += form.relation != true.relation
        best = n if best is None else min(best, n)
    return best


# ---------------------------------------------------------------------------------------------------------------
# shapes, dtypes, determinism

def test_batch_shapes_and_dtypes(batch):
    H = CFG.image_size
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (N, 3, H, H)
    assert batch.masks.dtype == torch.bool and batch.masks.shape == (N, CFG.max_objects, H, H)
    pv = batch.pixel_values
    assert pv.dtype == torch.float32 and pv.shape == (N, 3, H, H)
    mean, std = torch.tensor(S.CLIP_MEAN).view(3, 1, 1), torch.tensor(S.CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(pv * std + mean, batch.images.float() / 255, atol=1e-6, rtol=0)
    assert len(batch) == len(batch.captions) == len(batch.scenes) == N
    big = S.generate(3, S.ShapesConfig(image_size=96, max_objects=1), seed=1)
    assert big.images.shape == (3, 3, 96, 96) and big.masks.shape == (3, 1, 96, 96)
    assert all(len(s.objects) == 1 for s in big.scenes)


def test_same_seed_same_data_other_seed_differs(batch):
    again = S.generate(30, CFG, seed=7)
    assert torch.equal(again.images, batch.images[:30]) and again.captions == batch.captions[:30]
    assert again.scenes == batch.scenes[:30] and torch.equal(again.masks, batch.masks[:30])
    other = S.generate(30, CFG, seed=8)
    assert not torch.equal(other.images, again.images) and other.captions != again.captions
    # the config's seed is the default
    assert S.generate(5, S.ShapesConfig(seed=7)).captions == batch.captions[:5]


def test_sample_depends_only_on_seed_and_index(batch):
    ds = S.ShapesDataset(N, CFG, seed=7)
    order = [17, 3, 200, 3, 0, 239]
    items = {i: ds[i] for i in order}
    pixel_values = batch.pixel_values
    for i in reversed(order):                 # any order, any dataset length, the batch: all the same
        for item in (items[i], ds[i], S.ShapesDataset(500, CFG, seed=7)[i]):
            torch.testing.assert_close(item["pixel_values"], pixel_values[i], atol=0, rtol=0)
            assert item["caption"] == batch.captions[i] and item["index"] == i
        assert ds.scene(i) == batch.scenes[i]
    assert ds[-1]["caption"] == batch.captions[N - 1]
    shifted = S.generate(10, CFG, seed=7, start=100)
    assert torch.equal(shifted.images, batch.images[100:110])
    with pytest.raises(IndexError):
        ds[N]


def test_dataloader_with_workers_is_deterministic(batch):
    ds = S.ShapesDataset(48, CFG, seed=7, num_negatives=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, collate_fn=S.collate,
                                         generator=torch.Generator().manual_seed(0))
    pixel_values, seen = batch.pixel_values, 0
    for b in loader:
        assert b["pixel_values"].shape == (8, 3, 64, 64) and b["index"].dtype == torch.long
        assert len(b["captions"]) == 8 and len(b["negatives"]) == 8 and all(len(n) == 3 for n in b["negatives"])
        for j, i in enumerate(b["index"].tolist()):
            torch.testing.assert_close(b["pixel_values"][j], pixel_values[i], atol=0, rtol=0)
            assert b["captions"][j] == batch.captions[i]
            assert b["negatives"][j] == S.negatives_for(i, 3, CFG, seed=7)
            seen += 1
    assert seen == 48


def test_config_validation():
    for kwargs, match in [({"image_size": 8}, "image_size"), ({"max_objects": 3}, "max_objects"),
                          ({"seed": -1}, "seed"), ({"shapes": ("circle", "hexagon")}, "shapes"),
                          ({"colours": ()}, "colours"), ({"small": (0.2, 0.3)}, "small, large"),
                          ({"crop": (0.0, 0.5)}, "crop"), ({"grid": 7}, "grid"),
                          ({"grid": 16, "large": (0.4, 0.45)}, "grid")]:
        with pytest.raises(ValueError, match=match):
            S.ShapesConfig(**kwargs)
    with pytest.raises(ValueError, match="n: expected"):
        S.generate(-1)


def test_generates_a_thousand_samples_quickly():
    S.generate(2, CFG, seed=0)                # backgrounds loaded and cached once per process
    t = time.perf_counter()
    S.generate(300, CFG, seed=0)
    assert time.perf_counter() - t < 6.0      # ~0.35 s here; generous for a shared CPU


# ---------------------------------------------------------------------------------------------------------------
# the images show what the captions say

def test_captions_state_the_scene(batch):
    counts = {1: 0, 2: 0}
    for caption, scene in zip(batch.captions, batch.scenes, strict=True):
        assert caption == caption.lower() and all(w in S.WORDS for w in caption.split())
        assert S.parse_caption(caption) == scene.description and S.holds(caption, scene)
        counts[len(scene.objects)] += 1
        if len(scene.objects) == 2:
            assert scene.objects[0].spec != scene.objects[1].spec
            assert S.spatial_relation(*scene.objects) == scene.relation
            assert S.spatial_relation(*reversed(scene.objects)) == S.INVERSE_RELATION[scene.relation]
            assert not S.holds(S.Description(scene.description.objects, S.INVERSE_RELATION[scene.relation]), scene)
    assert counts[1] > N // 4 and counts[2] > N // 4


def test_relations_and_sizes_are_true_of_the_pixels(batch):
    H = CFG.image_size
    for scene, masks in zip(batch.scenes, batch.masks, strict=True):
        boxes = []
        for j, o in enumerate(scene.objects):
            rows, cols = np.nonzero(masks[j].numpy())
            assert rows.size > 0
            boxes.append((rows.min(), rows.max(), cols.min(), cols.max()))
            lo, hi = CFG.small if o.size == "small" else CFG.large
            extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
            assert lo * H - 2 <= extent <= hi * H + 1, (o, extent)
        for j in range(len(scene.objects), CFG.max_objects):
            assert not masks[j].any()
        if scene.relation is None:
            continue
        (r0a, r1a, c0a, c1a), (r0b, r1b, c0b, c1b) = boxes
        rows_overlap, cols_overlap = r0a <= r1b and r0b <= r1a, c0a <= c1b and c0b <= c1a
        expected = {"left of": c1a < c0b and rows_overlap, "right of": c1b < c0a and rows_overlap,
                    "above": r1a < r0b and cols_overlap, "below": r1b < r0a and cols_overlap}
        assert expected[scene.relation], (scene, boxes)
        assert not any(v for k, v in expected.items() if k != scene.relation), (scene, boxes)


def test_grid_snaps_boxes_to_whole_cells_and_keeps_relations_true():
    cfg = S.ShapesConfig(image_size=64, grid=8, small=(0.25, 0.25), large=(0.375, 0.375), shapes=("circle", "cross"))
    b = S.generate(200, cfg, seed=3)
    sides = set()
    for caption, scene in zip(b.captions, b.scenes, strict=True):
        assert S.holds(caption, scene)
        for o in scene.objects:
            assert o.x % 8 == 0 and o.y % 8 == 0 and 0 <= o.x <= 64 - o.side and 0 <= o.y <= 64 - o.side
            assert o.side == (16 if o.size == "small" else 24)
            sides.add(o.side)
        if scene.relation:
            assert S.spatial_relation(*scene.objects) == scene.relation
    assert sides == {16, 24}
    assert {len(s.objects) for s in b.scenes} == {1, 2}


def test_object_pixels_have_the_named_colour(batch):
    names = list(S.PALETTE)
    palette = np.array([S.PALETTE[c] for c in names], dtype=np.float64)
    for image, scene, masks in zip(batch.images, batch.scenes, batch.masks, strict=True):
        img = image.permute(1, 2, 0).numpy().astype(np.float64)
        for j, o in enumerate(scene.objects):
            mean = img[masks[j].numpy()].mean(axis=0)
            assert names[int(np.argmin(((palette - mean) ** 2).sum(1)))] == o.colour, (o, mean)


def test_objects_cover_a_minority_of_the_image(batch):
    covered = batch.masks.any(dim=1).float().mean(dim=(1, 2))
    assert covered.mean() < 0.35 and covered.max() < 0.5
    # patches of 8x8 pixels: most hold no object pixel, so most tokens are background
    patches = batch.masks.any(dim=1).view(N, 8, 8, 8, 8).any(dim=4).any(dim=2)
    assert patches.float().mean() < 0.5


def test_backgrounds_are_real_and_differ(batch):
    imgs = batch.images.float()
    background = ~batch.masks.any(dim=1)
    stds = [imgs[i][:, background[i]].std().item() for i in range(N)]
    assert np.median(stds) > 5                        # textured, not a flat colour
    diffs = (imgs[: N // 2] - imgs[N // 2:]).abs().mean(dim=(1, 2, 3))
    assert diffs.min() > 1 and diffs.mean() > 10      # no two images alike
    assert len({s.background for s in batch.scenes}) >= len(S.BACKGROUNDS) - 2
    # dimmed: objects stand out (the brightest background stays below white objects)
    assert imgs.permute(1, 0, 2, 3)[:, background].max() <= 0.75 * 255


# ---------------------------------------------------------------------------------------------------------------
# hard negatives and matching

@pytest.mark.parametrize("k", [1, 5, 9])
def test_hard_negatives_change_exactly_one_thing(batch, k):
    allowed = set(CFG.shapes) | set(CFG.colours) | set(S.SIZES)
    for i, scene in enumerate(batch.scenes):
        negs = S.hard_negatives(scene, k, np.random.default_rng(i), CFG)
        assert len(negs) == k and len(set(negs)) == k and scene.caption not in negs
        descs = [S.parse_caption(n) for n in negs]
        claims = [frozenset(d.restatements()) for d in descs]
        assert len(set(claims)) == k                  # distinct claims, not only distinct strings
        true = scene.description
        for neg, d in zip(negs, descs, strict=True):
            assert d not in true.restatements(), neg
            assert not S.holds(d, scene), neg
            assert _changes(d, true) == 1, (neg, scene.caption)
            assert len(d.objects) == len(true.objects)
            assert {w for o in d.objects for w in (o.size, o.colour, o.shape)} <= allowed
            assert len(set(d.objects)) == len(d.objects)


def test_hard_negatives_cover_every_kind_and_are_seeded(batch):
    two = next(s for s in batch.scenes if len(s.objects) == 2)
    one = next(s for s in batch.scenes if len(s.objects) == 1)
    assert S.num_hard_negatives(one, CFG) == (len(S.SHAPES) - 1) + (len(S.COLOURS) - 1) + 1
    assert S.num_hard_negatives(two, CFG) >= 9
    negs = S.hard_negative_descriptions(two, 9, 3, CFG)
    true = two.description
    relation_changed = [d for d in negs if any(f.objects == true.objects for f in d.restatements())]
    assert relation_changed                            # relations are among the 9
    assert S.hard_negatives(two, 9, 3, CFG) == S.hard_negatives(two, 9, np.random.default_rng(3), CFG)
    assert S.hard_negatives(two, 9, 3, CFG) != S.hard_negatives(two, 9, 4, CFG)
    with pytest.raises(ValueError, match="k: expected"):
        S.hard_negatives(one, 12, 0, CFG)
    # a restricted palette: negatives stay inside it
    small = S.ShapesConfig(shapes=("circle", "square", "triangle", "star"), colours=("red", "green", "blue"))
    for s in S.generate(20, small, seed=0).scenes:
        for n in S.hard_negatives(s, min(5, S.num_hard_negatives(s, small)), 0, small):
            assert not ({"diamond", "cross", "yellow", "white", "purple"} & set(n.split())), n


def test_swapped_relation_negatives_appear():
    swapped = 0
    for i, scene in enumerate(S.generate(60, S.ShapesConfig(min_objects=2), seed=2).scenes):
        for d in S.hard_negative_descriptions(scene, 9, i, S.ShapesConfig(min_objects=2)):
            swapped += d.objects == scene.description.objects[::-1]
    assert swapped > 5


def test_matching_samples(batch):
    ds = S.ShapesMatchingDataset(80, CFG, seed=7)
    pixel_values = batch.pixel_values
    labels = []
    for i in range(80):
        item = ds[i]
        torch.testing.assert_close(item["pixel_values"], pixel_values[i], atol=0, rtol=0)
        assert item["label"] == int(S.holds(item["caption"], batch.scenes[i]))
        assert (item["caption"] == batch.captions[i]) == (item["label"] == 1)
        labels.append(item["label"])
    assert 20 < sum(labels) < 60
    b = S.collate([ds[0], ds[1]])
    assert b["label"].dtype == torch.long and b["pixel_values"].shape == (2, 3, 64, 64)


# ---------------------------------------------------------------------------------------------------------------
# tokenizer

def test_vocabulary_has_every_generated_word(batch):
    tok = T.build_tokenizer()
    vocab = tok.get_vocab()
    assert set(S.WORDS) <= set(vocab) and len(vocab) == T.VOCAB_SIZE
    assert len({T.PAD_ID, T.UNK_ID, T.BOS_ID, T.EOS_ID}) == 4 and T.EOS_ID == T.VOCAB_SIZE - 1 and T.EOS_ID != 2
    texts = list(batch.captions) + [n for s in batch.scenes for n in S.hard_negatives(s, 9, 0, CFG)]
    ids, mask = T.encode(texts)
    assert not (ids == T.UNK_ID).any()
    assert T.decode(ids) == texts


def test_encode_pads_right_and_always_ends_with_eos(batch):
    texts = batch.captions[:40]
    ids, mask = T.encode(texts, max_length=T.CONTEXT_LENGTH)
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == mask.shape == (40, T.CONTEXT_LENGTH)
    for row, m, text in zip(ids, mask, texts, strict=True):
        n = len(text.split()) + 2
        assert row[0] == T.BOS_ID and row[n - 1] == T.EOS_ID and (row == T.EOS_ID).sum() == 1
        assert (row[n:] == T.PAD_ID).all() and m[:n].all() and not m[n:].any()
    longest, _ = T.encode(texts, max_length=None)
    assert longest.shape[1] == max(len(t.split()) for t in texts) + 2
    cut, cut_mask = T.encode(["a small red circle left of a large blue square"], max_length=5)
    assert cut.tolist() == [[T.BOS_ID, *T.encode("a small red", None)[0][0, 1:4].tolist(), T.EOS_ID]]
    assert cut_mask.all()
    with pytest.raises(ValueError, match="max_length"):
        T.encode(["a"], max_length=1)


def test_tokenizer_save_load_round_trip(tmp_path, batch):
    path = T.save_tokenizer(tmp_path)
    assert path == tmp_path / "tokenizer.json" and path.exists()
    loaded = T.load_tokenizer(tmp_path)
    a, b = T.encode(batch.captions[:20]), T.encode(batch.captions[:20], tokenizer=loaded)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert T.decode(b[0], tokenizer=loaded) == batch.captions[:20]


def test_clip_text_model_pools_at_eos():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(**T.text_config_kwargs(), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2)
    model = transformers.CLIPTextModel(cfg).eval()
    texts = ["a small red circle", "a large blue star above a small white cross"]
    ids, mask = T.encode(texts)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    eos = torch.tensor([len(t.split()) + 1 for t in texts])
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), eos])
    hf = T.build_hf_tokenizer()
    enc = hf(texts, padding="max_length", max_length=T.CONTEXT_LENGTH, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
