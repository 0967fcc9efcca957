"""Evaluation protocols: recall@K, zero-shot classification, and the suite runner (probes: test_probes.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlpt.data import sources
from vlpt.data.dataset import ImageTextSet
from vlpt.eval import retrieval as retrieval_mod
from vlpt.eval import data as eval_data
from vlpt.eval import registry as tasks
from vlpt.eval.retrieval import recall_at_k, retrieval
from vlpt.eval.templates import IMAGENET_TEMPLATES, SIMPLE_TEMPLATES, get_templates
from vlpt.eval.zeroshot import classifier_weights, zeroshot_classify

# --------------------------------------------------------------------------- recall@K


def test_recall_at_k_hand_computed():
    # 3 images; image 0 has captions 0 and 1, image 1 has caption 2, image 2 has captions 3 and 4.
    caption_image = [0, 0, 1, 2, 2]
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.0],  # caption 0 -> img1, img0, img2        (own image at rank 2)
            [0.8, 0.1, 0.2],  # caption 1 -> img0 first              (rank 1)
            [0.3, 0.5, 0.4],  # caption 2 -> img1 first              (rank 1)
            [0.6, 0.2, 0.1],  # caption 3 -> img0, img1, img2        (rank 3)
            [0.0, 0.7, 0.3],  # caption 4 -> img1, img2              (rank 2)
        ]
    )
    r = recall_at_k(sim, caption_image, ks=(1, 2, 3))
    assert r["t2i_R@1"] == pytest.approx(40.0)
    assert r["t2i_R@2"] == pytest.approx(80.0)
    assert r["t2i_R@3"] == pytest.approx(100.0)
    # image -> text, by column:
    #   img0: [.1,.8,.3,.6,0] -> caption 1 first: only its SECOND caption ranks first, still a hit at 1
    #   img1: [.9,.1,.5,.2,.7] -> captions 0 (img0), 4 (img2), 2 (img1): hit at 3
    #   img2: [0,.2,.4,.1,.3] -> captions 2 (img1), 4 (img2): hit at 2
    assert r["i2t_R@1"] == pytest.approx(100 / 3)
    assert r["i2t_R@2"] == pytest.approx(200 / 3)
    assert r["i2t_R@3"] == pytest.approx(100.0)
    assert list(r) == ["t2i_R@1", "t2i_R@2", "t2i_R@3", "i2t_R@1", "i2t_R@2", "i2t_R@3"]


def test_recall_default_ks_and_k_larger_than_pool():
    sim = torch.eye(3)
    r = recall_at_k(sim, [0, 1, 2])
    assert set(r) == {f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)}
    assert all(v == 100.0 for v in r.values())


def test_recall_images_without_captions_are_not_counted_for_i2t():
    sim = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])  # image 2 has no caption
    r = recall_at_k(sim, [0, 1], ks=(1,))
    assert r["i2t_R@1"] == 100.0 and r["t2i_R@1"] == 100.0


def test_recall_any_caption_semantics():
    # image 0's first caption is nowhere near it, but its second is the best match: a hit.
    sim = torch.tensor([[0.0, 0.5], [0.9, 0.1], [0.2, 0.8]])
    r = recall_at_k(sim, [0, 0, 1], ks=(1,))
    assert r["i2t_R@1"] == 100.0
    assert r["t2i_R@1"] == pytest.approx(200 / 3)


def test_retrieval_chunked_matches_full_matrix(monkeypatch):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(37, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(90, 8, generator=g), dim=-1)
    caption_image = torch.randint(0, 37, (90,), generator=g)
    full = recall_at_k(txt @ img.T, caption_image)
    monkeypatch.setattr(retrieval_mod, "MAX_CHUNK_ELEMENTS", 100)  # a few rows per chunk
    images = torch.arange(37)  # stand-ins for images: the fake encoder looks them up
    chunked = retrieval(lambda idx: img[idx], lambda t: txt[[int(s) for s in t]], images,
                        [str(i) for i in range(90)], caption_image, batch_size=16)
    assert chunked == pytest.approx(full)
    assert recall_at_k(txt @ img.T, caption_image) == pytest.approx(full)  # deterministic


def test_recall_rejects_bad_input():
    with pytest.raises(ValueError, match="caption_image"):
        recall_at_k(torch.zeros(3, 2), [0, 1])
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(torch.zeros(2, 2), [0, 2])


# --------------------------------------------------------------------------- templates


def test_templates():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES + SIMPLE_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert get_templates("imagenet80") == list(IMAGENET_TEMPLATES)
    assert get_templates("simple") == list(SIMPLE_TEMPLATES)
    assert get_templates(["x {} y"]) == ["x {} y"]
    with pytest.raises(ValueError, match="imagenet80"):
        get_templates("imagenet81")
    with pytest.raises(ValueError, match="containing"):
        get_templates(["no placeholder"])


# --------------------------------------------------------------------------- zero-shot

PALETTE = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "cyan": (0, 255, 255), "magenta": (255, 0, 255),
}
NAMES = list(PALETTE)
COLOURS = torch.tensor(list(PALETTE.values()), dtype=torch.float32)


def fake_encode_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> one-hot of the nearest palette colour (unit vectors)."""
    assert images.dtype == torch.uint8
    mean = images.float().mean(dim=(2, 3))
    return F.one_hot(torch.cdist(mean, COLOURS).argmin(1), len(NAMES)).float()


