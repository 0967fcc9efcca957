"""Frozen-feature probes: the linear probe (C chosen on validation data) and the attentional probe."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlpt import config
from vlpt.data import sources
from vlpt.data.scenes import load_scenes, scenes_set
from vlpt.data.tokenizer import Vocab
from vlpt.eval import data as eval_data
from vlpt.eval.attentional import attentional_probe, pooler_heads
from vlpt.eval.probes import DEFAULT_CS, linear_probe
from vlpt.eval.registry import TaskError, check_task, run_task
from vlpt.train.pretrainer import build

# --------------------------------------------------------------------------- linear probe


def small_margin(n: int, seed: int):
    """Two classes told apart only by x0 - x1, a direction of tiny variance in two nearly equal features;
    x2 is a noisy, high-variance cue. Strong regularisation leans on x2 (~70%), weak finds x0 - x1 (~100%)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = 2 * y - 1
    z, d = rng.normal(size=n), s * 0.05 + 0.01 * rng.normal(size=n)
    return np.stack([z + d, z - d, 0.5 * s + rng.normal(size=n)], 1), y


def test_linear_probe_recovers_a_separable_problem():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 5, (4, 16))
    ytr, yte = rng.integers(0, 4, 300), rng.integers(0, 4, 200)
    xtr, xte = means[ytr] + rng.normal(0, 1, (300, 16)), means[yte] + rng.normal(0, 1, (200, 16))
    r = linear_probe(torch.tensor(xtr), torch.tensor(ytr), xte, yte)
    assert set(r) == {"linear_probe_top1", "linear_probe_C", "linear_probe_val_top1"}
    assert r["linear_probe_top1"] >= 99.0 and r["linear_probe_val_top1"] >= 99.0
    assert r["linear_probe_C"] in DEFAULT_CS
    # random labels on random features: about chance (25%)
    noise = [rng.normal(size=(300, 16)), rng.integers(0, 4, 300), rng.normal(size=(300, 16)), rng.integers(0, 4, 300)]
    assert 10.0 <= linear_probe(*noise)["linear_probe_top1"] <= 40.0


def test_linear_probe_chooses_c_on_validation_data_only():
    x, y = small_margin(300, 0)
    xt, yt = small_margin(300, 1)
    r = linear_probe(x, y, xt, yt)
    # the held-out fifth of TRAIN prefers the weakest regularisation, and the test set agrees
    assert r["linear_probe_C"] == max(DEFAULT_CS) and r["linear_probe_top1"] >= 95.0
    assert linear_probe(x, y, xt, yt, cs=(min(DEFAULT_CS),))["linear_probe_top1"] < 80.0
    # the test split never takes part in the choice: shuffled test labels, other test features, same C
    shuffled = np.random.default_rng(2).permutation(yt)
    r2 = linear_probe(x, y, xt, shuffled)
    r3 = linear_probe(x, y, small_margin(50, 3)[0], shuffled[:50])
    chosen = (r["linear_probe_C"], r["linear_probe_val_top1"])
    assert (r2["linear_probe_C"], r2["linear_probe_val_top1"]) == chosen
    assert (r3["linear_probe_C"], r3["linear_probe_val_top1"]) == chosen
    assert r2["linear_probe_top1"] < 70.0  # ...while the score does read the test labels


def test_linear_probe_on_too_few_examples_uses_the_middle_c():
    x, y = small_margin(8, 0)
    r = linear_probe(x, y, x, y, cs=(0.1, 1.0, 10.0))
    assert r["linear_probe_C"] == 1.0 and "linear_probe_val_top1" not in r


# --------------------------------------------------------------------------- attentional probe


