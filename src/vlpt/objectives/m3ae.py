"""M3AE (Geng et al. 2022): one transformer over [CLS; image patches; text tokens] (the model's
`joint_tokens`), most of both modalities masked; a light decoder of the objective's own reconstructs the
pixels of the masked patches (MSE) and the masked text tokens (cross-entropy).

Loss = image + text_weight * text. Image: as MAE's, on the pixels as the ViT sees them (`norm_pix` false,
as M3AE's code; true = MAE's per-patch normalisation). Text: cross-entropy over the masked real tokens
(padding excluded; <sot> and <eot> are tokens), averaged per example, then over the batch. Text positions
are masked as M3AE's code does: uniformly over all L positions, padding included, so a caption's real
tokens are masked with probability `text_mask_ratio` on average; padding that stays is never attended to.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from vlpt.models.outputs import output_width
from vlpt.objectives.base import Objective, fp32
from vlpt.objectives.masked import (DecoderOptions, MaskedDecoder, check_options, dropped, pixel_loss, random_keep,
                                    sincos, sincos_grid)


class M3AE(Objective):
    needs = frozenset({"joint_tokens@masked"})
    sets = frozenset({"image_keep", "text_keep"})

    @dataclasses.dataclass
    class Options(DecoderOptions):
        image_mask_ratio: float = 0.75
        text_mask_ratio: float = 0.75
        text_weight: float = 0.1  # M3AE's default (its CC12M run: 0.5)
        norm_pix: bool = False

    @classmethod
    def parse_options(cls, options: dict, prefix: str = "options"):
        opts = super().parse_options(options, prefix)
        check_options(opts, prefix, ("image_mask_ratio", "text_mask_ratio"))
        return opts

    def __init__(self, options: dict | None = None, model=None, vocab=None):
        super().__init__(options, model, vocab)
        o, v = self.opts, model.vision
        self.patch, grid = v.patch_size, v.image_size // v.patch_size
        self.patches, self.pad_id = grid * grid, vocab.pad
        positions = [sincos_grid(grid, o.decoder_width),
                     sincos(torch.arange(model.text.context_length), o.decoder_width)]
        self.decoder = MaskedDecoder(output_width(model, "joint_tokens"), o.decoder_width, o.decoder_depth,
                                     o.decoder_heads, positions, [3 * v.patch_size**2, vocab.size])

    def prepare(self, batch: dict) -> None:
        image, text = batch["image"], batch["text"]
        if "image_keep" not in batch:
            batch["image_keep"] = random_keep(image.shape[0], self.patches, self.opts.image_mask_ratio, image.device)
        if "text_keep" not in batch:
            batch["text_keep"] = random_keep(text.shape[0], text.shape[1], self.opts.text_mask_ratio, text.device)

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        image_keep, text_keep, text = batch["image_keep"], batch["text_keep"], batch["text"]
        tokens = outputs["joint_tokens@masked"]
        real = text != self.pad_id
        attend = torch.cat([real.new_ones(real.shape[0], self.patches), real], dim=1)
        n = image_keep.shape[1]
        pixels, logits = self.decoder([(tokens[:, :n], image_keep), (tokens[:, n:], text_keep)], attend)
        image_loss = pixel_loss(pixels, batch["image"], image_keep, self.patch, self.opts.norm_pix)
        with fp32(logits):
            nll = F.cross_entropy(logits.float().transpose(1, 2), text, reduction="none")
        scored = (dropped(text_keep, text.shape[1]) & real).float()
        text_loss = ((nll * scored).sum(1) / scored.sum(1).clamp(min=1)).mean()
        with torch.no_grad():
            acc = ((logits.argmax(-1) == text).float() * scored).sum() / scored.sum().clamp(min=1)
        metrics = {"image_loss": image_loss.detach(), "text_loss": text_loss.detach(), "text_acc": acc}
        return image_loss + self.opts.text_weight * text_loss, metrics
