"""ViT image tower: patches -> transformer -> final LN -> tokens and a pooled feature (cls|gap|max|map)."""
from __future__ import annotations

import torch
from torch import nn

from vlpt.config import VisionConfig
from vlpt.models.layers import AttentionPool, Transformer

# CLIP's pixel statistics; batches carry uint8 (or float 0-255) images and the tower normalises them.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def conv_stem(patch_size: int, width: int) -> nn.Sequential:
    """log2(patch) stride-2 3x3 convolutions then a 1x1 to the width: the same token grid as patchifying,
    with a locality prior that makes small-data ViTs learn shapes far sooner (Xiao et al. 2021)."""
    layers, c = [], 3
    for i in range(patch_size.bit_length() - 1):
        out = max(16, width // 2 ** (patch_size.bit_length() - 2 - i))
        layers += [nn.Conv2d(c, out, 3, 2, 1), nn.GELU()]
        c = out
    return nn.Sequential(*layers, nn.Conv2d(c, width, 1))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, raw_tokens: bool = False):
        """raw_tokens: no final LN, and the tokens include the [CLS] (open_clip's CoCa pools these)."""
        super().__init__()
        self.cfg, self.raw_tokens = cfg, raw_tokens
        w = cfg.width
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255, persistent=False)
        self.patch_embed = conv_stem(cfg.patch_size, w) if cfg.stem == "conv" else nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size, bias=False)
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, w) * w**-0.5) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, n + (cfg.pool == "cls"), w) * 0.02)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.ln_post = nn.Identity() if raw_tokens else nn.LayerNorm(w)
        self.map_pool = AttentionPool(w, cfg.heads) if cfg.pool == "map" else None

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,3,H,W] (uint8 or float in 0-255) -> (pooled [B,W], patch tokens [B,N,W]).

        keep [B,K]: indices of the patches to encode (MAE-style masking); the others never enter the
        transformer, so the tokens are [B,K,W] (a [CLS], if any, is always kept).
        """
        x = self.encode(self.embed(images, keep))
        return self.pool(x), (x if self.raw_tokens or self.cls_token is None else x[:, 1:])

    def embed(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer's input: [CLS] (if any) and the kept patches, with their positions [B,(1+)K,W]."""
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        if keep is not None and self.cfg.stem == "conv":
            x = x * self._seen(keep, x.shape[-1])
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        if keep is not None:
            first = int(self.cls_token is not None)
            kept = x[:, first:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :first], kept], dim=1)
        return x

    def _seen(self, keep: torch.Tensor, size: int) -> torch.Tensor:
        """[B,1,H,W]: 1 on the pixels of kept patches, 0 elsewhere. The conv stem's 3x3 windows reach across
        patch borders, so a kept patch's token would see its masked neighbours' pixels; zeroed (the mean
        colour after normalisation), they tell it nothing."""
        p, g = self.cfg.patch_size, size // self.cfg.patch_size
        seen = torch.zeros(keep.shape[0], g * g, device=keep.device).scatter_(1, keep, 1.0)
        return seen.view(-1, 1, g, g).repeat_interleave(p, 2).repeat_interleave(p, 3)

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer and the final LN over input tokens x [B,S,W]; `mask` [B,1,1,S] (True: a key that
        may be attended) keeps padding out of a joint image+text sequence."""
        return self.ln_post(self.transformer(self.ln_pre(x), mask))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature of the encoder's tokens x [B,(1+)N,W] by model.vision.pool."""
        pool = self.cfg.pool
        if self.raw_tokens or pool == "cls":
            return x[:, 0]
        if pool == "gap":
            return x.mean(1)
        if pool == "max":
            return x.amax(1)
        return self.map_pool(x)[:, 0]
