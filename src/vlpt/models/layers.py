"""Transformer pieces shared by every tower: attention goes through F.scaled_dot_product_attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.proj(y.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: float):
        super().__init__()
        hidden = int(width * ratio)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN: x + attn(LN(x)); x + mlp(LN(x)). Post-LN (BERT's, for pretrained BERT-style towers):
    LN(x + attn(x)); LN(x + mlp(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, post_ln: bool = False, eps: float = 1e-5):
        super().__init__()
        self.post_ln = post_ln
        self.ln1, self.attn = nn.LayerNorm(width, eps=eps), Attention(width, heads)
        self.ln2, self.mlp = nn.LayerNorm(width, eps=eps), MLP(width, mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        if self.post_ln:
            x = self.ln1(x + self.attn(x, mask, causal))
            return self.ln2(x + self.mlp(x))
        x = x + self.attn(self.ln1(x), mask, causal)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float, post_ln: bool = False,
                 eps: float = 1e-5):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, post_ln, eps) for _ in range(depth))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                dropout: float = 0.0) -> torch.Tensor:
        """`dropout`: on the hidden states at the input of every block, in training (clip-rocket's text dropout)."""
        for block in self.blocks:
            if dropout > 0:
                x = F.dropout(x, dropout, self.training)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, causal, use_reentrant=False)
            else:
                x = block(x, mask, causal)
        return x


class AttentionPool(nn.Module):
    """Multi-head attention with learned queries over a token sequence (MAP head / attentional pooler).
    `out_width`: queries, attention and outputs of another width than the tokens (open_clip's pooler)."""

    def __init__(self, width: int, heads: int, queries: int = 1, out_width: int | None = None):
        super().__init__()
        self.heads = heads
        d = out_width or width
        self.query = nn.Parameter(torch.randn(queries, d) * d**-0.5)
        self.ln_q, self.ln_kv = nn.LayerNorm(d), nn.LayerNorm(width)
        self.q, self.kv, self.proj = nn.Linear(d, d), nn.Linear(width, 2 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.heads, self.q.out_features
        q = self.q(self.ln_q(self.query)).view(1, -1, h, d // h).transpose(1, 2).expand(b, -1, -1, -1)
        k, v = self.kv(self.ln_kv(x)).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, -1, d))
