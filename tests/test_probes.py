"""Frozen-feature probes: the linear probe (C chosen on validation data)."""
from __future__ import annotations

import numpy as np
import torch

from vlpt.eval.probes import DEFAULT_CS, linear_probe

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
