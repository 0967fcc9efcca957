"""Linear probe: logistic regression on standardised frozen features, and what every probe shares.

The inverse regularisation strength C is picked from a small log-scale grid on a held-out slice of the
training features (a seeded, stratified fifth); the probe is then refit with that C on all training
features and scored once on the test features, which never take part in the choice.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from vlpt.eval.batching import encode_batched
from vlpt.eval.data import load_decoded, need_labels
from vlpt.eval.registry import EvalOptions, Evaluator, TaskError, register

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0)
MIN_VALIDATION = 10  # fewer training examples than this: no validation split, the grid's middle C


def _numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int):
    """Standardisation (fitted on `x` alone) then logistic regression."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, random_state=seed))
    # one BLAS thread: lbfgs runs ~1,000 products of a few thousand x width x classes, too small to share,
    # and several threads on a busy machine made a scenes probe 6x slower (docs/results.md)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(x, y)


def validation_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(fit, validation) indices, stratified when every class has two examples; None when there are too
    few examples or the fit part would hold a single class."""
    from sklearn.model_selection import train_test_split

    if len(y) < MIN_VALIDATION:
        return None
    idx = np.arange(len(y))
    _, counts = np.unique(y, return_counts=True)
    try:
        fit, val = train_test_split(idx, test_size=val_fraction, random_state=seed,
                                    stratify=y if counts.min() >= 2 else None)
    except ValueError:  # more classes than validation examples: no stratified split exists
        fit, val = train_test_split(idx, test_size=val_fraction, random_state=seed)
    return (fit, val) if len(np.unique(y[fit])) >= 2 else None


def choose_c(x: np.ndarray, y: np.ndarray, cs: Sequence[float], val_fraction: float, max_iter: int,
             seed: int) -> tuple[float, float | None]:
    """(the C with the best validation accuracy, the smallest such C on ties; that accuracy in %), or
    (the grid's middle C, None) when there is too little data to hold any out."""
    split = validation_split(y, val_fraction, seed)
    if split is None:
        return float(cs[len(cs) // 2]), None
    fit, val = split
    acc, neg_c = max((_fit(x[fit], y[fit], c, max_iter, seed).score(x[val], y[val]), -c) for c in cs)
    return float(-neg_c), 100.0 * float(acc)


def linear_probe(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    seed: int = 0,
    cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = 0.2,
    max_iter: int = 1000,
) -> dict[str, float]:
    """linear_probe_top1 (test accuracy, %), linear_probe_C (the chosen C) and linear_probe_val_top1 (its
    validation accuracy, %; absent when TRAIN is too small to hold out a split). Features: [N, F] tensors or
    arrays; labels: ints."""
    x_tr, x_te = _numpy(train_feats).astype(np.float64), _numpy(test_feats).astype(np.float64)
    y_tr, y_te = _numpy(train_labels).astype(np.int64), _numpy(test_labels).astype(np.int64)
    if len(np.unique(y_tr)) < 2:
        raise ValueError("a linear probe needs at least two classes in the training labels")
    c, val_top1 = choose_c(x_tr, y_tr, cs, val_fraction, max_iter, seed)
    clf = _fit(x_tr, y_tr, c, max_iter, seed)
    out = {"linear_probe_top1": 100.0 * float(clf.score(x_te, y_te)), "linear_probe_C": c}
    if val_top1 is not None:
        out["linear_probe_val_top1"] = val_top1
    return out


def probe_specs(spec: str, kind: str) -> tuple[str, str]:
    """The (train, test) data specs of a probe task."""
    if "|" in spec:
        train, _, test = spec.partition("|")
        if train and test:
            return train, test
    elif spec.endswith(":train"):
        return spec, spec[: -len("train")] + "test"
    raise TaskError(f"{kind} needs 'TRAINSPEC|TESTSPEC' (or a spec ending in ':train'), got {spec!r}")


def labelled_pair(kind: str, data: str, size: int, options: EvalOptions):
    """(train images, train set), (test images, test set) of a probe task, both labelled with one classname list."""
    task = f"{kind}:{data}"
    (train_images, train), (test_images, test) = (load_decoded(s, size, options) for s in probe_specs(data, kind))
    need_labels(train, task)
    need_labels(test, task)
    if list(train.classnames) != list(test.classnames):
        raise ValueError(f"task {task!r}: train and test sets have different classnames")
    return (train_images, train), (test_images, test)


@register("linear_probe")
class LinearProbe(Evaluator):
    """linear_probe:TRAIN|TEST: logistic regression on frozen pooled features, C chosen on a fifth of TRAIN
    (linear_probe_top1 and linear_probe_val_top1 in %, linear_probe_C); "linear_probe:X:train" alone means
    "linear_probe:X:train|X:test"."""

    requires = frozenset({"image_features"})

    def data_specs(self, data: str) -> list[str]:
        return list(probe_specs(data, self.name))

    def __call__(self, model, data: str, options: EvalOptions) -> dict[str, float]:
        (train_images, train), (test_images, test) = labelled_pair(self.name, data, model.image_size, options)
        bs, pr = options.batch_size, options.progress
        train_feats = encode_batched(model.image_features, train_images, bs, pr, "train features")
        test_feats = encode_batched(model.image_features, test_images, bs, pr, "test features")
        return linear_probe(train_feats, train.labels, test_feats, test.labels)