def fake_encode_texts(texts: list[str]) -> torch.Tensor:
    """One-hot of the colour word in the text (0 if none)."""
    out = torch.zeros(len(texts), len(NAMES))
    for i, t in enumerate(texts):
        for j, name in enumerate(NAMES):
            if name in t.split() or f"{name}." in t.split():
                out[i, j] = 1.0
    return out


def colour_images(labels, size=8, jitter=0, seed=0):
    rng = np.random.default_rng(seed)
    imgs = []
    for y in labels:
        c = np.clip(np.array(PALETTE[NAMES[y]]) + rng.integers(-jitter, jitter + 1, 3), 0, 255)
        imgs.append(torch.tensor(c, dtype=torch.uint8)[:, None, None].expand(3, size, size))
    return torch.stack(imgs)


def test_zeroshot_known_answer():
    labels = [0, 1, 2, 3, 4, 5, 0, 3]
    images = colour_images(labels, jitter=30)
    r = zeroshot_classify(fake_encode_images, fake_encode_texts, images, labels, NAMES, "simple", batch_size=3)
    assert r == {"top1": 100.0, "top5": 100.0}
    # swapping two class names makes exactly those images wrong at top-1 (still right at top-5)
    swapped = NAMES.copy()
    swapped[0], swapped[1] = swapped[1], swapped[0]
    r = zeroshot_classify(fake_encode_images, fake_encode_texts, images, labels, swapped, "imagenet80")
    assert r["top1"] == pytest.approx(100 * 5 / 8)
    # top5 is reported only with more than 5 classes
    r = zeroshot_classify(fake_encode_images, fake_encode_texts, images[:3], labels[:3], NAMES[:3], "simple")
    assert set(r) == {"top1"}


def test_classifier_weights_average_normalised_template_embeddings():
    # template "big {}" gives a long vector, "small {}" a short one in another direction
    directions = {"cat": torch.tensor([1.0, 0.0, 0.0]), "dog": torch.tensor([0.0, 1.0, 0.0])}

    def encode(texts):
        rows = []
        for t in texts:
            word, name = t.split()
            v = directions[name] if word == "big" else torch.tensor([0.0, 0.0, 1.0]) + 0.5 * directions[name]
            rows.append(v * (10.0 if word == "big" else 0.1))
        return torch.stack(rows)

    templates = ["big {}", "small {}"]
    w = classifier_weights(encode, ["cat", "dog"], templates)
    manual = []
    for name in ["cat", "dog"]:
        e = encode([t.format(name) for t in templates])
        e = e / e.norm(dim=-1, keepdim=True)
        m = e.mean(0)
        manual.append(m / m.norm())
    assert torch.allclose(w, torch.stack(manual), atol=1e-6)
    assert torch.allclose(w.norm(dim=-1), torch.ones(2))
    # averaging the raw embeddings instead would be dominated by the long "big" vector
    raw = F.normalize(encode(["big cat", "small cat"]).mean(0), dim=0)
    assert not torch.allclose(w[0], raw, atol=1e-2)
    expected_cat = F.normalize(torch.tensor([1.0, 0.0, 0.0]) + F.normalize(torch.tensor([0.5, 0.0, 1.0]), dim=0), dim=0)
    assert torch.allclose(w[0], expected_cat, atol=1e-6)


# --------------------------------------------------------------------------- suite runner


class FakeModel:
    image_size = 8
    abilities = frozenset({"image_embed", "text_embed", "image_features"})

    def encode_images(self, images):
        return fake_encode_images(images)

    def encode_texts(self, texts):
        return fake_encode_texts(texts)

    def image_features(self, images):
        return images.float().mean(dim=(2, 3)) / 255.0


def colour_set(name, labels, jitter, seed) -> ImageTextSet:
    arrays = colour_images(labels, size=12, jitter=jitter, seed=seed).permute(0, 2, 3, 1).numpy()
    captions, caption_image = [], []
    for i, y in enumerate(labels):
        captions += [f"a {NAMES[y]} square", f"something {NAMES[y]}"]
        caption_image += [i, i]
    return ImageTextSet(name=name, images=list(range(len(labels))), load=lambda i: Image.fromarray(arrays[i]),
                        captions=captions, caption_image=caption_image, labels=list(labels), classnames=NAMES)


