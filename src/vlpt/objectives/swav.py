"""SwAV across modalities: SwALIP, a baseline of clip-rocket (Fini et al. 2023; Caron et al. 2020).

As in the reference code, the "prototypes" of an image are the global batch's captions (and the other way
round): similarities of the image views' and text views' projections (MLP heads with a learned
temperature, like CL2L's local heads) become soft assignments by Sinkhorn-Knopp, and each (image view, text
view) pair predicts the assignments of the pair made of the other views.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlpt.models.outputs import output_width
from vlpt.objectives.base import Objective, fp32
from vlpt.objectives.heads import gather_views, mlp, per_view
from vlpt.train.distributed import is_distributed, world_size
from vlpt.typed import ConfigError


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """scores [B,K]: this rank's B samples against K prototypes -> soft assignments [B,K] over the global
    batch (G = B x ranks samples): Q = exp(scores / epsilon), scaled to sum 1, then `iterations` times each
    prototype's total (over every rank's samples) set to 1/K and each sample's to 1/G; finally each row
    rescaled to sum 1. Each row (a sample's assignment) sums to 1 exactly; the iterations bring each column
    (a prototype's total over the global batch) towards G/K: equal use of the prototypes."""
    shift = scores.max().float()  # against overflow; one shift for every rank, so it cancels when normalising
    if is_distributed():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp((scores.float() - shift) / epsilon)
    g, k = q.shape[0] * world_size(), q.shape[1]
    q /= _sum_over_ranks(q.sum())
    for _ in range(iterations):
        q /= _sum_over_ranks(q.sum(0, keepdim=True)) * k
        q /= q.sum(1, keepdim=True) * g
    return q * g


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x)
    return x


class SwAV(Objective):
    """Per modality a head Linear(w,4096)-BN-ReLU-Linear(4096,4096)-BN-ReLU-Linear(4096,256) -> unit norm,
    and a learned temperature (init 0.1). For image view i and text view j, s_ij = img_i @ txt_j^T over the
    gathered captions (and t_ji = txt_j @ img_i^T); targets q = sinkhorn(s) without gradient. Loss = mean
    over pairs (i, j) and swapped pairs (i' != i, j' != j) of (CE(scale * s_ij, q(s_i'j')) +
    CE(scale * t_ji, q(t_j'i'))) / 2: with 2 views each, the reference's 4 swapped predictions. SwALIP
    weighs it 0.2 (the recipe's weight)."""

    needs = frozenset({"image_pooled@image_views", "text_features@text_views"})
    padding_free = True

    @dataclasses.dataclass
    class Options:
        hidden: int = 4096
        dim: int = 256
        init_temperature: float = 0.1
        max_scale: float = 100.0
        epsilon: float = 0.05  # Sinkhorn's entropy regularisation
        iterations: int = 3  # Sinkhorn-Knopp iterations

    def __init__(self, options: dict | None = None, model=None, vocab=None):
        super().__init__(options, model, vocab)
        o = self.opts
        self.image_head = mlp([output_width(model, "image_pooled"), o.hidden, o.hidden, o.dim])
        self.text_head = mlp([output_width(model, "text_features"), o.hidden, o.hidden, o.dim])
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / o.init_temperature)))

    @classmethod
    def check(cls, options, cfg) -> None:
        counts = (cfg.views.image_views.count, cfg.views.text_views.count)
        if min(counts) < 2:
            raise ConfigError(f"swapped prediction needs at least 2 image views and 2 text views, the recipe makes "
                              f"{counts[0]} and {counts[1]}; set views.image_views.count=2 and "
                              f"views.text_views.count=2")

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        self.log_scale.clamp_(max=math.log(self.opts.max_scale))

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        img = per_view(self.image_head, outputs["image_pooled@image_views"])
        txt = per_view(self.text_head, outputs["text_features@text_views"])
        with fp32(img):
            img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
            all_img, all_txt = gather_views(img), gather_views(txt)
            vi, vt = img.shape[0], txt.shape[0]
            s = [[img[i] @ all_txt[j].T for j in range(vt)] for i in range(vi)]  # images against captions
            t = [[txt[j] @ all_img[i].T for i in range(vi)] for j in range(vt)]  # captions against images
            q_s = [[sinkhorn(x.detach(), self.opts.epsilon, self.opts.iterations) for x in row] for row in s]
            q_t = [[sinkhorn(x.detach(), self.opts.epsilon, self.opts.iterations) for x in row] for row in t]
            scale = self.log_scale.exp()
            swaps = [(i, j, i2, j2) for i in range(vi) for j in range(vt) for i2 in range(vi) for j2 in range(vt)
                     if i2 != i and j2 != j]
            terms = [(soft_cross_entropy(scale * s[i][j], q_s[i2][j2])
                      + soft_cross_entropy(scale * t[j][i], q_t[j2][i2])) / 2 for i, j, i2, j2 in swaps]
        return torch.stack(terms).mean(), {"scale": scale.detach()}


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_k targets_k log softmax(logits)_k."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