def one_marked_token(n: int, seed: int, tokens: int = 16, width: int = 16, classes: int = 4):
    """Every token shows some class (a one-hot code x3 plus noise); the label is the class of the one token
    that carries a marker (the last dimension). The mean of the tokens hardly says which class that was."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    shown = torch.randint(0, classes, (n, tokens), generator=g)
    marked = torch.randint(0, tokens, (n,), generator=g)
    rows = torch.arange(n)
    shown[rows, marked] = labels
    x = 3 * torch.eye(classes, width)[shown] + 0.3 * torch.randn(n, tokens, width, generator=g)
    x[rows, marked, -1] += 3.0
    return x, labels


def test_attentional_probe_finds_the_one_token_that_mean_pooling_loses():
    xtr, ytr = one_marked_token(300, 0)
    xte, yte = one_marked_token(300, 1)
    linear = linear_probe(xtr.mean(1), ytr, xte.mean(1), yte)["linear_probe_top1"]
    r = attentional_probe(xtr, ytr, xte, yte)
    assert set(r) == {"attentional_probe_top1", "attentional_probe_val_top1", "attentional_probe_epochs"}
    assert linear < 60.0  # chance is 25%: the pooled counts of shown classes give a little away
    assert r["attentional_probe_top1"] >= 95.0 and r["attentional_probe_val_top1"] >= 90.0


def test_attentional_probe_is_seeded_and_chooses_epochs_on_validation_only():
    xtr, ytr = one_marked_token(120, 0)
    xte, yte = one_marked_token(40, 1)
    short = dict(epochs=6, lr=1e-2)  # a few noisy epochs: the validation accuracy goes up and down
    state = torch.random.get_rng_state()
    r = attentional_probe(xtr, ytr, xte, yte, **short)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone
    assert attentional_probe(xtr, ytr, xte, yte, **short) == r
    shuffled = yte[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    r2 = attentional_probe(xtr, ytr, xte, shuffled, **short)
    assert (r2["attentional_probe_epochs"], r2["attentional_probe_val_top1"]) == \
           (r["attentional_probe_epochs"], r["attentional_probe_val_top1"])
    assert 1 <= r["attentional_probe_epochs"] <= 6
    assert [pooler_heads(w) for w in (64, 12, 7, 11)] == [8, 6, 7, 1]


# --------------------------------------------------------------------------- on micro checkpoints

PROBES = ("linear_probe:colour:train|colour:test", "attentional_probe:colour:train|colour:test")


@pytest.fixture
def small_scenes(monkeypatch):
    """scenes with 256 training images, and the single-object colour scenes split into train and test."""
    colour = load_scenes("colour")
    sets = {"scenes": scenes_set("train", n=256), "colour:train": colour.subset_images(range(240)),
            "colour:test": colour.subset_images(range(240, 360))}
    monkeypatch.setattr(sources, "open_source", lambda spec: sets[spec])
    eval_data.clear_cache()
    yield
    eval_data.clear_cache()


@pytest.mark.parametrize("recipe", ["clip", "cap"])
def test_both_probes_run_on_micro_checkpoints(tmp_path, small_scenes, recipe):
    from vlpt.inference import load
    from vlpt.train.loop import train

    overrides = ["model=micro", "train.batch_size=16", "train.steps=3", "train.warmup_steps=0", "eval.tasks=[]"]
    train(config.resolve(recipe, overrides), tmp_path, progress=False)
    model = load(tmp_path)
    assert model.image_tokens(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 16, 64)  # 4x4 patches
    linear, attentional = (run_task(task, model, progress=False) for task in PROBES)
    assert 1 / 8 * 100 < linear[f"{PROBES[0]}/linear_probe_top1"] <= 100  # chance: 1 in 8 colours
    assert linear[f"{PROBES[0]}/linear_probe_C"] in DEFAULT_CS
    assert 50.0 < attentional[f"{PROBES[1]}/attentional_probe_top1"] <= 100
    assert 1 <= attentional[f"{PROBES[1]}/attentional_probe_epochs"] <= 30


def test_probes_say_why_a_model_without_an_image_encoder_cannot_run_them():
    blind = build(config.resolve("cap", ["model=micro", "model.decoder.blind=true"]), Vocab(50)).model
    for task in PROBES:
        with pytest.raises(TaskError, match="needs an image encoder"):
            check_task(task, blind.abilities)
