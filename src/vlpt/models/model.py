"""ImageTextModel: the towers a recipe needs, and the outputs its objectives read, each computed once.

The outputs and views objectives may name are in vlpt.models.outputs; which towers exist follows from
them (`towers_of`). The model never names a method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.config import ModelConfig
from vlpt.data.tokenizer import Vocab
from vlpt.models.decoder import CaptionDecoder
from vlpt.models.joint import TextInputs
from vlpt.models.layers import AttentionPool
from vlpt.models.outputs import (CAPTION_OUTPUTS, CONTRASTIVE, IMAGE_OUTPUTS, TEXT_OUTPUTS, TOWER_MODULES,
                                 abilities_of, by_view, split_need, text_from_decoder, towers_of)
from vlpt.models.text import text_tower
from vlpt.models.vision import VisionTransformer

class ImageTextModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: Vocab, needs: frozenset[str] = CONTRASTIVE,
                 text_view_dropout: float = 0.0):
        """`text_view_dropout`: views.text_views.dropout, the text tower's dropout when it encodes text_views."""
        super().__init__()
        self.cfg, self.text_view_dropout = cfg, text_view_dropout
        v, t, d, p = cfg.vision, cfg.text, cfg.decoder, cfg.poolers
        names = {split_need(n)[0] for n in needs}
        towers = towers_of(cfg, needs)
        self.abilities = abilities_of(cfg, needs)
        self.text_from_decoder = text_from_decoder(cfg, names)
        open_clip = p.style == "open_clip"
        pool_width = cfg.embed_dim if open_clip else v.width  # open_clip pools to embed_dim-wide tokens
        self.visual = VisionTransformer(v, raw_tokens=open_clip) if "vision" in towers else None
        self.decoder = self.text = self.gen_pool = self.con_pool = self.ln_pool = None
        if "decoder" in towers:
            self.decoder = CaptionDecoder(d, t, vocab, pool_width if p.generative_queries else v.width)
        sees = "decoder" in towers and not d.blind
        first_only = "image_embed" in names and p.contrastive == "first"  # an encoder that reads the first output
        if p.generative_queries and (sees or first_only):
            self.gen_pool = AttentionPool(v.width, p.heads or v.heads, p.generative_queries, pool_width)
            if open_clip:  # the ViT's final LayerNorm, moved after the pooler (open_clip's ln_post)
                self.ln_pool = nn.LayerNorm(pool_width)
        if "text" in towers:
            self.text = text_tower(t, vocab)
        self.joint = TextInputs(v.width, t.context_length, vocab) if "joint_tokens" in names else None
        if "image_embed" in names and p.contrastive in ("cascade", "parallel"):
            self.con_pool = AttentionPool(v.width, p.heads or v.heads, 1)
        self.image_proj = nn.Linear(pool_width, cfg.embed_dim, bias=False) if "image_embed" in names else None
        text_width = d.width if self.text_from_decoder else t.width
        self.text_proj = nn.Linear(text_width, cfg.embed_dim, bias=False) if "text_embed" in names else None
        if self.image_proj is not None:
            nn.init.normal_(self.image_proj.weight, std=pool_width**-0.5)
        if self.text_proj is not None:
            nn.init.normal_(self.text_proj.weight, std=text_width**-0.5)
        self.locked: set[str] = set()
        self.pad_id = vocab.pad
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    @property
    def has_text_embed(self) -> bool:
        return "text_embed" in self.abilities

    @property
    def has_decoder(self) -> bool:
        return "caption" in self.abilities

    @property
    def padding_free(self) -> bool:
        """Whether no output depends on padding after the captions: every tower pools at <eot> or over real
        tokens and attends causally or to real tokens only. open_clip's decoder (imported weights) does not:
        its [CLS] follows all L positions and sees the first padding token."""
        return self.decoder is None or self.decoder.style != "open_clip"

    def tower(self, name: str) -> nn.Module | None:
        """The module of a tower named as in model.init / model.lock."""
        return getattr(self, TOWER_MODULES[name])

    def lock(self, name: str) -> None:
        """No gradients for a tower; it stays in eval mode (LiT)."""
        tower = self.tower(name)
        tower.requires_grad_(False)
        tower.eval()
        self.locked.add(name)

    def train(self, mode: bool = True) -> "ImageTextModel":
        super().train(mode)
        for name in self.locked:
            self.tower(name).eval()
        return self

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for tower in (self.visual and self.visual.transformer, getattr(self.text, "transformer", None), self.decoder):
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

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._image_outputs(images, {"image_embed"})["image_embed"]

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return self._text_outputs(text, {"text_embed"})["text_embed"]

    def _image_outputs(self, images: torch.Tensor, names: set[str], keep: torch.Tensor | None = None,
                       memory: bool = False) -> dict:
        """Image outputs in `names` (and the decoder's `memory` if asked), from one encoder pass."""
        pooled, tokens = self.visual(images, keep)
        out = {"image_tokens": tokens}
        mode = self.cfg.poolers.contrastive
        mem = first = None
        if memory or mode == "first" or ("image_embed" in names and mode == "cascade"):
            mem, first = self._pool(tokens)
        out["image_pooled"] = first if mode == "first" else pooled
        if "image_embed" in names:
            out["image_embed"] = self._image_embed(pooled, tokens, mem, first)
        if memory:
            out["memory"] = mem
        return out

    def _joint_tokens(self, images: torch.Tensor, text: torch.Tensor, image_keep: torch.Tensor | None = None,
                      text_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The image encoder over [CLS; kept patches; kept text tokens] (vlpt.models.joint); no [CLS] out."""
        img = self.visual.embed(images, image_keep)
        txt, real = self.joint(text, text_keep)
        attend = torch.cat([real.new_ones(img.shape[:2]), real], dim=1)[:, None, None, :]
        x = self.visual.encode(torch.cat([img, txt], dim=1), attend)
        return x[:, int(self.visual.cls_token is not None):]

    def _text_outputs(self, text: torch.Tensor, names: set[str], dropout: float = 0.0) -> dict:
        if self.text_from_decoder:
            out = {"text_features": self.decoder.text_features(text)}
        else:
            out = dict(zip(("text_features", "text_tokens"), self.text(text, dropout)))
        if "text_embed" in names:
            out["text_embed"] = F.normalize(self.text_proj(out["text_features"]), dim=-1)
        return out

    # ------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict, needs: frozenset[str]) -> dict:
        """Every output in `needs`, keyed as named there, each computed once (CoCa: one pass gives the
        embeddings and the caption logits), with caption_mask and caption_head alongside a caption output."""
        out: dict = {}
        for view, names in by_view(needs):
            got = self._default_view(batch, names) if view is None else self._view(batch, view, names)
            out.update({(n if view is None else f"{n}@{view}"): got[n] for n in names})
            if view is None:
                out.update({k: got[k] for k in ("caption_mask", "caption_head") if k in got})
        return out

    def _default_view(self, batch: dict, names: set[str]) -> dict:
        out: dict = {}
        captions = bool(names & CAPTION_OUTPUTS)
        sees = self.visual is not None and (names & IMAGE_OUTPUTS or captions)
        if sees:
            out.update(self._image_outputs(batch["image"], names, memory=captions))
        if captions:
            text = batch["text"]
            hidden, cls = self.decoder(text, out.get("memory") if sees else None, batch.get("parallel"), hidden=True)
            out["caption_hidden"], out["caption_head"] = hidden, self.decoder.head
            if "caption_logits" in names:
                out["caption_logits"] = self.decoder.head(hidden)
            out["caption_mask"] = text[:, 1:] != self.decoder.pad_id
            if cls is not None:  # the decoder is the text tower: its [CLS] is the text feature
                out["text_features"] = cls
                if "text_embed" in names:
                    out["text_embed"] = F.normalize(self.text_proj(cls), dim=-1)
        if names & TEXT_OUTPUTS - out.keys():
            out.update(self._text_outputs(batch["text"], names))
        if "joint_tokens" in names:
            out["joint_tokens"] = self._joint_tokens(batch["image"], batch["text"])
        return out

    def _view(self, batch: dict, view: str, names: set[str]) -> dict:
        if view == "masked":
            keep, out = batch["image_keep"], {}
            if names & IMAGE_OUTPUTS:
                out.update(self._image_outputs(batch["image"], names, keep=keep))
            if "joint_tokens" in names:
                out["joint_tokens"] = self._joint_tokens(batch["image"], batch["text"], keep, batch.get("text_keep"))
            return out
        x = batch[view]  # [V,B,...]: one pass over all V*B examples, outputs reshaped to [V,B,...]
        flat = x.flatten(0, 1)
        if view == "image_views":
            got = self._image_outputs(flat, names)
        else:
            got = self._text_outputs(flat, names, self.text_view_dropout)
        return {k: t.unflatten(0, x.shape[:2]) for k, t in got.items()}
