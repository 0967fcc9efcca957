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
import torch.nn.functional as F
from torch import nn

from vlpt.models.outputs import output_width
from vlpt.objectives.base import Objective, fp32
from vlpt.objectives.heads import mlp
from vlpt.train.ema import SCHEDULES, EMA
from vlpt.typed import ConfigError


class Towers(nn.Module):
    """What the target copies: the model and the two projectors."""

    def __init__(self, model: nn.Module, image_head: nn.Module, text_head: nn.Module):
        super().__init__()
        self.model, self.image_head, self.text_head = model, image_head, text_head


def projections(towers: Towers, outputs: dict, views: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The projectors of `towers` on the outputs: ([global image, image view 1, ...], [global caption, text
    view 1, ...]), each [B, dim]. Each view goes through a head on its own, so each batch norm sees one
    view's batch, as in the reference."""
    img = [towers.image_head(outputs["image_pooled"])]
    txt = [towers.text_head(outputs["text_features"])]
    if views:
        img += [towers.image_head(v) for v in outputs["image_pooled@image_views"].unbind(0)]
        txt += [towers.text_head(v) for v in outputs["text_features@text_views"].unbind(0)]
    return img, txt


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 * mean cos(p, z); z is a target (no gradient)."""
    return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1).mean()


class Byol(Objective):
    """Per modality a projector Linear(w,2048,no bias)-BN-ReLU-Linear(2048,128,no bias)-BN(no affine), a
    predictor per direction Linear(128,2048,no bias)-BN-ReLU-Linear(2048,128) on the online side, and an
    EMA target network (module docstring)."""

    needs = frozenset({"image_pooled", "text_features"})

    @dataclasses.dataclass
    class Options:
        hidden: int = 2048
        dim: int = 128
        views: bool = True  # also every (image view, text view) pair (views.image_views, views.text_views)
        momentum: float = 0.99  # m of the target's average
        momentum_schedule: str = "constant"  # constant (clip-rocket) | cosine (BYOL: m rises to 1) | warmup

    def __init__(self, options: dict | None = None, model=None, vocab=None):
        super().__init__(options, model, vocab)
        h, d = self.opts.hidden, self.opts.dim
        projector = {"bias": False, "last_bias": False, "last_norm": "bn-plain"}  # SiamLIP's heads
        self.image_head = mlp([output_width(model, "image_pooled"), h, d], **projector)
        self.text_head = mlp([output_width(model, "text_features"), h, d], **projector)
        self.image_to_text = mlp([d, h, d], bias=False)
        self.text_to_image = mlp([d, h, d], bias=False)
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

    @classmethod
    def needs_for(cls, options) -> frozenset[str]:
        views = {"image_pooled@image_views", "text_features@text_views"} if options.views else set()
        return cls.needs | views

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
        img, txt = projections(self.target.online, outputs, self.opts.views)  # the online heads: this module's
        with torch.no_grad():
            target = self.target.module
            t_img, t_txt = projections(target, target.model(batch, self.needs), self.opts.views)
        p_img, p_txt = [self.image_to_text(z) for z in img], [self.text_to_image(z) for z in txt]
        pairs = [(0, 0)] + [(i, j) for i in range(1, len(img)) for j in range(1, len(txt))]
        with fp32(img[0]):
            terms = [d for i, j in pairs for d in (negative_cosine(p_img[i].float(), t_txt[j].float()),
                                                   negative_cosine(p_txt[j].float(), t_img[i].float()))]
        return torch.stack(terms).mean(), {"global": ((terms[0] + terms[1]) / 2).detach()}
