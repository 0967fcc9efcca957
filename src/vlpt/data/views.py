"""Views: what objectives see of each image and caption (DESIGN.md, "Views").

Image views run on the batch, on the device it trains on (data/image_ops.py): one `grid_sample` does every
example's random resized crop and flip, then colour jitter, grayscale, blur and solarize change the examples
they draw. Text views run in the loader on each caption's words (data/text_ops.py). Both draw from CPU
generators seeded by (seed, step, rank), so the views of step k are the same whatever happened before and
on whichever device: resuming needs no saved augmentation state.
"""
from __future__ import annotations

import hashlib

import torch

from vlpt.config import EDA_OPS, ImageViewConfig, TextViewConfig, ViewsConfig
from vlpt.data.image_ops import (random_blur, random_color_jitter, random_grayscale, random_resized_crop,
                                 random_solarize)
from vlpt.data.text_ops import random_deletion, random_insertion, random_swap, remove_stopwords, synonym_replacement
from vlpt.data.thesaurus import INSTALL, find_wordnet, wordnet
from vlpt.typed import ConfigError


def step_generator(*parts) -> torch.Generator:
    """A CPU generator seeded by a hash of `parts`, e.g. (seed, step, rank, "image"): independent streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


# ------------------------------------------------------------------------------------------ image views
def image_view(images: torch.Tensor, view: ImageViewConfig, generator: torch.Generator) -> torch.Tensor:
    """One pipeline applied to uint8 images [B,3,H,W] -> float [B,3,H,W] (0-255): crop and flip, colour
    jitter, grayscale, blur, solarize (SimCLR's order; its flip comes last, but commutes with the others).
    An operation that is off draws nothing from the generator: a view without the later operations is the
    one it was before they existed."""
    x = random_resized_crop(images, tuple(view.crop_scale), generator, tuple(view.crop_ratio), view.flip)
    if view.color_jitter_p > 0 and any(view.color_jitter):
        x = random_color_jitter(x, view.color_jitter, view.color_jitter_p, generator)
    if view.grayscale > 0:
        x = random_grayscale(x, view.grayscale, generator)
    if view.blur > 0:
        x = random_blur(x, view.blur, tuple(view.blur_sigma), generator)
    if view.solarize > 0:
        x = random_solarize(x, view.solarize, generator)
    return x


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
def eda_ops(view: TextViewConfig) -> list[str]:
    """The EDA operations a caption may get from this view, in EDA_OPS order."""
    return [op for op in EDA_OPS if getattr(view, op) > 0 and (not view.eda or view.eda.get(op, 0) > 0)]


def is_identity(view: TextViewConfig) -> bool:
    return view.stopwords == 0 and not eda_ops(view)


def _draw_op(eda: dict[str, float], g: torch.Generator) -> str | None:
    """One of eda's operations with its probability; None with the probability left over."""
    u, total = float(torch.rand(1, generator=g)), 0.0
    for op in EDA_OPS:
        total += eda.get(op, 0.0)
        if u < total:
            return op
    return None


def text_view(caption: str, view: TextViewConfig, g: torch.Generator) -> str:
    """Stop-word removal (with its probability), then every EDA operation that is on, in EDA_OPS order, or,
    with `view.eda`, the one drawn for this caption."""
    words = caption.split()
    if view.stopwords > 0 and float(torch.rand(1, generator=g)) < view.stopwords:
        words = remove_stopwords(words)
    ops = [_draw_op(view.eda, g)] if view.eda else eda_ops(view)
    for op in ops:
        if op == "synonym_replacement":
            words = synonym_replacement(words, view.synonym_replacement, g, wordnet())
        elif op == "random_insertion":
            words = random_insertion(words, view.random_insertion, g, wordnet())
        elif op == "random_swap":
            words = random_swap(words, view.random_swap, g)
        elif op == "random_deletion":
            words = random_deletion(words, view.random_deletion, g)
    return " ".join(words)


class TextViews:
    """Captions -> the texts objectives read: batch["text"] through views.text and, with
    views.text_views.count = V > 0, V more through views.text_views (tokenised by the caller).

    Synonym replacement and insertion read WordNet (data/thesaurus.py); a view that uses them on a machine
    without it is a ConfigError here, when the run starts."""

    def __init__(self, cfg: ViewsConfig, seed: int, rank: int = 0):
        self.cfg, self.seed, self.rank = cfg, seed, rank
        used = [("text", cfg.text)] + ([("text_views", cfg.text_views)] if cfg.text_views.count else [])
        for section, view in used:
            for op in ("synonym_replacement", "random_insertion"):
                if op in eda_ops(view) and find_wordnet() is None:
                    raise ConfigError(f"views.{section}.{op} needs WordNet, which this machine lacks: {INSTALL}")

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
