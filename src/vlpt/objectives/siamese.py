"""SimSiam across modalities: SiamLIP, a baseline of clip-rocket (Fini et al. 2023; Chen & He 2021)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from vlpt.models.outputs import output_width
from vlpt.objectives.base import Objective, fp32
from vlpt.objectives.heads import mlp, per_view


class Siamese(Objective):
    """Per modality a projector Linear(w,2048,no bias)-BN-ReLU-Linear(2048,128,no bias)-BN(no affine) -> z,
    and a predictor per direction Linear(128,2048,no bias)-BN-ReLU-Linear(2048,128) -> p. The image's p
    predicts the caption's z and the other way round: D(p, z) = 2 - 2 cos(p, sg(z)), averaged over both
    directions of the global (image, caption) pair and, with `views` (the reference), of every (image view,
    text view) pair."""

    needs = frozenset({"image_pooled", "text_features"})
    padding_free = True

    @dataclasses.dataclass
    class Options:
        hidden: int = 2048
        dim: int = 128
        views: bool = True  # also every (image view, text view) pair (views.image_views, views.text_views)

    def __init__(self, options: dict | None = None, model=None, vocab=None):
        super().__init__(options, model, vocab)
        h, d = self.opts.hidden, self.opts.dim
        projector = dict(bias=False, last_bias=False, last_norm="bn-plain")
        self.image_head = mlp([output_width(model, "image_pooled"), h, d], **projector)
        self.text_head = mlp([output_width(model, "text_features"), h, d], **projector)
        self.image_to_text = mlp([d, h, d], bias=False)
        self.text_to_image = mlp([d, h, d], bias=False)

    @classmethod
    def needs_for(cls, options) -> frozenset[str]:
        views = {"image_pooled@image_views", "text_features@text_views"} if options.views else set()
        return cls.needs | views

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        img, txt = projections(self.image_head, self.text_head, outputs, self.opts.views)
        return self.pair_loss(img, txt, img, txt)

    def pair_loss(self, img: list, txt: list, t_img: list, t_txt: list) -> tuple[torch.Tensor, dict]:
        """The image's prediction against the caption's target projection and the other way round, over the
        global pair (index 0) and every (image view, text view) pair. SimSiam's targets are the projections
        themselves; BYOL's come from a target network."""
        p_img, p_txt = [self.image_to_text(z) for z in img], [self.text_to_image(z) for z in txt]
        pairs = [(0, 0)] + [(i, j) for i in range(1, len(img)) for j in range(1, len(txt))]
        with fp32(img[0]):
            terms = [d for i, j in pairs for d in (negative_cosine(p_img[i].float(), t_txt[j].float()),
                                                   negative_cosine(p_txt[j].float(), t_img[i].float()))]
        return torch.stack(terms).mean(), {"global": ((terms[0] + terms[1]) / 2).detach()}


def projections(image_head, text_head, outputs: dict, views: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """([global image, image view 1, ...], [global caption, text view 1, ...]) through the projectors, each
    [B, dim]; each view goes through a head on its own, so each batch norm sees one view's batch."""
    img = [image_head(outputs["image_pooled"])]
    txt = [text_head(outputs["text_features"])]
    if views:
        img += per_view(image_head, outputs["image_pooled@image_views"]).unbind(0)
        txt += per_view(text_head, outputs["text_features@text_views"]).unbind(0)
    return img, txt

def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 * mean cos(p, z), z a target (no gradient)."""
    return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1).mean()
