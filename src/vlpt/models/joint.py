"""Text as input of the image encoder, so that one transformer reads both modalities (`joint_tokens`).

The image encoder's own transformer runs over [CLS (if model.vision.pool=cls); image patches; text tokens]:
its patches are embedded as always, the text tokens here, at the encoder's width. Text carries a learned
type embedding; the image's type embedding is the zero vector, since a learned constant on every patch
is only a shift of the ViT's learned position embeddings, and zero keeps an image-only pass (what probes
read) the same as the image part of a joint pass. Padding is never attended to.
"""
from __future__ import annotations

import torch
from torch import nn

from vlpt.data.tokenizer import Vocab


class TextInputs(nn.Module):
    def __init__(self, width: int, context_length: int, vocab: Vocab):
        super().__init__()
        self.pad_id = vocab.pad
        self.token_embed = nn.Embedding(vocab.size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        self.type_embed = nn.Parameter(torch.randn(width) * 0.02)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, text: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """text [B,L] ids, keep [B,K] the positions to encode (None: all) -> (input tokens [B,K,W], which of
        them are real tokens rather than padding [B,K])."""
        x = self.token_embed(text) + self.pos_embed[:, : text.shape[1]] + self.type_embed
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
            text = text.gather(1, keep)
        return x, text != self.pad_id
