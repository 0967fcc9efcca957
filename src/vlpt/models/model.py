"""ImageTextModel: the towers a recipe asks for, computed once per batch into a dict of outputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.config import ModelConfig
from vlpt.models.text import TextTransformer
from vlpt.models.vision import VisionTransformer


class ImageTextModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, eot_id: int):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.text = TextTransformer(cfg.text, vocab_size, eot_id)
        self.image_proj = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=cfg.vision.width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=cfg.text.width**-0.5)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enabled
        self.text.transformer.grad_checkpointing = enabled

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, unprojected image features (what probes read)."""
        return self.visual(images)[0]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.visual(images)[0]), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(text)[0]), dim=-1)

    def forward(self, batch: dict, needs: set[str]) -> dict:
        """Computes only the outputs in `needs` (e.g. {"image_embed", "text_embed"})."""
        out = {}
        if needs & {"image_embed", "image_tokens"}:
            pooled, tokens = self.visual(batch["image"])
            out["image_tokens"] = tokens
            out["image_embed"] = F.normalize(self.image_proj(pooled), dim=-1)
        if needs & {"text_embed", "text_tokens"}:
            pooled, tokens = self.text(batch["text"])
            out["text_tokens"] = tokens
            out["text_embed"] = F.normalize(self.text_proj(pooled), dim=-1)
        return out