@pytest.fixture
def fake_sources(monkeypatch):
    """open_source over tiny colour sets (decoded by the real decode_all)."""
    sets = {
        "toy:cls": colour_set("toy-cls", [0, 1, 2, 3, 4, 5, 2], 20, 0),
        "toy:one_per_class": colour_set("toy-ret", [0, 1, 2, 3, 4, 5], 0, 1),
        "toy:train": colour_set("toy-train", [i % 6 for i in range(60)], 40, 2),
        "toy:test": colour_set("toy-test", [i % 6 for i in range(24)], 40, 3),
    }
    calls = []

    def open_source(spec):
        calls.append(spec)
        return sets[spec]

    monkeypatch.setattr(sources, "open_source", open_source)
    eval_data.clear_cache()
    yield calls
    eval_data.clear_cache()


def test_run_suite_on_fake_model(fake_sources):
    suite = ["zeroshot:toy:cls", "retrieval:toy:one_per_class", "linear_probe:toy:train|toy:test"]
    r = tasks.run_suite(suite, FakeModel(), templates="simple", progress=False)
    assert r["zeroshot:toy:cls/top1"] == 100.0 and r["zeroshot:toy:cls/top5"] == 100.0
    for d in ("t2i", "i2t"):
        for k in (1, 5, 10):
            assert r[f"retrieval:toy:one_per_class/{d}_R@{k}"] == 100.0
    assert r["linear_probe:toy:train|toy:test/linear_probe_top1"] >= 95.0
    assert all(isinstance(v, float) and 0 <= v <= 100 for v in r.values())
    assert all(k.split("/")[0] in suite for k in r)
    # decoded sets are cached per (spec, size): a second run opens nothing new
    opened = list(fake_sources)
    assert sorted(opened) == ["toy:cls", "toy:one_per_class", "toy:test", "toy:train"]
    tasks.run_task("zeroshot:toy:cls", FakeModel(), templates="simple", progress=False)
    tasks.run_task("linear_probe:toy:train", FakeModel(), progress=False)  # ":train" implies ":test"
    assert fake_sources == opened


def test_unknown_task_kind(fake_sources):
    with pytest.raises(ValueError, match="did you mean 'zeroshot'"):
        tasks.run_suite(["retrieval:toy:one_per_class", "zero_shot:toy:cls"], FakeModel(), progress=False)
    assert fake_sources == []  # the typo was caught before any work
    with pytest.raises(ValueError, match="Known kinds"):
        tasks.run_task("segmentation:toy:cls", FakeModel())
    with pytest.raises(ValueError, match="TRAINSPEC"):
        tasks.run_task("linear_probe:toy:cls", FakeModel())
    with pytest.raises(ValueError, match="names no data set"):
        tasks.run_task("retrieval", FakeModel())


# --------------------------------------------------------------------------- captioner tasks


def image_colour(images: torch.Tensor) -> list[str]:
    return [NAMES[i] for i in fake_encode_images(images).argmax(1).tolist()]


class FakeCaptioner:
    """A captioner that sees the colour of a flat image (or, blind, sees nothing)."""

    image_size = 8
    abilities = frozenset({"caption"})

    def __init__(self, blind: bool = False):
        self.blind = blind
        self.score_calls: list[tuple] = []

    def caption(self, images):
        return [f"a {c} square" for c in image_colour(images)]

    def score_texts(self, images, texts, prompt="", normalize=False):
        self.score_calls.append((len(images), list(texts), prompt, normalize))
        colours = image_colour(images)
        return torch.tensor([[0.0 if t == c else -1.0 - 0.1 * j for j, t in enumerate(texts)] for c in colours])

    def caption_loss(self, images, texts):
        # 1 nat per caption that names the image's colour, 3 otherwise; tokens = words + <eot>
        colours = image_colour(images) if not self.blind else [None] * len(texts)
        nll = sum(1.0 if c is not None and c in t.split() else 3.0 for c, t in zip(colours, texts))
        return torch.tensor(nll), sum(len(t.split()) + 1 for t in texts)


