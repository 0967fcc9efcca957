"""BYOLIP (objectives/byol.py): its loss against a hand computation with a target network that differs from
the online one, where the gradients go, the target's update, and the recipes train."""
import json
import math

import pytest
import torch
from torch import nn

from vlpt import config
from vlpt.data.sources import shared_data_dir
from vlpt.data.tokenizer import Vocab
from vlpt.train import loop
from vlpt.train.pretrainer import build

VOCAB = Vocab(64)


def by_hand(head: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A Linear / BatchNorm1d (batch statistics, biased variance) / ReLU stack, written out."""
    for layer in head:
        if isinstance(layer, nn.Linear):
            x = x @ layer.weight.T + (0 if layer.bias is None else layer.bias)
        elif isinstance(layer, nn.BatchNorm1d):
            mean = x.mean(0)
            x = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(0) + layer.eps)
            if layer.affine:
                x = x * layer.weight + layer.bias
        else:
            assert isinstance(layer, nn.ReLU)
            x = torch.where(x > 0, x, torch.zeros_like(x))
    return x


def d(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos, averaged over the batch."""
    return 2 - 2 * ((p / p.norm(dim=1, keepdim=True)) * (z / z.norm(dim=1, keepdim=True))).sum(1).mean()


def tiny(views: bool):
    cfg = config.resolve("byolip", ["model=micro", "train.steps=1", "objectives.byol.hidden=6",
                                    "objectives.byol.dim=4", f"objectives.byol.views={str(views).lower()}",
                                    "views.text_views.dropout=0"])
    torch.manual_seed(0)
    module = build(cfg, VOCAB)
    objective = module.objectives["byol"]
    with torch.no_grad():  # a target that is no longer the online network's copy
        for p in objective.target.module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    text = torch.randint(4, 64, (3, 5, 24), generator=g)
    text[..., 6] = VOCAB.eot
    batch = {"image": torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g), "text": text[0],
             "image_views": torch.randint(0, 256, (2, 5, 3, 32, 32), dtype=torch.uint8, generator=g),
             "text_views": text[1:]}
    return module.train(), objective, batch


@pytest.mark.parametrize("views", [False, True])
def test_loss_against_a_hand_computation(views):
    module, objective, batch = tiny(views)
    outputs = module.model(batch, objective.needs)
    loss, metrics = objective(outputs, batch)

    target = objective.target.module
    with torch.no_grad():
        t_out = target.model(batch, objective.needs)

    def each(out, name, view):
        return [out[name]] + (list(out[f"{name}@{view}"].unbind(0)) if views else [])

    p_img = [by_hand(objective.image_to_text, by_hand(objective.image_head, x))
             for x in each(outputs, "image_pooled", "image_views")]
    p_txt = [by_hand(objective.text_to_image, by_hand(objective.text_head, x))
             for x in each(outputs, "text_features", "text_views")]
    z_img = [by_hand(target.image_head, x) for x in each(t_out, "image_pooled", "image_views")]
    z_txt = [by_hand(target.text_head, x) for x in each(t_out, "text_features", "text_views")]
    terms = [d(p_img[0], z_txt[0]), d(p_txt[0], z_img[0])]
    for i in range(1, len(p_img)):
        for j in range(1, len(p_txt)):
            terms += [d(p_img[i], z_txt[j]), d(p_txt[j], z_img[i])]
    assert len(terms) == (10 if views else 2)  # the global pair and 2 x 2 (image view, text view) pairs
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["global"], (terms[0] + terms[1]) / 2, rtol=1e-5, atol=1e-6)
    # the online network's own projections as targets (SiamLIP) would give another number
    z_txt_online = by_hand(objective.text_head, outputs["text_features"])
    z_img_online = by_hand(objective.image_head, outputs["image_pooled"])
    siamese = (d(p_img[0], z_txt_online) + d(p_txt[0], z_img_online)) / 2
    assert not torch.allclose(siamese, metrics["global"], atol=1e-3)

    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    for online in (objective.image_head[0].weight, objective.text_to_image[3].bias,
                   module.model.visual.patch_embed.weight, module.model.text.token_embed.weight):
        assert online.grad is not None and online.grad.abs().sum() > 0


def test_target_starts_as_the_online_network_and_follows_it_by_the_momentum():
    cfg = config.resolve("byolip", ["model=micro", "train.steps=1", "objectives.byol.hidden=6",
                                    "objectives.byol.dim=4"])
    module = build(cfg, VOCAB)
    objective = module.objectives["byol"]
    online = {**{f"model.{n}": p for n, p in module.model.named_parameters()},
              **{f"image_head.{n}": p for n, p in objective.image_head.named_parameters()},
              **{f"text_head.{n}": p for n, p in objective.text_head.named_parameters()}}
    target = dict(objective.target.module.named_parameters())
    assert target.keys() == online.keys()  # towers and projectors; the predictors stay online-only
    assert all(torch.equal(target[n], online[n]) for n in online)
    before = {n: t.clone() for n, t in target.items()}
    with torch.no_grad():
        for p in online.values():
            p.add_(torch.randn_like(p))
    module.after_step(1, 10)
    for n in online:
        torch.testing.assert_close(target[n], 0.99 * before[n] + 0.01 * online[n], rtol=1e-6, atol=1e-7)


def test_byolip_trains_on_scenes(tmp_path):
    cfg = config.resolve("byolip", ["model=micro", "data=scenes:test", "train.steps=3", "train.batch_size=16",
                                    "train.warmup_steps=1", "train.log_every=1", "train.threads=1", "eval.tasks=[]"])
    loop.train(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3 and all(math.isfinite(r["byol/loss"]) and math.isfinite(r["loss"]) for r in train)
    assert all(0 < r["byol/loss"] < 4 for r in train)  # 2 - 2 cos lies in [0, 4]


@pytest.mark.skipif(shared_data_dir() is None or not (shared_data_dir() / "flickr8k").is_dir(),
                    reason="no ../shared/data/flickr8k")
def test_byolip_flickr8k_trains(tmp_path):
    cfg = config.resolve("byolip-flickr8k", ["model=micro", "train.steps=2", "train.batch_size=16",
                                             "train.warmup_steps=1", "train.log_every=1", "train.threads=1",
                                             "data.cache_images=false", "train.precision=fp32", "eval.tasks=[]"])
    loop.train(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [math.isfinite(r["byol/loss"]) for r in rows if r["kind"] == "train"] == [True, True]
