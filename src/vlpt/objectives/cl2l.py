"""CL2L, the loss of the improved recipe of clip-rocket (Fini et al. 2023, "Improved baselines for
vision-language pre-training"): CLIP's InfoNCE on the global views plus an InfoNCE for every (image view,
text view) pair through separate projections."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.models.outputs import output_width
from vlpt.objectives.base import Objective, fp32
from vlpt.objectives.contrastive import info_nce
from vlpt.objectives.heads import mlp, per_view
from vlpt.typed import ConfigError


class CL2L(Objective):
    """Global: InfoNCE on the model's embeddings (image_embed, text_embed) with a learned temperature (init
    0.07, exp(t) <= 100), no label smoothing. Local: the pooled features of each image view and each text
    view through their own heads Linear(w,4096)-BN-ReLU-Linear(4096,4096)-BN-ReLU-Linear(4096,256) -> unit
    norm, an InfoNCE for every (image view i, text view j) pair with its own learned temperature (init 0.1)
    and label smoothing 0.1. Per direction (image->text, text->image):
    (global + n * mean over pairs of local) / (1 + n), n the number of views per modality (the reference's
    num_augs: 2 views each are 4 pairs and n = 2); the loss is the mean of the two directions (the
    reference's `loss_avg_or_sum: sum` is weight 2). All gathers carry gradients."""

    needs = frozenset({"image_embed", "text_embed", "image_pooled@image_views", "text_features@text_views"})
    padding_free = True

    @dataclasses.dataclass
    class Options:
        init_temperature: float = 0.07  # global
        label_smoothing: float = 0.0  # global
        local_init_temperature: float = 0.1
        local_label_smoothing: float = 0.1
        max_scale: float = 100.0  # both temperatures: exp(t) <= max_scale
        hidden: int = 4096
        dim: int = 256

    def __init__(self, options: dict | None = None, model=None, vocab=None):
        super().__init__(options, model, vocab)
        o = self.opts
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / o.init_temperature)))
        self.local_log_scale = nn.Parameter(torch.tensor(math.log(1 / o.local_init_temperature)))
        self.image_head = mlp([output_width(model, "image_pooled"), o.hidden, o.hidden, o.dim])
        self.text_head = mlp([output_width(model, "text_features"), o.hidden, o.hidden, o.dim])

    @classmethod
    def check(cls, options, cfg) -> None:
        counts = (cfg.views.image_views.count, cfg.views.text_views.count)
        if counts[0] != counts[1]:
            raise ConfigError(f"the local pairs need as many image views as text views, the recipe makes "
                              f"{counts[0]} and {counts[1]}; set views.image_views.count and views.text_views.count "
                              f"to the same number (clip-rocket: 2)")

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        for t in (self.log_scale, self.local_log_scale):
            t.clamp_(max=math.log(self.opts.max_scale))

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        img = per_view(self.image_head, outputs["image_pooled@image_views"])
        txt = per_view(self.text_head, outputs["text_features@text_views"])
        o = self.opts
        with fp32(img):
            scale, local_scale = self.log_scale.exp(), self.local_log_scale.exp()
            g_i2t, g_t2i, logits, labels = info_nce(outputs["image_embed"].float(), outputs["text_embed"].float(),
                                                    scale, o.label_smoothing)
            img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
            pairs = [info_nce(i, t, local_scale, o.local_label_smoothing)[:2] for i in img for t in txt]
            l_i2t = torch.stack([p[0] for p in pairs]).mean()
            l_t2i = torch.stack([p[1] for p in pairs]).mean()
            n = img.shape[0]
            loss = ((g_i2t + n * l_i2t) / (1 + n) + (g_t2i + n * l_t2i) / (1 + n)) / 2
        with torch.no_grad():
            acc = (logits.argmax(1) == labels).float().mean()
        return loss, {"global": ((g_i2t + g_t2i) / 2).detach(), "local": ((l_i2t + l_t2i) / 2).detach(),
                      "scale": scale.detach(), "local_scale": local_scale.detach(), "i2t_acc": acc}
