"""Zero-shot classification with a bag-of-words head (CLIP's BoW prediction baseline, Radford et al. 2021).

Each class is scored by the mean log-probability, under the head's softmax over the vocabulary, of the
distinct tokens of its name (a word is one event of the bag, as in the training target); argmax. The name
alone, no prompt templates: a template's tokens are common to every class, so they would only dilute each
name's mean by a length that differs between names.
"""
from __future__ import annotations

from typing import Sequence

import torch

from vlpt.eval.batching import batched
from vlpt.eval.data import load_decoded, need_labels
from vlpt.eval.registry import EvalOptions, Evaluator, register
from vlpt.eval.zeroshot import accuracies


def name_means(token_ids: Sequence[Sequence[int]], classnames: Sequence[str]) -> torch.Tensor:
    """[C, 1 + the highest id]: row c averages over the distinct tokens of class c's name."""
    if any(not ids for ids in token_ids):
        empty = next(name for name, ids in zip(classnames, token_ids) if not ids)
        raise ValueError(f"class name {empty!r} has no tokens to score")
    rows = torch.zeros(len(token_ids), 1 + max(max(ids) for ids in token_ids))
    for c, ids in enumerate(token_ids):
        rows[c, sorted(set(ids))] = 1.0
    return rows / rows.sum(1, keepdim=True)


def bow_scores(logits: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits [B,V] -> class scores [B,C]: each class's mean token log-probability."""
    return logits.float().log_softmax(-1)[:, : means.shape[1]] @ means.T


@register("zeroshot_bow")
class ZeroShotBow(Evaluator):
    """zeroshot_bow:DATA: each class name scored by the mean log-probability of its distinct tokens under a
    bag-of-words head (no prompt; eval.templates does not apply); top1, top5 in %."""

    requires = frozenset({"bow_logits"})

    def __call__(self, model, data: str, options: EvalOptions) -> dict[str, float]:
        images, ds = load_decoded(data, model.image_size, options)
        need_labels(ds, f"zeroshot_bow:{data}")
        labels = torch.as_tensor(ds.labels, dtype=torch.long)
        means = name_means(model.token_ids(list(ds.classnames)), ds.classnames)
        scores = batched(lambda a, b: bow_scores(model.ability("bow_logits", images[a:b]).cpu(), means),
                         len(images), options.batch_size, options.progress, "scoring classes")
        return accuracies(torch.cat(scores), labels)
