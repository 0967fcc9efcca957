"""Caption decoder (Cap/CapPa: Tschannen et al. 2023; CoCa: Yu et al. 2022).

Pre-LN blocks: causal self-attention, then cross-attention to the image tokens, then an MLP. CoCa puts
`unimodal_depth` text-only blocks first and appends a learned [CLS] to the text; the [CLS] output of the
unimodal part is the text embedding. Learned positions, a final LN and an untied zero-initialised output
layer. Training reads the text [sot, w1.., eot, pad..] as input text[:, :-1] and targets text[:, 1:].

`model.decoder.style=open_clip` is open_clip's CoCa (for imported weights): split multimodal layers (see
DecoderBlock), a LayerNorm on the image tokens, the [CLS] after all L tokens under open_clip's padding mask.

For generation, `start`/`step` run one new token per call against a key/value cache (`DecodeCache`), so
a sequence of n tokens costs n single-token passes instead of n full passes.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlpt.config import DecoderConfig, TextConfig
from vlpt.data.tokenizer import Vocab
from vlpt.models.layers import MLP, attention


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """[B,N,W] -> [B,h,N,W/h]"""
    b, n, w = x.shape
    return x.view(b, n, h, w // h).transpose(1, 2)


def _merge(y: torch.Tensor) -> torch.Tensor:
    b, h, n, d = y.shape
    return y.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: dict | None = None, pos: int = 0) -> torch.Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        if cache is None:
            y = attention(q, k, v, mask, causal=mask is None)
        else:  # append this call's keys/values; a single new token attends to everything cached
            n = x.shape[1]
            cache["k"][:, :, pos : pos + n], cache["v"][:, :, pos : pos + n] = k, v
            k, v = cache["k"][:, :, : pos + n], cache["v"][:, :, : pos + n]
            y = attention(q, k, v, causal=n > 1)
        return self.proj(_merge(y))


class CrossAttention(nn.Module):
    def __init__(self, width: int, memory_width: int, heads: int, norm_memory: bool = False):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(width, width), nn.Linear(memory_width, 2 * width), nn.Linear(width, width)
        self.ln_kv = nn.LayerNorm(memory_width) if norm_memory else nn.Identity()  # open_clip's ln_1_kv

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(self.ln_kv(memory)).chunk(2, dim=-1)
        return _heads(k, self.heads), _heads(v, self.heads)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B,n,W] attends to the memory's keys/values [B/g,...]: each memory row serves g consecutive rows
        of x (an image's texts while scoring, its beams while generating; g = 1 in training). Queries attend
        independently, so those g rows are one query sequence, and the memory is never copied per row."""
        b, n, w = x.shape
        rows = kv[0].shape[0]
        if b % rows:
            raise ValueError(f"{b} text rows cannot share {rows} memory rows")
        q = _heads(self.q(x).reshape(rows, b // rows * n, w), self.heads)
        y = attention(q, *kv)
        return self.proj(_merge(y).reshape(b, n, w))


class DecoderBlock(nn.Module):
    """x + SA(LN x); [x + XA(LN x, image)]; x + MLP(LN x). Without `memory_width` it is a text-only block.
    `split` (open_clip's multimodal layer): x + SA(LN x); x + MLP_sa(LN x); x + XA(LN x, LN image); x + MLP(LN x)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, memory_width: int | None, split: bool = False):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), SelfAttention(width, heads)
        self.cross = CrossAttention(width, memory_width, heads, norm_memory=split) if memory_width else None
        self.ln_cross = nn.LayerNorm(width) if memory_width else None
        self.ln2, self.mlp = nn.LayerNorm(width), MLP(width, mlp_ratio)
        split = split and memory_width is not None
        self.ln_sa_mlp, self.sa_mlp = (nn.LayerNorm(width), MLP(width, mlp_ratio)) if split else (None, None)

    def forward(self, x, mask=None, memory=None, cache=None, pos=0):
        x = x + self.attn(self.ln1(x), mask, cache, pos)
        if self.sa_mlp is not None:
            x = x + self.sa_mlp(self.ln_sa_mlp(x))
        if self.cross is not None:
            kv = cache["memory"] if cache is not None else self.cross.memory_kv(memory)
            x = x + self.cross(self.ln_cross(x), kv)
        return x + self.mlp(self.ln2(x))


class DecodeCache:
    """Per-layer self-attention keys/values (preallocated to the context) and image keys/values."""

    def __init__(self, layers: list[dict], pos: int = 0):
        self.layers, self.pos = layers, pos

    def reorder(self, index: torch.Tensor, memory_index: torch.Tensor | None = None) -> None:
        """Keep self-attention rows `index` (beam search: each surviving beam continues a parent's cache) and
        image rows `memory_index` (only when sequences leave: the beams of one image share its image keys)."""
        for layer in self.layers:
            layer["k"], layer["v"] = layer["k"][index], layer["v"][index]
            if "memory" in layer and memory_index is not None:
                layer["memory"] = tuple(m[memory_index] for m in layer["memory"])


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, text: TextConfig, vocab: Vocab, memory_width: int):
        super().__init__()
        w, self.context_length, vocab_size = cfg.width, text.context_length, vocab.size
        self.pad_id, self.sot_id, self.eot_id, self.mask_id = vocab.pad, vocab.sot, vocab.eot, vocab.mask
        self.heads, self.style = cfg.heads, cfg.style
        self.token_embed = nn.Embedding(vocab_size, w)
        positions = text.context_length + (cfg.style == "open_clip")  # open_clip: the [CLS] after all L tokens
        self.pos_embed = nn.Parameter(torch.randn(1, positions, w) * 0.01)
        split = cfg.style == "open_clip"
        block = lambda mem: DecoderBlock(w, cfg.heads, text.mlp_ratio, mem, split)  # noqa: E731
        self.unimodal = nn.ModuleList(block(None) for _ in range(cfg.unimodal_depth))
        self.multimodal = nn.ModuleList(block(None if cfg.blind else memory_width) for _ in range(cfg.depth))
        if cfg.zero_cross:  # the image enters only as its weights grow, so early noise cannot slow the language model
            for blk in self.multimodal:
                if blk.cross is not None:
                    nn.init.zeros_(blk.cross.proj.weight)
                    nn.init.zeros_(blk.cross.proj.bias)
        if cfg.unimodal_depth:  # CoCa's [CLS], appended after the text; its unimodal output is the text embedding
            self.cls_token = nn.Parameter(torch.randn(1, 1, w) * 0.01)
            self.ln_cls = nn.LayerNorm(w)
        else:
            self.cls_token = self.ln_cls = None
        self.ln_final = nn.LayerNorm(w)
        self.head = nn.Linear(w, vocab_size)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.grad_checkpointing = False

    @property
    def blind(self) -> bool:
        return all(b.cross is None for b in self.multimodal)

    def _run(self, blocks, x, mask=None, memory=None):
        for b in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(b, x, mask, memory, use_reentrant=False)
            else:
                x = b(x, mask, memory)
        return x

    def _unimodal(self, text: torch.Tensor, parallel: torch.Tensor | None):
        """Embed text[:, :-1] and run the text-only layers -> (x [B,n,W], [CLS] features or None, mask)."""
        if self.style == "open_clip":
            return self._unimodal_open_clip(text, parallel)
        inp = text[:, :-1]
        b, n = inp.shape
        if parallel is not None:
            inp = torch.where(parallel[:, None], torch.full_like(inp, self.mask_id), inp)
        x = self.token_embed(inp) + self.pos_embed[:, :n]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        mask = None if parallel is None else causal | parallel[:, None, None, None]  # None = plain causal
        if self.cls_token is None:
            return self._run(self.unimodal, x, mask), None, mask
        # the [CLS] keeps the context's last position when trailing padding was dropped (trim_padding)
        last = self.context_length - 1
        x = torch.cat([x, self.cls_token.expand(b, -1, -1) + self.pos_embed[:, last : last + 1]], dim=1)
        text_rows = mask if mask is not None else causal.expand(b, 1, n, n)
        # text rows never see the [CLS]; the [CLS] row sees every non-padding token and itself
        top = torch.cat([text_rows, torch.zeros(b, 1, n, 1, dtype=torch.bool, device=x.device)], dim=3)
        cls_row = torch.cat([text[:, :-1] != self.pad_id, torch.ones(b, 1, dtype=torch.bool, device=x.device)], 1)
        x = self._run(self.unimodal, x, torch.cat([top, cls_row[:, None, None, :]], dim=2))
        return x[:, :-1], self.ln_cls(x[:, -1]), mask

    def _unimodal_open_clip(self, text: torch.Tensor, parallel: torch.Tensor | None):
        """open_clip's text tower: all L tokens then the [CLS]; the decoder reads the first L-1 outputs."""
        b, n = text.shape
        inp = text if parallel is None else torch.where(parallel[:, None], torch.full_like(text, self.mask_id), text)
        x = torch.cat([self.token_embed(inp), self.cls_token.expand(b, -1, -1)], dim=1) + self.pos_embed[:, : n + 1]
        rows = torch.ones(n + 1, n + 1, dtype=torch.bool, device=x.device).tril()
        if parallel is not None:
            rows = rows | parallel[:, None, None, None]
        # open_clip's quirk (correct_cls_mask=False): the padding mask is shifted one key right, for every row;
        # so the [CLS] sees <sot>..the first padding token, and itself only when the text fills the context
        keys = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), text != self.pad_id], dim=1)
        x = self._run(self.unimodal, x, rows & keys[:, None, None, :])
        mask = None if parallel is None else rows[..., : n - 1, : n - 1]
        return x[:, : n - 1], self.ln_cls(x[:, -1]), mask

    def text_features(self, text: torch.Tensor) -> torch.Tensor:
        """CoCa's text embedding before projection: the [CLS] output of the unimodal layers."""
        return self._unimodal(text, None)[1]

    def forward(self, text: torch.Tensor, memory: torch.Tensor | None, parallel: torch.Tensor | None = None,
                hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """text [B,L] ids, memory [B,M,Wm] image tokens (None if blind), parallel [B] bool (CapPa).

        Returns (logits [B,L-1,V] predicting text[:, 1:], [CLS] features [B,W] or None). Examples with
        parallel=True read only [MASK] inputs with full attention: they predict every token at once.
        `hidden`: the final hidden states [B,L-1,W] (after the final LN) in place of the logits, for a loss
        that applies `head` itself.
        """
        x, cls, mask = self._unimodal(text, parallel)
        x = self.ln_final(self._run(self.multimodal, x, mask, memory))
        return (x if hidden else self.head(x)), cls

    # ------------------------------------------------------------------------------------ generation
    def start(self, memory: torch.Tensor | None, batch: int, device, dtype) -> DecodeCache:
        """An empty cache for `batch` sequences (memory [batch/g,M,Wm]: each memory row serves g consecutive
        sequences, e.g. an image its beams; or None when blind)."""
        hd = self.token_embed.embedding_dim // self.heads
        shape = (batch, self.heads, self.context_length, hd)
        layers = []
        for blk in [*self.unimodal, *self.multimodal]:
            layer = {"k": torch.empty(shape, device=device, dtype=dtype), "v": torch.empty(shape, device=device, dtype=dtype)}
            if blk.cross is not None:
                layer["memory"] = blk.cross.memory_kv(memory)
            layers.append(layer)
        return DecodeCache(layers)

    def step(self, tokens: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """tokens [B,n] at positions cache.pos.. -> next-token logits [B,V] after the last; advances the cache."""
        n, pos = tokens.shape[1], cache.pos
        if pos + n > self.context_length - 1:  # training inputs use positions 0..L-2
            raise ValueError(f"decoding past the context length ({self.context_length} positions)")
        x = self.token_embed(tokens) + self.pos_embed[:, pos : pos + n]
        for blk, layer in zip([*self.unimodal, *self.multimodal], cache.layers):
            x = blk(x, cache=layer, pos=pos)
        cache.pos += n
        return self.head(self.ln_final(x[:, -1]))
