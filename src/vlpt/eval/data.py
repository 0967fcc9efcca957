"""Evaluation data: each set decoded once per (spec, image size) for the life of the process, so periodic
evaluation decodes it once."""
from __future__ import annotations

import torch

from vlpt.data import sources
from vlpt.data.dataset import ImageTextSet

_DECODED: dict[tuple[str, int], tuple[torch.Tensor, ImageTextSet]] = {}


def clear_cache() -> None:
    """Forget the decoded data sets."""
    _DECODED.clear()


def load_decoded(spec: str, size: int, progress: bool = True) -> tuple[torch.Tensor, ImageTextSet]:
    """(uint8 images [N,3,size,size], the set restricted to the images that decoded), cached."""
    key = (spec, int(size))
    if key not in _DECODED:
        images, good, _bad = sources.decode_all(sources.open_source(spec), int(size), progress=progress)
        _DECODED[key] = (images, good)
    return _DECODED[key]


def need_labels(ds: ImageTextSet, task: str) -> None:
    if ds.labels is None or ds.classnames is None:
        raise ValueError(f"task {task!r}: data set {ds.name!r} has no labels/classnames")


def references_by_image(ds: ImageTextSet) -> dict[int, list[str]]:
    """Every caption of each image that has one, keyed by image index."""
    refs: dict[int, list[str]] = {}
    for caption, image in zip(ds.captions, ds.caption_image):
        refs.setdefault(image, []).append(caption)
    return refs
