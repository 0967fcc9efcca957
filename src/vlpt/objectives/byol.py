"""BYOL across modalities: BYOLIP, a baseline of clip-rocket (Fini et al. 2023; Grill et al. 2020).

SiamLIP with a target network. As in clip-rocket's `--momentum` runs (main.py, losses.SiamLIPLoss):
- the target is a copy of the whole network, encoders and projectors, started from the online weights and
  moved after every optimiser step by target = m * target + (1 - m) * online, m = 0.99 constant (BYOL's
  cosine schedule up to 1 is `momentum_schedule: cosine`);
- it runs on the same views as the online network, in training mode (batch statistics in its batch norms),
  without gradients, and gives the targets: its projections of the other modality;
- only the online side has predictors: D(p, z) = 2 - 2 cos(p, z), the image's prediction against the
  target's caption projection and the other way round, averaged over both directions of the global
  (image, caption) pair and, with `views`, of every (image view, text view) pair.
Of the target, this keeps the model (its towers; the projections into the shared space come along, unused)
and the two projectors; the reference also averages the predictors and the CLIP heads, which it never uses.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vlpt.objectives.siamese import Siamese, projections
from vlpt.train.ema import SCHEDULES, EMA
from vlpt.typed import ConfigError


class Towers(nn.Module):
    """What the target copies: the model and the two projectors."""

    def __init__(self, model: nn.Module, image_head: nn.Module, text_head: nn.Module):
        super().__init__()
        self.model, self.image_head, self.text_head = model, image_head, text_head


class Byol(Siamese):
    """SiamLIP's projectors and predictors (objectives/siamese.py), its targets from an EMA target network
    (module docstring)."""

    ema_target = True

    @dataclasses.dataclass
    class Options(Siamese.Options):
        momentum: float = 0.99  # m of the target's average
        momentum_schedule: str = "constant"  # constant (clip-rocket) | cosine (BYOL: m rises to 1) | warmup

    def __init__(self, options: dict | None = None, model=None, vocab=None):
        super().__init__(options, model, vocab)
        self.target: EMA | None = None  # attach() builds it from the model

    @classmethod
    def parse_options(cls, options: dict, prefix: str = "options"):
        opts = super().parse_options(options, prefix)
        if not 0 <= opts.momentum <= 1:
            raise ConfigError(f"{prefix}.momentum={opts.momentum} must be in [0, 1] (clip-rocket: 0.99)")
        if opts.momentum_schedule not in SCHEDULES:
            raise ConfigError(f"{prefix}.momentum_schedule={opts.momentum_schedule!r}: choose {', '.join(SCHEDULES)}")
        if opts.hidden < 1 or opts.dim < 1:
            raise ConfigError(f"{prefix}.hidden={opts.hidden} and {prefix}.dim={opts.dim} must be at least 1")
        return opts

    def attach(self, model: nn.Module) -> None:
        self.target = EMA(Towers(model, self.image_head, self.text_head), self.opts.momentum,
                          self.opts.momentum_schedule)

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        self.target.update(step, total)

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.target is None:
            raise RuntimeError("the byol objective has no target network: call attach(model) first (the "
                               "Pretrainer does)")
        img, txt = projections(self.image_head, self.text_head, outputs, self.opts.views)
        with torch.no_grad():
            target = self.target.module
            t_img, t_txt = projections(target.image_head, target.text_head, target.model(batch, self.needs),
                                       self.opts.views)
        return self.pair_loss(img, txt, t_img, t_txt)
