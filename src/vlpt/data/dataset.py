"""The one in-memory data set shape every source produces, and the image preprocessing to model input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image


@dataclass
class ImageTextSet:
    """Images with captions (and, for classification sets, labels).

    Training iterates over captions; retrieval uses `caption_image` to know which image a caption
    describes; zero-shot classification uses `labels` and `classnames`.
    """

    name: str
    images: Sequence  # one reference per image: a path, or an index into an array store
    load: Callable[[Any], Image.Image]  # reference -> PIL image (any mode)
    captions: list[str]
    caption_image: list[int]
    labels: list[int] | None = None
    classnames: list[str] | None = None

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def num_images(self) -> int:
        return len(self.images)

    def subset_images(self, keep: Sequence[int]) -> "ImageTextSet":
        """The same set restricted to the images `keep` (and their captions)."""
        new_index = {old: new for new, old in enumerate(keep)}
        pairs = [(t, new_index[i]) for t, i in zip(self.captions, self.caption_image) if i in new_index]
        return ImageTextSet(
            name=self.name,
            images=[self.images[i] for i in keep],
            load=self.load,
            captions=[t for t, _ in pairs],
            caption_image=[i for _, i in pairs],
            labels=None if self.labels is None else [self.labels[i] for i in keep],
            classnames=self.classnames,
        )


def to_uint8(img: Image.Image, size: int) -> torch.Tensor:
    """RGB, shorter side resized to `size` (bicubic), centre crop: uint8 [3, size, size]."""
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
