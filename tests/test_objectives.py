"""The contrastive losses against hand computations (plain Python floats, no torch ops)."""
import math

import pytest
import torch
import torch.nn.functional as F

from vlpt.config import ConfigError
from vlpt.objectives import OBJECTIVES


def _embeds(b=3, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=-1), F.normalize(torch.randn(b, d, generator=g), dim=-1)


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def test_clip_loss_equals_hand_computation():
    img, txt = _embeds()
    obj = OBJECTIVES["contrastive"]({"init_temperature": 0.5})
    loss, _ = obj({"image_embed": img, "text_embed": txt}, {})
    scale = 1 / 0.5
    I, T = img.tolist(), txt.tolist()
    n = len(I)
    sim = [[scale * _dot(I[i], T[j]) for j in range(n)] for i in range(n)]
    row = [-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n)]
    col = [-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n)]
    expected = (sum(row) / n + sum(col) / n) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_clip_temperature_init_and_clamp():
    obj = OBJECTIVES["contrastive"]()
    assert obj.log_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        obj.log_scale.fill_(10.0)
    obj.after_step(1, 10)  # the clamp acts on the parameter after the optimiser step
    assert obj.scale().item() == pytest.approx(100.0)


def test_sigmoid_loss_equals_hand_computation():
    img, txt = _embeds(b=3, d=5, seed=1)
    obj = OBJECTIVES["sigmoid"]()
    assert obj.log_scale.exp().item() == pytest.approx(10.0) and obj.bias.item() == pytest.approx(-10.0)
    loss, _ = obj({"image_embed": img, "text_embed": txt}, {})
    I, T = img.tolist(), txt.tolist()
    n = len(I)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = 10.0 * _dot(I[i], T[j]) - 10.0
            total += -math.log(1 / (1 + math.exp(-z * logit)))
    assert loss.item() == pytest.approx(total / n, rel=1e-6)


def test_perfect_alignment_gives_low_clip_loss():
    img, _ = _embeds(b=8, d=16)
    obj = OBJECTIVES["contrastive"]()
    aligned, _ = obj({"image_embed": img, "text_embed": img}, {})
    shuffled, _ = obj({"image_embed": img, "text_embed": img.roll(1, 0)}, {})
    assert aligned.item() < shuffled.item()


def test_unknown_objective_option_names_nearest():
    with pytest.raises(ConfigError, match="local_loss"):
        OBJECTIVES["contrastive"]({"local_los": True})


def test_losses_are_computed_in_fp32_under_autocast():
    img, txt = _embeds(b=16, d=32, seed=2)
    for name in ("contrastive", "sigmoid"):
        obj = OBJECTIVES[name]()
        ref, _ = obj({"image_embed": img, "text_embed": txt}, {})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = obj({"image_embed": img.bfloat16(), "text_embed": txt.bfloat16()}, {})
        assert low.dtype == torch.float32
        # only the bf16 rounding of the inputs remains (a bf16 matmul would be off by far more)
        assert low.item() == pytest.approx(ref.item(), rel=2e-3)
