"""MAE, MAE-CLIP and M3AE: losses against hand computations, what the encoder sees, the recipes."""
import math

import pytest
import torch
import torch.nn.functional as F

from vlpt import config
from vlpt.config import ConfigError
from vlpt.data.tokenizer import Vocab
from vlpt.models.model import ImageTextModel
from vlpt.models.vision import MEAN, STD
from vlpt.train import loop
from vlpt.train.optim import build_optimizer
from vlpt.train.pretrainer import build
from vlpt.train.step import StepParts, train_step

V = 50
MICRO = ["model=micro", "train.steps=1"]
RECIPES = ["mae", "mae-clip", "m3ae", "mae-flickr8k", "mae-clip-flickr8k", "m3ae-flickr8k"]


def batch(b=2, seed=0):
    """Micro shapes: 32x32 images (16 patches of 8x8), 24 text positions of which 3 + 2 per example are real."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(5, V, (b, 24), generator=g)
    text[:, 0] = 1
    for i in range(b):
        text[i, 4 + 2 * i], text[i, 5 + 2 * i:] = 2, 0
    return {"image": torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8), "text": text}


def pretrainer(recipe, *overrides):
    torch.manual_seed(0)
    return build(config.resolve(recipe, MICRO + list(overrides)), Vocab(V))


def hand_pixels(image, p=8, norm_pix=True):
    """One patch at a time: the pixels as the ViT sees them, (row, column, channel) within the patch."""
    x = (image.float() - torch.tensor(MEAN).view(3, 1, 1) * 255) / (torch.tensor(STD).view(3, 1, 1) * 255)
    out = []
    for r in range(x.shape[1] // p):
        for c in range(x.shape[2] // p):
            v = x[:, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)
            out.append((v - v.mean()) / math.sqrt(((v - v.mean()) ** 2).sum() / (v.numel() - 1) + 1e-6) if norm_pix else v)
    return torch.stack(out)


def encoder_lengths(module):
    lengths = []
    module.model.visual.transformer.blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    return lengths


# ------------------------------------------------------------------------------------------------ MAE
def test_mae_loss_is_the_mse_of_the_masked_patches_only():
    mae = pretrainer("mae").objectives["mae"]
    b = batch()
    keep = torch.tensor([[0, 5, 10, 15], [3, 2, 1, 0]])
    pred = torch.randn(2, 16, 192)
    mae.decoder.forward = lambda segments, attend=None: [pred]
    loss, _ = mae({"image_tokens@masked": torch.zeros(2, 4, 64)}, {**b, "image_keep": keep})
    terms = [((pred[i, n] - hand_pixels(b["image"][i])[n]) ** 2).mean()
             for i in range(2) for n in range(16) if n not in keep[i]]
    assert len(terms) == 24
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    # predictions at kept patches do not count; at a masked one they do
    pred[0, 5] += 10
    assert mae({"image_tokens@masked": torch.zeros(2, 4, 64)}, {**b, "image_keep": keep})[0] == loss
    pred[0, 6] += 10
    assert mae({"image_tokens@masked": torch.zeros(2, 4, 64)}, {**b, "image_keep": keep})[0] > loss + 1


def test_mae_targets_without_per_patch_normalisation_are_the_pixels_the_vit_sees():
    mae = pretrainer("mae", "objectives.mae.norm_pix=false").objectives["mae"]
    b, keep, pred = batch(b=1), torch.tensor([[7]]), torch.zeros(1, 16, 192)
    mae.decoder.forward = lambda segments, attend=None: [pred]
    loss, _ = mae({"image_tokens@masked": torch.zeros(1, 1, 64)}, {**b, "image_keep": keep})
    target = hand_pixels(b["image"][0], norm_pix=False)
    torch.testing.assert_close(loss, (target[torch.arange(16) != 7] ** 2).mean())


@pytest.mark.parametrize("pool,cls", [("cls", 1), ("gap", 0)])
def test_the_mae_encoder_sees_only_the_visible_quarter_of_the_patches(pool, cls):
    module = pretrainer("mae", f"model.vision.pool={pool}")
    lengths = encoder_lengths(module)
    b = batch(b=3)
    module.objectives["mae"].prepare(b)
    keep = b["image_keep"]
    assert keep.shape == (3, 4) and all(len(set(row.tolist())) == 4 for row in keep)  # int(16 * 0.25) distinct
    module(b)
    assert lengths == [cls + 4]  # one encoder pass, over the kept patches (and the [CLS])
    # the decoder reads all 16 positions, mask tokens where patches were dropped
    seen = []
    module.objectives["mae"].decoder.transformer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    module(b)
    assert seen == [(3, 16, 64)]


def test_the_decoder_puts_encoder_tokens_back_in_their_places_and_mask_tokens_elsewhere():
    decoder = pretrainer("m3ae").objectives["m3ae"].decoder
    seen = []
    decoder.transformer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    img, txt = torch.randn(1, 2, 64), torch.randn(1, 1, 64)
    decoder([(img, torch.tensor([[9, 3]])), (txt, torch.tensor([[5]]))])
    x, pos_img, pos_txt = seen[0][0], decoder.pos_0, decoder.pos_1
    (m_img, m_txt), (t_img, t_txt) = decoder.mask_tokens, decoder.type_embeds
    assert x.shape == (16 + 24, 64)
    torch.testing.assert_close(x[9], decoder.proj(img[0, 0]) + pos_img[9] + t_img)
    torch.testing.assert_close(x[3], decoder.proj(img[0, 1]) + pos_img[3] + t_img)
    torch.testing.assert_close(x[0], m_img + pos_img[0] + t_img)
    torch.testing.assert_close(x[16 + 5], decoder.proj(txt[0, 0]) + pos_txt[5] + t_txt)
    torch.testing.assert_close(x[16 + 6], m_txt + pos_txt[6] + t_txt)
    # fixed sin-cos positions: row in the first half of the width, column in the second (patch 9 = row 2, col 1)
    torch.testing.assert_close(pos_img[9, :16], torch.sin(torch.tensor(2.0) / 10000 ** (torch.arange(16) / 16)))
    torch.testing.assert_close(pos_img[9, 48:], torch.cos(torch.tensor(1.0) / 10000 ** (torch.arange(16) / 16)))


def test_a_conv_stem_lets_no_masked_pixel_into_the_kept_tokens():
    cfg = config.resolve("mae", MICRO + ["model.vision.stem=conv", "model.vision.pool=gap"])
    model = ImageTextModel(cfg.model, Vocab(V), frozenset({"image_tokens@masked"})).eval()
    b = batch(b=1)
    keep = torch.tensor([[5, 6, 9]])
    out = model({**b, "image_keep": keep}, frozenset({"image_tokens@masked"}))["image_tokens@masked"]
    other = b["image"].clone()
    other[:, :, 8:16, :8] = 255 - other[:, :, 8:16, :8]  # patch 4, the left neighbour of kept patch 5
    same = model({"image": other, "image_keep": keep}, frozenset({"image_tokens@masked"}))["image_tokens@masked"]
    torch.testing.assert_close(out, same)
    other[:, :, 8:16, 8:16] = 0  # patch 5 itself
    changed = model({"image": other, "image_keep": keep}, frozenset({"image_tokens@masked"}))["image_tokens@masked"]
    assert not torch.allclose(out, changed)


# ------------------------------------------------------------------------------------------- MAE-CLIP
def test_mae_clip_loss_is_contrastive_plus_005_mae_and_its_contrastive_branch_sees_full_images():
    module = pretrainer("mae-clip")
    assert module.weights == {"contrastive": 1.0, "mae": 0.05}
    lengths = encoder_lengths(module)
    loss, metrics = module(batch(b=4))
    torch.testing.assert_close(loss, metrics["contrastive/loss"] + 0.05 * metrics["mae/loss"])
    assert lengths == [16, 4]  # the contrastive branch's full image (gap: no [CLS]), then MAE's visible patches


def test_mae_clip_with_masked_images_scores_the_patches_mae_keeps_in_one_encoder_pass():
    module = pretrainer("mae-clip", "objectives.contrastive.masked_image=true")
    assert module.needs == {"image_embed@masked", "image_tokens@masked", "text_embed"}
    lengths = encoder_lengths(module)
    b = batch(b=4)
    module.objectives["mae"].prepare(b)  # the module draws on a copy of the batch; this mask is the one it uses
    loss, metrics = module(b)
    assert lengths == [4]
    # the contrastive loss is CLIP's on the pooled kept patches: recompute it from the model's pieces
    model, keep = module.model, b["image_keep"]
    tokens = model.visual(b["image"], keep)[1]
    img = F.normalize(model.image_proj(tokens.mean(1)), dim=-1)
    txt = model.encode_text(b["text"])
    logits = module.objectives["contrastive"].scale() * img @ txt.T
    labels = torch.arange(4)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(metrics["contrastive/loss"], expected)


def test_reading_the_masked_view_without_a_masking_objective_is_a_config_error():
    with pytest.raises(ConfigError, match="objectives.contrastive reads image_embed@masked.*objectives.mae"):
        config.resolve("clip", MICRO + ["objectives.contrastive.masked_image=true"])


@pytest.mark.parametrize("override,match", [
    ("objectives.mae.mask_ratio=1.0", r"objectives.mae.mask_ratio=1.0 must be in \[0, 1\)"),
    ("objectives.mae.decoder_heads=3", "objectives.mae: decoder_depth=2, decoder_width=64, decoder_heads=3"),
    ("objectives.mae.mask_ration=0.5", "did you mean 'objectives.mae.mask_ratio'"),
])
def test_bad_mae_options_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        config.resolve("mae", MICRO + [override])


# ----------------------------------------------------------------------------------------------- M3AE
def test_m3ae_loss_is_pixel_mse_plus_01_masked_token_cross_entropy():
    m3ae = pretrainer("m3ae").objectives["m3ae"]
    b = batch()
    image_keep = torch.tensor([[0, 1, 2, 3], [15, 14, 13, 12]])
    text_keep = torch.tensor([[0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 0, 6]])
    pixels, logits = torch.randn(2, 16, 192), torch.randn(2, 24, V)
    m3ae.decoder.forward = lambda segments, attend=None: [pixels, logits]
    loss, metrics = m3ae({"joint_tokens@masked": torch.zeros(2, 10, 64)},
                         {**b, "image_keep": image_keep, "text_keep": text_keep})
    image = torch.stack([((pixels[i, n] - hand_pixels(b["image"][i], norm_pix=False)[n]) ** 2).mean()
                         for i in range(2) for n in range(16) if n not in image_keep[i]]).mean()
    # example 0: real tokens at 0-4, all kept -> nothing to score; example 1: real at 0-6, 0 and 6 kept
    logp = logits.log_softmax(-1)
    text = torch.stack([-logp[1, j, b["text"][1, j]] for j in (1, 2, 3, 4, 5)]).mean() / 2  # mean over 2 examples
    torch.testing.assert_close(metrics["image_loss"], image)
    torch.testing.assert_close(metrics["text_loss"], text)
    torch.testing.assert_close(loss, image + 0.1 * text)


def test_m3ae_encodes_cls_kept_patches_and_kept_text_in_one_pass():
    module = pretrainer("m3ae")
    assert module.model.text is None and module.model.joint is not None  # one transformer: the ViT
    lengths = encoder_lengths(module)
    b = batch(b=3)
    module.objectives["m3ae"].prepare(b)
    module(b)
    assert b["text_keep"].shape == (3, 6)  # int(24 * 0.25) of the text positions
    assert lengths == [1 + 4 + 6]  # [CLS; 4 of 16 patches; 6 of 24 text positions]


def test_joint_tokens_never_attend_to_padding():
    cfg = config.resolve("m3ae", MICRO)
    model = ImageTextModel(cfg.model, Vocab(V), frozenset({"joint_tokens@masked"})).eval()
    b = batch(b=1)  # real text tokens at 0-4, padding from 5
    image_keep = torch.tensor([[1, 4, 9, 12]])
    need = frozenset({"joint_tokens@masked"})
    without = model({**b, "image_keep": image_keep, "text_keep": torch.tensor([[0, 2, 3]])}, need)
    with_pad = model({**b, "image_keep": image_keep, "text_keep": torch.tensor([[0, 2, 20, 3, 7]])}, need)
    a, p = without["joint_tokens@masked"], with_pad["joint_tokens@masked"]
    assert p.shape == (1, 4 + 5, 64)
    torch.testing.assert_close(p[:, [0, 1, 2, 3, 4, 5, 7]], a)  # the same as if the padding were not there
    # and the text is really attended to: another word changes the image tokens
    other = {**b, "text": b["text"].clone()}
    other["text"][0, 2] += 1
    moved = model({**other, "image_keep": image_keep, "text_keep": torch.tensor([[0, 2, 3]])}, need)
    assert not torch.allclose(moved["joint_tokens@masked"][:, :4], a[:, :4])


# -------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe", ["mae", "mae-clip", "m3ae"])
@pytest.mark.parametrize("pool", ["cls", "gap", "max", "map"])
def test_each_method_trains_a_step_with_each_pooling_and_keeps_probe_features(recipe, pool):
    if pool == "map" and recipe != "mae-clip":  # only a contrastive loss reads (so trains) the pooled feature
        with pytest.raises(ConfigError, match="model.vision.pool=map adds an attention pooler that no objective"):
            config.resolve(recipe, MICRO + [f"model.vision.pool={pool}"])
        return
    cfg = config.resolve(recipe, MICRO + [f"model.vision.pool={pool}"])
    torch.manual_seed(0)
    module = build(cfg, Vocab(V))
    parts = StepParts(module, build_optimizer(module, cfg.train))
    before = {k: v.clone() for k, v in module.named_parameters()}
    result = train_step(parts, batch(b=4), 1, 1)
    assert result.updated and math.isfinite(result.loss)
    moved = {k for k, v in module.named_parameters() if not torch.equal(v, before[k])}
    assert any(k.startswith("model.visual.transformer") for k in moved)
    assert any(k.startswith(f"objectives.{'m3ae' if recipe == 'm3ae' else 'mae'}.decoder") for k in moved)
    assert module.model.image_features(batch(b=4)["image"]).shape == (4, 64)  # what linear probes read


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_on_scenes(tmp_path, recipe):
    cfg = config.resolve(recipe, MICRO + ["train.steps=2", "train.batch_size=8", "data=scenes:test",
                                          "data.cache_images=false", "eval.tasks=[]", "train.precision=fp32"])
    loop.train(cfg, tmp_path, progress=False)
    assert (tmp_path / "checkpoints").exists()


def test_the_flickr8k_variants_have_clip_flickr8ks_data_and_budget():
    clip = config.to_dict(config.resolve("clip-flickr8k"))
    for recipe in ("mae-flickr8k", "mae-clip-flickr8k", "m3ae-flickr8k"):
        d = config.to_dict(config.resolve(recipe))
        for section in ("data", "views", "train", "tokenizer"):
            assert d[section] == clip[section], (recipe, section)
        method = config.to_dict(config.resolve(recipe.removesuffix("-flickr8k")))
        assert d["objectives"] == method["objectives"] and d["model"] == method["model"]
