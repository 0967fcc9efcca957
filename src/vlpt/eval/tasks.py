"""The evaluation suite: run tasks named "KIND:DATASPEC" against a model exposing the eval contract.

Task kinds:
  zeroshot:DATASPEC              zero-shot classification of a labelled set (top1, top5)
  retrieval:DATASPEC             image<->text retrieval over a captioned set (t2i_R@K, i2t_R@K)
  linear_probe:TRAINSPEC|TESTSPEC  logistic regression on frozen pooled features (linear_probe_top1);
                                 "linear_probe:X:train" alone means "linear_probe:X:train|X:test"
DATASPEC is anything `vlpt.data.sources.open_source` understands. Metrics come back as
"<task>/<metric>", e.g. "zeroshot:scenes:colour_shape/top1". Decoded data sets are cached per
(spec, image size) for the life of the process, so periodic evaluation decodes each set once.
"""
from __future__ import annotations

import difflib
from typing import Protocol, Sequence

import torch

from vlpt.data import sources
from vlpt.data.dataset import ImageTextSet
from vlpt.eval import encode_batched
from vlpt.eval.probes import linear_probe
from vlpt.eval.retrieval import retrieval
from vlpt.eval.zeroshot import zeroshot_classify

KINDS = ("zeroshot", "retrieval", "linear_probe")


class EvalModel(Protocol):
    """What the evaluators need from a model (see "Evaluation contract" in the interfaces)."""

    image_size: int

    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...  # uint8 [B,3,H,W] -> [B,D], unit norm

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...  # -> [N,D], unit norm

    def image_features(self, images: torch.Tensor) -> torch.Tensor: ...  # uint8 [B,3,H,W] -> [B,F] pooled


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


def parse_task(task: str) -> tuple[str, str]:
    """"KIND:DATASPEC" -> (KIND, DATASPEC), with a helpful error for an unknown kind."""
    kind, sep, spec = task.partition(":")
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown evaluation task kind {kind!r} in {task!r}; known kinds: {', '.join(KINDS)}.{hint}")
    if not sep or not spec:
        raise ValueError(f"task {task!r} names no data set; write it as '{kind}:DATASPEC'")
    return kind, spec


def probe_specs(spec: str) -> tuple[str, str]:
    """The (train, test) data specs of a linear-probe task."""
    if "|" in spec:
        train, _, test = spec.partition("|")
        if train and test:
            return train, test
    elif spec.endswith(":train"):
        return spec, spec[: -len("train")] + "test"
    raise ValueError(f"linear_probe needs 'TRAINSPEC|TESTSPEC' (or a spec ending in ':train'), got {spec!r}")


def _need_labels(ds: ImageTextSet, task: str) -> None:
    if ds.labels is None or ds.classnames is None:
        raise ValueError(f"task {task!r}: data set {ds.name!r} has no labels/classnames")


def run_task(
    task: str, model: EvalModel, templates="imagenet80", progress: bool = True, batch_size: int = 256
) -> dict[str, float]:
    """Run one task; metrics named "<task>/<metric>"."""
    kind, spec = parse_task(task)
    size = model.image_size
    if kind == "zeroshot":
        images, ds = load_decoded(spec, size, progress)
        _need_labels(ds, task)
        metrics = zeroshot_classify(
            model.encode_images, model.encode_texts, images, ds.labels, ds.classnames, templates, batch_size, progress
        )
    elif kind == "retrieval":
        images, ds = load_decoded(spec, size, progress)
        metrics = retrieval(
            model.encode_images, model.encode_texts, images, ds.captions, ds.caption_image,
            batch_size=batch_size, progress=progress,
        )
    else:
        (train_images, train), (test_images, test) = (load_decoded(s, size, progress) for s in probe_specs(spec))
        _need_labels(train, task)
        _need_labels(test, task)
        if list(train.classnames) != list(test.classnames):
            raise ValueError(f"task {task!r}: train and test sets have different classnames")
        train_feats = encode_batched(model.image_features, train_images, batch_size, progress, "train features")
        test_feats = encode_batched(model.image_features, test_images, batch_size, progress, "test features")
        metrics = linear_probe(train_feats, train.labels, test_feats, test.labels)
    return {f"{task}/{name}": value for name, value in metrics.items()}


def run_suite(tasks: Sequence[str], model: EvalModel, **kw) -> dict[str, float]:
    """Run every task (all kinds are checked first, so a typo fails before any work) and merge the metrics."""
    for task in tasks:
        parse_task(task)
    out: dict[str, float] = {}
    for task in tasks:
        out.update(run_task(task, model, **kw))
    return out
