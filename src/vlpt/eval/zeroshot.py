"""Zero-shot classification with a prompt-ensembled text classifier (CLIP protocol).

Per class: embed every template filled with the class name, L2-normalise each embedding, average,
renormalise. Predict the class with the highest cosine similarity to the (normalised) image embedding.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from vlpt.eval.batching import encode_batched
from vlpt.eval.data import load_decoded, need_labels
from vlpt.eval.registry import EvalOptions, Evaluator, register
from vlpt.eval.templates import fill, get_templates


def classifier_weights(
    encode_texts: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: str | Sequence[str] = "imagenet80",
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """The zero-shot classifier: one unit vector per class, float [C, D]."""
    templates = get_templates(templates)
    prompts = [fill(t, c) for c in classnames for t in templates]
    emb = encode_batched(encode_texts, prompts, batch_size, progress, "class prompts")
    emb = F.normalize(emb, dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """% of rows whose label is among the k highest logits."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return 100.0 * (top == labels[:, None]).any(dim=1).double().mean().item()


def zeroshot_classify(
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    encode_texts: Callable[[list[str]], torch.Tensor],
    images: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    classnames: Sequence[str],
    templates: str | Sequence[str] = "imagenet80",
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, float]:
    """{"top1": %, "top5": %} (top5 only with more than 5 classes) over uint8 `images` [N,3,H,W]."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    weights = classifier_weights(encode_texts, classnames, templates, batch_size, progress)
    feats = F.normalize(encode_batched(encode_images, images, batch_size, progress, "images"), dim=-1)
    return accuracies(feats @ weights.T, labels)


def accuracies(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """{"top1": %, "top5": %} of class scores [N,C]; top5 only with more than 5 classes."""
    out = {"top1": topk_accuracy(logits, labels, 1)}
    if logits.shape[1] > 5:
        out["top5"] = topk_accuracy(logits, labels, 5)
    return out


@register("zeroshot")
class ZeroShot(Evaluator):
    """zeroshot:DATA: a labelled set classified by prompt-ensembled text embeddings (top1, top5 in %)."""

    requires = frozenset({"image_embed", "text_embed"})

    def __call__(self, model, data: str, options: EvalOptions) -> dict[str, float]:
        images, ds = load_decoded(data, model.image_size, options)
        need_labels(ds, f"zeroshot:{data}")
        return zeroshot_classify(model.encode_images, model.encode_texts, images, ds.labels, ds.classnames,
                                 options.templates, options.batch_size, options.progress)
