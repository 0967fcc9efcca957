"""The one in-memory data set shape every source produces, and the image preprocessing to model input."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image


@dataclass
class Issue:
    """Input items of one kind that a loader skipped or repaired: their names, out of `total` looked at."""

    total: int
    names: list[str] = field(default_factory=list)


def merge_issues(sets: Sequence["ImageTextSet"]) -> dict[str, Issue]:
    out: dict[str, Issue] = {}
    for s in sets:
        for kind, issue in s.issues.items():
            o = out.setdefault(kind, Issue(0))
            o.total += issue.total
            o.names += issue.names
    return out


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
    issues: dict[str, Issue] = field(default_factory=dict)  # kind -> items skipped/repaired while loading

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
            issues=self.issues,
        )


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
MAX_UPSCALED_SIDE = 4  # x size: beyond it, resize only the crop (a 1x5000 strip must not become 224x1.1M)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit samples scaled (not clipped) to 8 bits, transparency composited
    on white (as a web page shows it), everything else by PIL's conversion (CMYK, 1-bit, palette, grey)."""
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT or (img.mode == "I" and img.getextrema()[1] > 255):  # "I": 16-bit data in 32
        a = np.asarray(img).astype(np.int64).clip(0, 65535)
        img = Image.fromarray(((a + 128) // 257).astype(np.uint8))  # 65535 -> 255, rounded
    if img.mode in ALPHA or (img.mode == "P" and "transparency" in img.info):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def to_uint8(img: Image.Image, size: int) -> torch.Tensor:
    """RGB, shorter side resized to `size` (bicubic), centre crop: uint8 [3, size, size]."""
    img = to_rgb(img)
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        if max(nw, nh) > MAX_UPSCALED_SIDE * size:  # extreme aspect ratio: resample the kept window only
            box = (left * w / nw, top * h / nh, (left + size) * w / nw, (top + size) * h / nh)
            img = img.resize((size, size), Image.BICUBIC, box=box)
        else:
            img = img.resize((nw, nh), Image.BICUBIC)
            img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def decode_to_uint8(data: bytes, size: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, size, size] as `to_uint8` makes it. A JPEG is decoded at reduced size
    (PIL's draft mode: the DCT scaled by 1/2, 1/4 or 1/8, never below `size` on either side) when it is at
    least twice the target, which saves most of the decoding time of a large photo."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        img.draft("RGB", (size, size))
    return to_uint8(img, size)
