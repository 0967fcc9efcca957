"""CLIP's softmax contrastive loss over the global batch (Radford et al. 2021)."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.objectives.base import Objective, fp32
from vlpt.train.distributed import all_gather_with_grad, rank


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, label_smoothing: float = 0.0):
    """Each local row of `a` scored against every rank's rows of `b` (its own example is the positive) and
    the other way round -> (loss a->b, loss b->a, logits a->b, labels): cross-entropies averaged over the
    local rows, whose mean over ranks is the global one."""
    all_a, all_b = all_gather_with_grad(a), all_gather_with_grad(b)
    labels = torch.arange(a.shape[0], device=a.device) + rank() * a.shape[0]
    logits_ab, logits_ba = scale * a @ all_b.T, scale * b @ all_a.T
    return (F.cross_entropy(logits_ab, labels, label_smoothing=label_smoothing),
            F.cross_entropy(logits_ba, labels, label_smoothing=label_smoothing), logits_ab, labels)


class Contrastive(Objective):
    """Mean of image->text and text->image cross-entropy on exp(t) * img @ txt^T, t learned, exp(t) <= max_scale.

    The clamp acts on the parameter after each optimiser step (as open_clip does): clamping inside the
    forward pass would zero t's gradient once it passed the bound, so it could never come back down.

    Across processes each rank scores its own rows against the gathered global columns ("local loss"):
    the same gradient as the full global matrix with less memory. `local_loss: false` builds the whole
    global matrix on every rank instead (same gradient again; kept to test that claim).

    `masked_image: true` scores the image embedding of only the patches a masking objective keeps (the
    `masked` view: one encoder pass shared with MAE, FLIP-style) instead of the full image's.
    """

    needs = frozenset({"image_embed", "text_embed"})
    padding_free = True

    @dataclasses.dataclass
    class Options:
        init_temperature: float = 0.07
        max_scale: float = 100.0
        local_loss: bool = True
        label_smoothing: float = 0.0
        masked_image: bool = False

    @classmethod
    def needs_for(cls, options) -> frozenset[str]:
        needs = frozenset(cls.needs)
        return needs - {"image_embed"} | {"image_embed@masked"} if options.masked_image else needs

    def __init__(self, options: dict | None = None, model=None, vocab=None):
        super().__init__(options, model, vocab)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / self.opts.init_temperature)))

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        self.log_scale.clamp_(max=math.log(self.opts.max_scale))

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        img = outputs["image_embed@masked" if self.opts.masked_image else "image_embed"]
        with fp32(img):
            return self._loss(img.float(), outputs["text_embed"].float())

    def _loss(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, dict]:
        scale, ls = self.scale(), self.opts.label_smoothing
        if self.opts.local_loss:
            i2t, t2i, logits_i2t, labels = info_nce(img, txt, scale, ls)
        else:
            all_img, all_txt = all_gather_with_grad(img), all_gather_with_grad(txt)
            labels = torch.arange(all_img.shape[0], device=img.device)
            logits_i2t = scale * all_img @ all_txt.T
            i2t = F.cross_entropy(logits_i2t, labels, label_smoothing=ls)
            t2i = F.cross_entropy(logits_i2t.T, labels, label_smoothing=ls)
        loss = (i2t + t2i) / 2
        with torch.no_grad():
            acc = (logits_i2t.argmax(1) == labels).float().mean()
        return loss, {"scale": scale.detach(), "i2t_acc": acc}
