"""CLIP-style text tower: causal transformer, final LN, features at the <eot> token."""
from __future__ import annotations

import torch
from torch import nn

from vlpt.config import TextConfig
from vlpt.models.layers import Transformer


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, vocab_size: int, eot_id: int):
        super().__init__()
        self.eot_id = eot_id
        self.token_embed = nn.Embedding(vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.context_length, cfg.width) * 0.01)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, text: torch.Tensor, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """text [B,L] ids -> (features at <eot> [B,W], all tokens [B,L,W]); `dropout` on the hidden states at
        every block's input, in training.

        Padding follows <eot>, so with causal attention no position up to <eot> ever sees it.
        """
        x = self.token_embed(text) + self.pos_embed[:, : text.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True, dropout=dropout))
        eot = (text == self.eot_id).int().argmax(dim=1)
        return x[torch.arange(x.shape[0], device=x.device), eot], x
