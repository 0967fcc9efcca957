"""Schedule, optimizer groups, budgets, batch order and views: each against what it must compute."""
import math

import pytest
import torch

from vlpt import config
from vlpt.data.dataset import ImageTextSet
from vlpt.data.loader import StepBatches
from vlpt.data.tokenizer import Vocab
from vlpt.data.views import random_resized_crop
from vlpt.objectives import OBJECTIVES
from vlpt.models.model import ImageTextModel
from vlpt.train.loop import total_steps
from vlpt.train.optim import build_optimizer, param_groups, warmup_cosine
from vlpt.train.pretrainer import Pretrainer


def test_warmup_then_cosine():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = warmup_cosine(opt, warmup=4, total=14, lr=1.0, min_lr=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_no_weight_decay_on_biases_norms_and_temperature():
    cfg = config.resolve("clip", ["model=micro", "train.steps=1"])
    module = Pretrainer(ImageTextModel(cfg.model, Vocab(50)), {"contrastive": OBJECTIVES["contrastive"]()}, {"contrastive": 1.0})
    decay, no_decay = param_groups(module, 0.1)
    names = {id(p): n for n, p in module.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "objectives.contrastive.log_scale" in no_decay_names
    assert "model.visual.ln_post.weight" in no_decay_names and "model.text.transformer.blocks.0.mlp.fc1.bias" in no_decay_names
    assert all(names[id(p)].endswith("weight") or "embed" in names[id(p)] or "token" in names[id(p)] for p in decay["params"])
    assert build_optimizer(module, cfg.train).param_groups[1]["weight_decay"] == 0.0


def test_budgets_in_steps_epochs_samples():
    base = ["model=micro", "train.batch_size=100"]
    assert total_steps(config.resolve("clip", base + ["train.steps=7"]), 1000) == 7
    assert total_steps(config.resolve("clip", base + ["train.epochs=2.5"]), 1000) == 25
    assert total_steps(config.resolve("clip", base + ["train.samples=1050"]), 1000) == 11


def _set(n=10):
    return ImageTextSet("t", list(range(n)), None, [f"c{i}" for i in range(n)], list(range(n)))


def test_batches_cover_each_epoch_once_and_depend_only_on_the_step():
    s, tokens, images = _set(10), torch.arange(10)[:, None], torch.arange(10).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    b = StepBatches(s, tokens, batch_size=5, seed=0, image_size=2, images=images)
    epoch0 = torch.cat([b[0]["text"], b[1]["text"]]).flatten().sort().values
    assert torch.equal(epoch0, torch.arange(10))
    fresh = StepBatches(s, tokens, batch_size=5, seed=0, image_size=2, images=images)
    assert torch.equal(fresh[3]["text"], b[3]["text"])  # no hidden iterator state: resume = start at step k
    assert not torch.equal(b[0]["text"], b[2]["text"]) or not torch.equal(b[1]["text"], b[3]["text"])
    # ranks split the same global batch
    r0 = StepBatches(s, tokens, 4, 0, 2, images=images, rank=0, world=2)
    r1 = StepBatches(s, tokens, 4, 0, 2, images=images, rank=1, world=2)
    one = StepBatches(s, tokens, 4, 0, 2, images=images)
    assert torch.equal(torch.cat([r0[5]["text"], r1[5]["text"]]), one[5]["text"])
    assert torch.equal(r0[5]["image"][:, 0, 0, 0], r0[5]["text"][:, 0])  # images follow their captions


def test_weighted_batches_follow_the_weights():
    s, tokens = _set(10), torch.arange(10)[:, None]
    w = torch.tensor([0.5 / 2] * 2 + [0.5 / 8] * 8)
    b = StepBatches(s, tokens, 100, 0, 2, images=torch.zeros(10, 3, 2, 2, dtype=torch.uint8), weights=w)
    drawn = torch.cat([b[k]["text"] for k in range(20)]).flatten()
    assert abs((drawn < 2).float().mean().item() - 0.5) < 0.05


def test_random_resized_crop():
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(random_resized_crop(x, (1.0, 1.0), g), x.float())
    a = random_resized_crop(x, (0.3, 0.6), torch.Generator().manual_seed(1))
    b = random_resized_crop(x, (0.3, 0.6), torch.Generator().manual_seed(1))
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b) and not torch.allclose(a, x.float())
    assert a.min() >= 0 and a.max() <= 255


def test_learned_tokens_and_pooler_queries_get_no_weight_decay():
    """As open_clip excludes its class embedding: [CLS] tokens and attention-pooler queries are not decayed."""
    cfg = config.resolve("coca", ["model=micro", "train.steps=1", "model.vision.pool=cls",
                                  "model.poolers.generative_queries=4"])
    from vlpt.train.pretrainer import build

    module = build(cfg, Vocab(50))
    decay, no_decay = param_groups(module, 0.1)
    names = {id(p): n for n, p in module.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"model.visual.cls_token", "model.decoder.cls_token", "model.gen_pool.query", "model.con_pool.query",
            "objectives.contrastive.log_scale", "model.visual.ln_pre.weight", "model.decoder.head.bias"} <= no_decay_names
    assert {"model.visual.pos_embed", "model.decoder.pos_embed", "model.decoder.token_embed.weight",
            "model.visual.transformer.blocks.0.attn.qkv.weight", "model.image_proj.weight",
            "model.decoder.head.weight"} <= decay_names
    assert all(names[id(p)].endswith(("weight", "pos_embed")) for p in decay["params"])


def test_accumulation_divides_each_process_batch(tmp_path, monkeypatch):
    """batch 40 on 4 processes is 10 each: 4 micro-batches would split it 3/3/3/1 (and weigh them equally)."""
    from vlpt.train import distributed, loop

    monkeypatch.setattr(distributed, "world_size", lambda: 4)  # the check comes before any collective
    cfg = config.resolve("clip", ["model=micro", "train.steps=1", "train.batch_size=40", "train.accum_steps=4",
                                  "eval.tasks=[]"])
    with pytest.raises(config.ConfigError, match="10 per process, which train.accum_steps=4 does not divide"):
        loop.train(cfg, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()
