"""What masked-reconstruction objectives (MAE, M3AE) share: random masks, pixel targets, fixed sin-cos
positions, and the light decoder that puts mask tokens back where tokens were dropped.

Masks follow MAE (He et al. 2022): per example, sort uniform noise and keep the first int(N * (1 - ratio))
positions (at least one); the rest are masked.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vlpt.models.layers import Transformer
from vlpt.models.vision import MEAN, STD
from vlpt.objectives.base import fp32


def keep_count(length: int, ratio: float) -> int:
    return max(1, int(length * (1 - ratio)))


def random_keep(batch: int, length: int, ratio: float, device: torch.device) -> torch.Tensor:
    """[B,K] indices of the positions each example keeps, K = keep_count(length, ratio), in random order."""
    return torch.rand(batch, length, device=device).argsort(dim=1)[:, : keep_count(length, ratio)]


def dropped(keep: torch.Tensor, length: int) -> torch.Tensor:
    """[B,length] bool: True where a position is masked (not in keep)."""
    return torch.ones(keep.shape[0], length, dtype=torch.bool, device=keep.device).scatter(1, keep, False)


def patch_pixels(images: torch.Tensor, patch: int, norm_pix: bool) -> torch.Tensor:
    """images [B,3,H,W] (0-255) -> [B,N,p*p*3] targets, patches in the ViT's token order (row-major), pixels
    normalised as the ViT sees them; `norm_pix`: also each patch to zero mean and unit variance (MAE's
    norm_pix_loss: unbiased variance, + 1e-6)."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255
    x = (images.float() - mean) / std
    b, c, h, w = x.shape
    x = x.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, patch * patch * c)
    if norm_pix:
        x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()
    return x


def pixel_loss(pred: torch.Tensor, images: torch.Tensor, keep: torch.Tensor, patch: int, norm_pix: bool) -> torch.Tensor:
    """pred [B,N,p*p*3]: the mean over the masked patches of the mean squared error over a patch's pixels."""
    with fp32(pred):
        target = patch_pixels(images, patch, norm_pix)
        err = (pred.float() - target).pow(2).mean(-1)
        masked = dropped(keep, target.shape[1]).float()
        return (err * masked).sum() / masked.sum()


def sincos(positions: torch.Tensor, width: int) -> torch.Tensor:
    """[n] positions -> [n,width]: sines then cosines at frequencies 1 / 10000^(2i/width) (Transformer's)."""
    freq = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
    angle = positions.double()[:, None] * freq[None]
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


def sincos_grid(grid: int, width: int) -> torch.Tensor:
    """[grid*grid, width] for a row-major grid: half the width encodes the row, half the column (MAE's)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos(rows.flatten(), width // 2), sincos(cols.flatten(), width // 2)], dim=1)


class MaskedDecoder(nn.Module):
    """MAE's light decoder, for one or more segments (image patches; text tokens). Per segment: the encoder
    tokens of the kept positions, projected to the decoder's width, go back to their places; a learned mask
    token fills the others; fixed sin-cos positions are added (and a learned type embedding per segment
    when there are several, as M3AE's decoder has). Then a pre-LN transformer over all segments together,
    a final LN and one linear head per segment."""

    def __init__(self, in_width: int, width: int, depth: int, heads: int, positions: list[torch.Tensor],
                 outputs: list[int], mlp_ratio: float = 4.0):
        """positions: per segment its [length, width] position embeddings; outputs: per segment the width
        of a prediction (p*p*3 pixels, the vocabulary)."""
        super().__init__()
        self.proj = nn.Linear(in_width, width)
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.randn(width) * 0.02) for _ in positions)
        types = len(positions) if len(positions) > 1 else 0
        self.type_embeds = nn.ParameterList(nn.Parameter(torch.randn(width) * 0.02) for _ in range(types))
        for i, pos in enumerate(positions):
            self.register_buffer(f"pos_{i}", pos, persistent=False)
        self.transformer = Transformer(width, depth, heads, mlp_ratio)
        self.ln = nn.LayerNorm(width)
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in outputs)

    def forward(self, segments: list[tuple[torch.Tensor, torch.Tensor]], attend: torch.Tensor | None = None):
        """segments: per segment (encoder tokens [B,K,Win], their positions keep [B,K]); attend [B,S] (all
        segments' full lengths, True: a key that may be attended) -> per segment predictions [B,length,out]."""
        xs = []
        for i, (tokens, keep) in enumerate(segments):
            pos = getattr(self, f"pos_{i}")
            y = self.proj(tokens)
            x = self.mask_tokens[i].to(y.dtype).expand(y.shape[0], pos.shape[0], -1)
            x = x.scatter(1, keep[..., None].expand(-1, -1, y.shape[-1]), y) + pos
            xs.append(x + self.type_embeds[i] if len(self.type_embeds) else x)
        mask = None if attend is None else attend[:, None, None, :]
        x = self.ln(self.transformer(torch.cat(xs, dim=1), mask))
        return [head(part) for head, part in zip(self.heads, x.split([s.shape[1] for s in xs], dim=1))]


@dataclasses.dataclass
class DecoderOptions:
    """The light decoder's shape, an option of every masking objective. MAE's and M3AE's: 8 blocks of width
    512, 16 heads (recipes for small encoders set a lighter one)."""

    decoder_depth: int = 8
    decoder_width: int = 512
    decoder_heads: int = 16


def check_options(opts, prefix: str, ratios: tuple[str, ...]) -> None:
    """Mask ratios in [0, 1) and a decoder shape that works; a ConfigError names the key."""
    from vlpt.typed import ConfigError

    for key in ratios:
        if not 0 <= getattr(opts, key) < 1:
            raise ConfigError(f"{prefix}.{key}={getattr(opts, key)} must be in [0, 1) (0.75 in the paper)")
    w, h = opts.decoder_width, opts.decoder_heads
    if opts.decoder_depth < 1 or h < 1 or w % h or w % 4:
        raise ConfigError(f"{prefix}: decoder_depth={opts.decoder_depth}, decoder_width={w}, decoder_heads={h}: "
                          f"need depth >= 1 and a width that is a multiple of 4 and of the heads (e.g. 512, 16)")
