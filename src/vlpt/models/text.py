"""Text towers: CLIP's causal transformer (features at the <eot> token), an order-free bag of words, or the
pretrained MiniLM (vlpt.models.minilm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.config import TextConfig
from vlpt.data.tokenizer import Vocab
from vlpt.models.layers import Transformer
from vlpt.models.minilm import MiniLM


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


class TextBag(nn.Module):
    """Order-free text tower (CLIP's bag-of-words contrastive baseline, Radford et al. 2021 section 2.3):
    the mean of the caption's token embeddings (<sot> and <eot> included, padding excluded), then a
    LayerNorm. No positions, no attention."""

    def __init__(self, cfg: TextConfig, vocab_size: int, pad_id: int):
        super().__init__()
        self.pad_id = pad_id
        self.token_embed = nn.Embedding(vocab_size, cfg.width)
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, text: torch.Tensor, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """text [B,L] ids -> (LN of the mean embedding [B,W], each token's embedding after the LN [B,L,W]);
        `dropout` on the token embeddings, in training (the only hidden state this tower has)."""
        x = self.token_embed(text)
        if dropout:
            x = F.dropout(x, dropout, self.training)
        real = (text != self.pad_id).unsqueeze(-1).to(x.dtype)
        mean = (x * real).sum(1) / real.sum(1).clamp(min=1)
        return self.ln_final(mean), self.ln_final(x)


def text_tower(cfg: TextConfig, vocab: Vocab) -> nn.Module:
    """The text tower `model.text.kind` names."""
    if cfg.kind == "bag":
        return TextBag(cfg, vocab.size, vocab.pad)
    if cfg.kind == "minilm":
        return MiniLM(cfg, vocab.size, vocab.pad)
    return TextTransformer(cfg, vocab.size, vocab.eot)
