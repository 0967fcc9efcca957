"""Transformer pieces shared by every tower: attention goes through `attention` (F.scaled_dot_product_attention,
or its two matmuls and a softmax where that is faster)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


UNFUSED_MAX_SCORES = 1024 * 1024  # query x key positions up to which CPU bf16/fp16 attention is unfused


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention's result (a boolean `mask`: True where a query may attend; `causal`:
    aligned top-left, as SDPA's; a query that may attend nowhere gets zeros, as SDPA gives).
    On CPU in bf16/fp16, PyTorch's fused kernel takes longer, forward + backward, than the unfused matmuls
    (3.4x at 65 tokens, 1.4x at 577: benchmarks/attention_cpu.py), so there it is spelled out: scores in the
    inputs' dtype, softmax in fp32, as non-fused attention under autocast usually runs."""
    fused = (q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16)
             or q.shape[-2] * k.shape[-2] > UNFUSED_MAX_SCORES)
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif causal:  # every query sees at least the first key: no empty rows
        later = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(later, float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if mask is not None:
        p = p.nan_to_num(0.0)  # rows with no key allowed: zeros, not NaN
    return p.to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, mask, causal)
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
        y = attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, -1, d))
