"""MAE (He et al. 2022): mask most image patches, encode only the visible ones, and regress the pixels of
the masked ones through a light decoder of the objective's own. With `contrastive` beside it, the recipe
is MAE-CLIP (Weers et al. 2023).

Loss: mean over the masked patches of the mean squared error over a patch's pixels, on per-patch
normalised pixels by default (`norm_pix`, MAE's norm_pix_loss). The first masking objective of a recipe
chooses batch["image_keep"]; every objective reading the `masked` view sees the same patches.
"""
from __future__ import annotations

import dataclasses

import torch

from vlpt.models.outputs import output_width
from vlpt.objectives.base import Objective
from vlpt.objectives.masked import DecoderOptions, MaskedDecoder, check_options, pixel_loss, random_keep, sincos_grid


class MAE(Objective):
    needs = frozenset({"image_tokens@masked"})
    padding_free = True
    sets = frozenset({"image_keep"})

    @dataclasses.dataclass
    class Options(DecoderOptions):
        mask_ratio: float = 0.75
        norm_pix: bool = True

    @classmethod
    def parse_options(cls, options: dict, prefix: str = "options"):
        opts = super().parse_options(options, prefix)
        check_options(opts, prefix, ("mask_ratio",))
        return opts

    def __init__(self, options: dict | None = None, model=None, vocab=None):
        super().__init__(options, model, vocab)
        o, v = self.opts, model.vision
        self.patch, self.patches = v.patch_size, (v.image_size // v.patch_size) ** 2
        self.decoder = MaskedDecoder(output_width(model, "image_tokens"), o.decoder_width, o.decoder_depth,
                                     o.decoder_heads, [sincos_grid(v.image_size // v.patch_size, o.decoder_width)],
                                     [3 * v.patch_size**2])

    def prepare(self, batch: dict) -> None:
        if "image_keep" not in batch:
            image = batch["image"]
            batch["image_keep"] = random_keep(image.shape[0], self.patches, self.opts.mask_ratio, image.device)

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        keep = batch["image_keep"]
        (pred,) = self.decoder([(outputs["image_tokens@masked"], keep)])
        return pixel_loss(pred, batch["image"], keep, self.patch, self.opts.norm_pix), {}

