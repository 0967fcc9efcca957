"""ImageTextModel: the towers a recipe asks for, computed once per batch into a dict of outputs.

Which towers exist follows from what the recipe's objectives read (`needs`):
  image_embed  ViT (+ CoCa's contrastive pooler, or the generative pooler's first output) -> image_proj
  text_embed   the CLIP text tower -> text_proj; or, with unimodal decoder layers (CoCa), the decoder's [CLS]
  caption_logits  the caption decoder, cross-attending to the ViT tokens (or the generative pooler's)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.config import ModelConfig
from vlpt.models.decoder import CaptionDecoder
from vlpt.models.layers import AttentionPool
from vlpt.models.text import TextTransformer
from vlpt.models.vision import VisionTransformer

CONTRASTIVE = frozenset({"image_embed", "text_embed"})


class ImageTextModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, eot_id: int, needs: frozenset[str] = CONTRASTIVE,
                 pad_id: int = 0, mask_id: int = 3, sot_id: int = 1):
        super().__init__()
        self.cfg = cfg
        v, t, d, p = cfg.vision, cfg.text, cfg.decoder, cfg.poolers
        has_decoder = "caption_logits" in needs
        self.text_from_decoder = has_decoder and d.unimodal_depth > 0
        sees_image = "image_embed" in needs or (has_decoder and not d.blind)
        open_clip = p.style == "open_clip"
        pool_width = cfg.embed_dim if open_clip else v.width  # open_clip pools to embed_dim-wide tokens
        self.visual = VisionTransformer(v, raw_tokens=open_clip) if sees_image else None
        self.decoder = self.text = self.gen_pool = self.con_pool = self.ln_pool = None
        if has_decoder:
            self.decoder = CaptionDecoder(d, t, vocab_size, pool_width if p.generative_queries else v.width,
                                          {"pad": pad_id, "sot": sot_id, "eot": eot_id, "mask": mask_id})
        first_only = "image_embed" in needs and p.contrastive == "first"  # an encoder that reads the first output
        if p.generative_queries and (has_decoder and not d.blind or first_only):
            self.gen_pool = AttentionPool(v.width, p.heads or v.heads, p.generative_queries, pool_width)
            if open_clip:  # the ViT's final LayerNorm, moved after the pooler (open_clip's ln_post)
                self.ln_pool = nn.LayerNorm(pool_width)
        if "text_embed" in needs and not self.text_from_decoder:
            self.text = TextTransformer(t, vocab_size, eot_id)
        if "image_embed" in needs and p.contrastive in ("cascade", "parallel"):
            self.con_pool = AttentionPool(v.width, p.heads or v.heads, 1)
        self.image_proj = nn.Linear(pool_width, cfg.embed_dim, bias=False) if "image_embed" in needs else None
        self.text_proj = nn.Linear(t.width, cfg.embed_dim, bias=False) if "text_embed" in needs else None
        if self.image_proj is not None:
            nn.init.normal_(self.image_proj.weight, std=pool_width**-0.5)
        if self.text_proj is not None:
            nn.init.normal_(self.text_proj.weight, std=t.width**-0.5)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    @property
    def has_text_embed(self) -> bool:
        return self.text_proj is not None

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for tower in (self.visual and self.visual.transformer, self.text and self.text.transformer, self.decoder):
            if tower is not None:
                tower.grad_checkpointing = enabled

    # ------------------------------------------------------------------------------------ pieces
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, unprojected image features (what probes read)."""
        pooled, tokens = self.visual(images)
        return self._pool(tokens)[1] if self.cfg.poolers.contrastive == "first" else pooled

    def _pool(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (what the decoder cross-attends to, the contrastive feature if contrastive=first else None)."""
        if self.gen_pool is None:
            return tokens, None
        x = self.gen_pool(tokens)
        if self.ln_pool is not None:
            x = self.ln_pool(x)
        return (x[:, 1:], x[:, 0]) if self.cfg.poolers.contrastive == "first" else (x, None)

    def image_memory(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the decoder cross-attends to: the generative pooler's outputs, or every encoder token."""
        return self._pool(tokens)[0]

    def _image_embed(self, pooled, tokens, memory, first=None) -> torch.Tensor:
        mode = self.cfg.poolers.contrastive
        if mode == "first":
            pooled = first
        elif mode != "none":  # cascade reads the generative pooler's outputs, parallel the encoder tokens
            pooled = self.con_pool(memory if mode == "cascade" and self.gen_pool is not None else tokens)[:, 0]
        return F.normalize(self.image_proj(pooled), dim=-1)

    def _text_embed(self, text: torch.Tensor) -> torch.Tensor:
        feats = self.decoder.text_features(text) if self.text_from_decoder else self.text(text)[0]
        return F.normalize(self.text_proj(feats), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pooled, tokens = self.visual(images)
        memory, first = self._pool(tokens) if self.cfg.poolers.contrastive in ("cascade", "first") else (tokens, None)
        return self._image_embed(pooled, tokens, memory, first)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return self._text_embed(text)

    # ------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict, needs: set[str]) -> dict:
        """Computes only the outputs in `needs`, each once (CoCa: one pass gives embeddings and logits)."""
        out = {}
        memory = first = None
        if self.visual is not None and needs & {"image_embed", "image_tokens", "caption_logits"}:
            pooled, tokens = self.visual(batch["image"])
            out["image_tokens"] = tokens
            if self.decoder is not None or self.cfg.poolers.contrastive in ("cascade", "first"):
                memory, first = self._pool(tokens)
            if "image_embed" in needs:
                out["image_embed"] = self._image_embed(pooled, tokens, memory, first)
        if "caption_logits" in needs:
            logits, cls = self.decoder(batch["text"], None if self.decoder.blind else memory, batch.get("parallel"))
            out["caption_logits"] = logits
            out["caption_mask"] = batch["text"][:, 1:] != self.decoder.pad_id
            if cls is not None and "text_embed" in needs:
                out["text_embed"] = F.normalize(self.text_proj(cls), dim=-1)
        if "text_embed" in needs and "text_embed" not in out:
            out["text_embed"] = self._text_embed(batch["text"])
        return out
