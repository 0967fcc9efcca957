"""Views: what objectives see of each image and caption (DESIGN.md, "Views").

Image views run on the batch, on the device it trains on: one `grid_sample` does every example's random
resized crop and flip. Text views run in the loader on each caption's words. Both draw from generators
seeded by (seed, step, rank), so the views of step k are the same whatever happened before: resuming needs
no saved augmentation state.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F

from vlpt.config import ImageViewConfig, TextViewConfig, ViewsConfig


def step_generator(*parts) -> torch.Generator:
    """A CPU generator seeded by a hash of `parts`, e.g. (seed, step, rank, "image"): independent streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


# ------------------------------------------------------------------------------------------ image views
def random_resized_crop(
    images: torch.Tensor,
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: float = 0.0,
) -> torch.Tensor:
    """Per example: a crop of area fraction in `scale` and aspect ratio in `ratio`, resized back to the input
    size (bilinear), mirrored with probability `flip`. Returns float images on the 0-255 scale. Randomness
    comes from `generator` (CPU), so the result does not depend on the device."""
    b, _, h, w = images.shape
    x = images.float()
    mirror = torch.rand(b, generator=generator) < flip if flip > 0 else None
    if scale[0] >= 1.0:
        if mirror is None:
            return x
        return torch.where(mirror.to(x.device)[:, None, None, None], x.flip(-1), x)
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = log_r.exp()
    cw = (area * r).sqrt().clamp(max=1.0)  # crop width/height as fractions of the image
    ch = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - cw)  # centre, in [-1, 1] coordinates
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - ch)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cw, cx, ch, cy
    if mirror is not None:  # a flip is a negative horizontal scale of the same sampling grid
        theta[:, 0, 0] = torch.where(mirror, -cw, cw)
    grid = F.affine_grid(theta.to(x.device), [b, 3, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def image_view(images: torch.Tensor, view: ImageViewConfig, generator: torch.Generator) -> torch.Tensor:
    """One pipeline applied to uint8 images [B,3,H,W] -> float [B,3,H,W] (0-255)."""
    return random_resized_crop(images, tuple(view.crop_scale), generator, tuple(view.crop_ratio), view.flip)


class ImageViews:
    """uint8 images [B,3,H,W] on the training device -> {"image": [B,3,H,W]} and, with
    views.image_views.count = V > 0, {"image_views": [V,B,3,H,W]} (float, 0-255)."""

    def __init__(self, cfg: ViewsConfig, seed: int, rank: int = 0):
        self.cfg, self.seed, self.rank = cfg, seed, rank

    def __call__(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        out = {"image": image_view(images, self.cfg.image, step_generator(self.seed, step, self.rank, "image"))}
        v = self.cfg.image_views.count
        if v:
            g = step_generator(self.seed, step, self.rank, "image_views")
            views = image_view(images.repeat(v, 1, 1, 1), self.cfg.image_views, g)  # all V views in one pass
            out["image_views"] = views.unflatten(0, (v, images.shape[0]))
        return out


# ------------------------------------------------------------------------------------------- text views
def random_swap(words: list[str], p: float, g: torch.Generator) -> list[str]:
    """EDA's random swap: max(1, p * n) times, two random positions exchange their words."""
    words = list(words)
    if p <= 0 or len(words) < 2:
        return words
    for _ in range(max(1, int(p * len(words)))):
        i, j = torch.randint(len(words), (2,), generator=g).tolist()
        words[i], words[j] = words[j], words[i]
    return words


def random_deletion(words: list[str], p: float, g: torch.Generator) -> list[str]:
    """EDA's random deletion: each word goes with probability p; one random word stays if none would."""
    if p <= 0 or not words:
        return list(words)
    drop = (torch.rand(len(words), generator=g) < p).tolist()
    kept = [w for w, d in zip(words, drop) if not d]
    return kept or [words[int(torch.randint(len(words), (1,), generator=g))]]


def text_view(caption: str, view: TextViewConfig, g: torch.Generator) -> str:
    words = caption.split()
    words = random_swap(words, view.random_swap, g)
    words = random_deletion(words, view.random_deletion, g)
    return " ".join(words)


def is_identity(view: TextViewConfig) -> bool:
    return view.random_swap == 0 and view.random_deletion == 0


class TextViews:
    """Captions -> the texts objectives read: batch["text"] through views.text and, with
    views.text_views.count = V > 0, V more through views.text_views (tokenised by the caller)."""

    def __init__(self, cfg: ViewsConfig, seed: int, rank: int = 0):
        self.cfg, self.seed, self.rank = cfg, seed, rank

    @property
    def active(self) -> bool:
        """False when batch["text"] is the caption itself and there are no extra views."""
        return not is_identity(self.cfg.text) or self.cfg.text_views.count > 0

    def __call__(self, captions: list[str], step: int) -> tuple[list[str] | None, list[list[str]]]:
        """(the main texts, or None when views.text changes nothing; the extra views)."""
        g = step_generator(self.seed, step, self.rank, "text")
        main = None if is_identity(self.cfg.text) else [text_view(c, self.cfg.text, g) for c in captions]
        extra = [[text_view(c, self.cfg.text_views, g) for c in captions] for _ in range(self.cfg.text_views.count)]
        return main, extra
