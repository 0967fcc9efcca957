"""Evaluation data: each set decoded once per (spec, image size) for the life of the process, so periodic
evaluation decodes it once."""
from __future__ import annotations

import torch

from vlpt.data import sources
from vlpt.data.dataset import ImageTextSet
from vlpt.errors import UsageError

_DECODED: dict[tuple[str, int, float], tuple[torch.Tensor, ImageTextSet]] = {}


def clear_cache() -> None:
    """Forget the decoded data sets."""
    _DECODED.clear()


def load_decoded(spec: str, size: int, options) -> tuple[torch.Tensor, ImageTextSet]:
    """(uint8 images [N,3,size,size], the set restricted to the images that decoded), cached. `options`: the
    task's EvalOptions (progress bar; data.max_bad_fraction of unreadable images allowed)."""
    key = (spec, int(size), options.max_bad_fraction)
    if key not in _DECODED:
        images, good, _bad = sources.decode_all(sources.open_source(spec), int(size), options.max_bad_fraction,
                                                progress=options.progress)
        _DECODED[key] = (images, good)
    return _DECODED[key]


def need_labels(ds: ImageTextSet, task: str) -> None:
    if ds.labels is None or ds.classnames is None:
        raise UsageError(f"task {task!r}: data set {ds.name!r} has no class labels; give a labelled set "
                         f"(folder:PATH with one folder per class, cifar10:test or scenes:colour)")


def references_by_image(ds: ImageTextSet) -> dict[int, list[str]]:
    """Every caption of each image that has one, keyed by image index."""
    refs: dict[int, list[str]] = {}
    for caption, image in zip(ds.captions, ds.caption_image):
        refs.setdefault(image, []).append(caption)
    return refs