def test_captioning_task(fake_sources, tmp_path):
    samples = {}
    r = tasks.run_task("captioning:toy:cls", FakeCaptioner(), progress=False, batch_size=3, samples=samples)
    assert set(r) == {f"captioning:toy:cls/{m}" for m in ("bleu1", "bleu2", "bleu3", "bleu4", "cider")}
    # every caption is one of its image's references: 3-token hypotheses, an exact 3-token reference
    for n in (1, 2, 3):
        assert r[f"captioning:toy:cls/bleu{n}"] == pytest.approx(1.0)
    labels = [0, 1, 2, 3, 4, 5, 2]  # the toy:cls set
    records = samples["captioning:toy:cls"]
    assert [x["caption"] for x in records] == [f"a {NAMES[y]} square" for y in labels]  # order kept across batches
    assert [x["references"] for x in records] == [[f"a {NAMES[y]} square", f"something {NAMES[y]}"] for y in labels]
    assert [x["image"] for x in records] == [str(i) for i in range(7)]
    saved = json.loads(tasks.write_samples(samples, tmp_path / "captions.json").read_text())
    assert saved == samples

    class WrongColour(FakeCaptioner):
        def caption(self, images):
            return [f"a {NAMES[(NAMES.index(c) + 1) % 6]} square" for c in image_colour(images)]

    worse = tasks.run_task("captioning:toy:cls", WrongColour(), progress=False)
    assert worse["captioning:toy:cls/cider"] < r["captioning:toy:cls/cider"]
    assert worse["captioning:toy:cls/bleu3"] < 1e-6


def test_zeroshot_captioner_task(fake_sources):
    model = FakeCaptioner()
    r = tasks.run_task("zeroshot_captioner:toy:cls", model, progress=False, batch_size=4)
    assert r == {"zeroshot_captioner:toy:cls/top1": 100.0, "zeroshot_captioner:toy:cls/top5": 100.0}
    # class names are scored as they are (no prompt template), unnormalised, in image batches
    assert model.score_calls == [(4, NAMES, "", False), (3, NAMES, "", False)]


def test_caption_loss_task(fake_sources):
    # toy:cls has 7 images x 2 captions ("a red square": 4 tokens, "something red": 3 tokens).
    r = tasks.run_task("caption_loss:toy:cls", FakeCaptioner(), progress=False, batch_size=5)
    assert r == {"caption_loss:toy:cls/loss": pytest.approx(14 * 1.0 / (7 * 4 + 7 * 3))}  # per token, not per caption
    blind = tasks.run_task("caption_loss:toy:cls", FakeCaptioner(blind=True), progress=False, batch_size=5)
    assert blind["caption_loss:toy:cls/loss"] == pytest.approx(14 * 3.0 / 49)


def test_tasks_check_model_abilities(fake_sources):
    with pytest.raises(ValueError, match="needs a caption decoder"):
        tasks.run_suite(["zeroshot:toy:cls", "captioning:toy:cls"], FakeModel(), progress=False)
    with pytest.raises(ValueError, match="needs a text embedding"):
        tasks.run_suite(["caption_loss:toy:cls", "retrieval:toy:cls"], FakeCaptioner(), progress=False)
    assert fake_sources == []  # caught before any work
    with pytest.raises(ValueError, match="did you mean 'captioning'"):
        tasks.run_task("captioninng:toy:cls", FakeCaptioner())


def test_auto_suite_follows_model_abilities():
    from vlpt.eval.defaults import SCENES_CAPTIONER_SUITE, SCENES_SUITE, resolve_tasks

    # today's behaviour by default
    assert resolve_tasks(["auto"], "scenes") == SCENES_SUITE
    assert resolve_tasks(["auto", "zeroshot:x"], "flickr8k:train") == ["retrieval:flickr8k:test", "zeroshot:x"]
    assert resolve_tasks(["auto"], "flickr8k:/data/f8k:train") == ["retrieval:flickr8k:/data/f8k:test"]
    assert resolve_tasks(["auto"], "cifar10:train") == ["zeroshot:cifar10:test"]  # was cifar10:train (a bug)
    assert resolve_tasks(["auto"], "folder:/d:train") == ["zeroshot:folder:/d:test"]
    captioner, coca = frozenset({"caption"}), frozenset({"image_embed", "text_embed", "caption"})
    assert resolve_tasks(["auto"], "folder:/d:train", captioner) == [
        "zeroshot_captioner:folder:/d:test"]
    assert resolve_tasks(["auto"], "csv:/x.csv") == []
    # a captioner (no text embedding)
    assert resolve_tasks(["auto"], "scenes", captioner) == SCENES_CAPTIONER_SUITE
    assert SCENES_CAPTIONER_SUITE[0] == "zeroshot_captioner:scenes:colour_shape"
    assert resolve_tasks(["auto"], "flickr8k:train", captioner) == [
        "captioning:flickr8k:test", "caption_loss:flickr8k:test"]
    # CoCa: both
    assert resolve_tasks(["auto"], "flickr8k:/d:train", coca) == [
        "retrieval:flickr8k:/d:test", "captioning:flickr8k:/d:test", "caption_loss:flickr8k:/d:test"]
    assert resolve_tasks(["auto"], "scenes", coca) == SCENES_SUITE + SCENES_CAPTIONER_SUITE
    assert all(t.partition(":")[0] in tasks.kinds() for t in SCENES_SUITE + SCENES_CAPTIONER_SUITE)
