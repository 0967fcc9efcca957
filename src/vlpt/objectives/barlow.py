"""Barlow Twins across modalities: BarLIP, a baseline of clip-rocket (Fini et al. 2023; Zbontar et al. 2021)."""
from __future__ import annotations

import dataclasses

import torch

from vlpt.models.outputs import output_width
from vlpt.objectives.base import Objective, fp32
from vlpt.objectives.heads import mlp, per_view
from vlpt.train.distributed import all_reduce_with_grad, world_size


class Barlow(Objective):
    """Per modality a projector Linear(w,3000)-BN-ReLU-Linear(3000,3000)-BN-ReLU-Linear(3000,8192)-BN, whose
    final batch norm is all the normalisation z gets. C = z_img^T z_txt / N over the global batch (summed
    over ranks with gradients); loss = sum_i (1 - C_ii)^2 + lambd * sum_{i!=j} C_ij^2.

    With `views` (the reference), the loss is averaged over the global (image, caption) pair and every
    (image view, text view) pair. BarLIP's 0.025 scale is the recipe's weight."""

    needs = frozenset({"image_pooled", "text_features"})
    padding_free = True

    @dataclasses.dataclass
    class Options:
        hidden: int = 3000
        dim: int = 8192
        lambd: float = 5e-3  # weight of the off-diagonal terms
        views: bool = True  # also every (image view, text view) pair (views.image_views, views.text_views)

    def __init__(self, options: dict | None = None, model=None, vocab=None):
        super().__init__(options, model, vocab)
        o = self.opts
        self.image_head = mlp([output_width(model, "image_pooled"), o.hidden, o.hidden, o.dim], last_norm="bn")
        self.text_head = mlp([output_width(model, "text_features"), o.hidden, o.hidden, o.dim], last_norm="bn")

    @classmethod
    def needs_for(cls, options) -> frozenset[str]:
        views = {"image_pooled@image_views", "text_features@text_views"} if options.views else set()
        return cls.needs | views

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        pairs = [(self.image_head(outputs["image_pooled"]), self.text_head(outputs["text_features"]))]
        if self.opts.views:
            img_views = per_view(self.image_head, outputs["image_pooled@image_views"]).unbind(0)
            txt_views = per_view(self.text_head, outputs["text_features@text_views"]).unbind(0)
            pairs += [(i, t) for i in img_views for t in txt_views]
        with fp32(pairs[0][0]):
            losses = [barlow_twins(i.float(), t.float(), self.opts.lambd) for i, t in pairs]
        loss = torch.stack([x[0] for x in losses]).mean()
        return loss, {"on_diag": losses[0][1], "off_diag": losses[0][2]}


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, on-diagonal term, off-diagonal sum of squares) of the cross-correlation of z1, z2 [B,D] over
    the global batch."""
    n = z1.shape[0] * world_size()
    c = all_reduce_with_grad(z1.T @ z2) / n
    diag = torch.diagonal(c)
    on = (1 - diag).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return on + lambd * off, on.detach(), off.detach()
