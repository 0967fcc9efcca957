"""Weighted mixtures of data sources: `flickr8k@0.7 + cifar10:train@0.3`."""
from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import torch
from PIL import Image

from .dataset import ImageTextSet
from .sources import BadDataError

_WEIGHT = re.compile(r"^(.*?)\s*@\s*([-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|inf|nan))$", re.I)


class MixedRef(NamedTuple):
    """An image reference of a mixture: which source, and the reference inside it."""

    source: int
    ref: Any

    def __str__(self) -> str:
        return str(self.ref)


class MixedLoader:
    """Loads a MixedRef with its source's own loader (a class, so it pickles for worker processes)."""

    def __init__(self, loads: list):
        self.loads = loads

    def __call__(self, ref: MixedRef) -> Image.Image:
        return self.loads[ref.source](ref.ref)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """"A@0.7 + B@0.3" -> [("A", 0.7), ("B", 0.3)]; a part without "@w" gets weight 1."""
    out = []
    for part in re.split(r"(?:^|\s+)\+(?:\s+|$)", spec.strip()):
        part = part.strip()
        m = _WEIGHT.match(part)
        source, weight = (m.group(1).strip(), float(m.group(2))) if m else (part, 1.0)
        if not source:
            raise BadDataError(f"empty source in data mixture {spec!r}; write A@0.7 + B@0.3")
        if not (weight > 0 and math.isfinite(weight)):
            raise BadDataError(f"weight of {source!r} in {spec!r} must be positive, got {weight}")
        out.append((source, weight))
    return out


def _merge_labels(sets: list[ImageTextSet]) -> tuple[list[int] | None, list[str] | None]:
    """Labels survive a mixture only when every source has them; class names are merged by name."""
    if not sets or any(s.labels is None or s.classnames is None for s in sets):
        return None, None
    names: list[str] = []
    labels: list[int] = []
    for s in sets:
        remap = []
        for c in s.classnames:
            if c not in names:
                names.append(c)
            remap.append(names.index(c))
        labels += [remap[lb] for lb in s.labels]
    return labels, names


def mix(sets: list[ImageTextSet], weights: list[float]) -> tuple[ImageTextSet, torch.Tensor]:
    """Concatenate sets; per-caption probabilities draw source i with weight i / sum (uniform inside)."""
    if len(sets) != len(weights) or not sets:
        raise ValueError(f"mix needs one weight per set, got {len(sets)} sets and {len(weights)} weights")
    total = float(sum(weights))
    if not all(w > 0 for w in weights):
        raise ValueError(f"mixture weights must be positive, got {weights}")
    images, captions, caption_image, probs = [], [], [], []
    for k, (s, w) in enumerate(zip(sets, weights)):
        if len(s) == 0:
            raise BadDataError(f"source {s.name!r} of the mixture has no captions")
        offset = len(images)
        images += [MixedRef(k, r) for r in s.images]
        captions += s.captions
        caption_image += [offset + i for i in s.caption_image]
        probs.append(torch.full((len(s),), w / total / len(s), dtype=torch.float64))
    labels, classnames = _merge_labels(sets)
    mixed = ImageTextSet(name="+".join(s.name for s in sets), images=images,
                         load=MixedLoader([s.load for s in sets]), captions=captions,
                         caption_image=caption_image, labels=labels, classnames=classnames)
    return mixed, torch.cat(probs)
