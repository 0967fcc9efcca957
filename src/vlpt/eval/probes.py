"""Linear probe: logistic regression on standardised frozen features.

The inverse regularisation strength C is picked from a small grid on a held-out slice of the training
features, then the probe is refit on all training features and scored on the test features.
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


def _numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(x, y)


def _split(y: np.ndarray, val_fraction: float, seed: int):
    """Train/validation indices, stratified when every class has at least two examples."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 else None
    try:
        return train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=stratify)
    except ValueError:  # too few examples for a stratified split
        return train_test_split(idx, test_size=val_fraction, random_state=seed)


def choose_c(x: np.ndarray, y: np.ndarray, cs: Sequence[float], val_fraction: float, max_iter: int, seed: int) -> float:
    """The C with the best held-out accuracy (the smallest such C on ties); 1.0 when there is too little data."""
    if len(cs) == 1 or len(y) < 10:
        return float(cs[0]) if len(cs) == 1 else 1.0
    tr, va = _split(y, val_fraction, seed)
    if len(np.unique(y[tr])) < 2:
        return 1.0
    scores = [(_fit(x[tr], y[tr], c, max_iter, seed).score(x[va], y[va]), -c) for c in cs]
    return -max(scores)[1]


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
    """{"linear_probe_top1": test accuracy in %}. Features: [N, F] tensors or arrays; labels: ints."""
    from sklearn.preprocessing import StandardScaler

    x_tr, x_te = _numpy(train_feats).astype(np.float64), _numpy(test_feats).astype(np.float64)
    y_tr, y_te = _numpy(train_labels).astype(np.int64), _numpy(test_labels).astype(np.int64)
    if len(np.unique(y_tr)) < 2:
        raise ValueError("a linear probe needs at least two classes in the training labels")
    scaler = StandardScaler().fit(x_tr)
    x_tr, x_te = scaler.transform(x_tr), scaler.transform(x_te)
    c = choose_c(x_tr, y_tr, cs, val_fraction, max_iter, seed)
    clf = _fit(x_tr, y_tr, c, max_iter, seed)
    return {"linear_probe_top1": 100.0 * float(clf.score(x_te, y_te))}


def probe_specs(spec: str) -> tuple[str, str]:
    """The (train, test) data specs of a linear-probe task."""
    if "|" in spec:
        train, _, test = spec.partition("|")
        if train and test:
            return train, test
    elif spec.endswith(":train"):
        return spec, spec[: -len("train")] + "test"
    raise TaskError(f"linear_probe needs 'TRAINSPEC|TESTSPEC' (or a spec ending in ':train'), got {spec!r}")


@register("linear_probe")
class LinearProbe(Evaluator):
    """linear_probe:TRAIN|TEST: logistic regression on frozen pooled features (linear_probe_top1 in %);
    "linear_probe:X:train" alone means "linear_probe:X:train|X:test"."""

    requires = frozenset({"image_features"})

    def data_specs(self, data: str) -> list[str]:
        return list(probe_specs(data))

    def __call__(self, model, data: str, options: EvalOptions) -> dict[str, float]:
        task = f"linear_probe:{data}"
        (train_images, train), (test_images, test) = (load_decoded(s, model.image_size, options)
                                                      for s in probe_specs(data))
        need_labels(train, task)
        need_labels(test, task)
        if list(train.classnames) != list(test.classnames):
            raise ValueError(f"task {task!r}: train and test sets have different classnames")
        bs, pr = options.batch_size, options.progress
        train_feats = encode_batched(model.image_features, train_images, bs, pr, "train features")
        test_feats = encode_batched(model.image_features, test_images, bs, pr, "test features")
        return linear_probe(train_feats, train.labels, test_feats, test.labels)
