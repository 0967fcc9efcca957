"""Evaluators of caption decoders (Cap, CapPa, CoCa): generated captions, zero-shot classification by
likelihood, and the caption loss."""
from __future__ import annotations

import torch

from vlpt.data.dataset import ImageTextSet
from vlpt.eval.captioning import caption_metrics
from vlpt.eval.data import load_decoded, need_labels, references_by_image
from vlpt.eval.batching import batched
from vlpt.eval.registry import EvalOptions, Evaluator, register
from vlpt.eval.zeroshot import accuracies

DECODER_BATCH = 64  # images per decoder call: beam search and class scoring multiply the work per image


def run_captioning(model, images: torch.Tensor, ds: ImageTextSet, batch_size: int = DECODER_BATCH,
                   progress: bool = False) -> tuple[dict[str, float], list[dict]]:
    """Caption every image that has captions; (caption metrics, one record per image)."""
    refs = references_by_image(ds)
    keep = sorted(refs)
    if not keep:
        raise ValueError(f"data set {ds.name!r} has no captions to compare with")
    idx = torch.tensor(keep)
    chunks = batched(lambda a, b: list(model.caption(images[idx[a:b]])), len(keep), batch_size, progress, "captioning")
    captions = [c for chunk in chunks for c in chunk]
    if len(captions) != len(keep):
        raise ValueError(f"model.caption returned {len(captions)} captions for {len(keep)} images")
    predictions = dict(zip(keep, captions))
    records = [{"image": str(ds.images[i]), "caption": predictions[i], "references": refs[i]} for i in keep]
    return caption_metrics(predictions, {i: refs[i] for i in keep}), records


@register("captioning")
class Captioning(Evaluator):
    """captioning:DATA: one beam-search caption per image against all of its captions (bleu1..4, cider)."""

    requires = frozenset({"caption"})

    def __call__(self, model, data: str, options: EvalOptions) -> dict[str, float]:
        images, ds = load_decoded(data, model.image_size, options)
        metrics, records = run_captioning(model, images, ds, min(options.batch_size, DECODER_BATCH), options.progress)
        if options.samples is not None:
            options.samples.extend(records)
        return metrics


@register("zeroshot_captioner")
class ZeroShotCaptioner(Evaluator):
    """zeroshot_captioner:DATA: each class name (no prompt) scored by the sum of its token log-likelihoods
    given the image (CapPa's protocol); top1, top5 in %."""

    requires = frozenset({"caption"})

    def __call__(self, model, data: str, options: EvalOptions) -> dict[str, float]:
        images, ds = load_decoded(data, model.image_size, options)
        need_labels(ds, f"zeroshot_captioner:{data}")
        labels = torch.as_tensor(ds.labels, dtype=torch.long)
        names = list(ds.classnames)
        bs = min(options.batch_size, DECODER_BATCH)
        scores = batched(lambda a, b: model.score_texts(images[a:b], names, prompt="", normalize=False).float().cpu(),
                         len(images), bs, options.progress, "scoring classes")
        return accuracies(torch.cat(scores), labels)


@register("caption_loss")
class CaptionLoss(Evaluator):
    """caption_loss:DATA: cross-entropy per token over all captions, each with its own image (loss);
    compare a captioner with its blind twin."""

    requires = frozenset({"caption"})

    def __call__(self, model, data: str, options: EvalOptions) -> dict[str, float]:
        images, ds = load_decoded(data, model.image_size, options)
        if not ds.captions:
            raise ValueError(f"data set {ds.name!r} has no captions")
        owner = torch.as_tensor(ds.caption_image, dtype=torch.long)
        sums = batched(lambda a, b: model.caption_loss(images[owner[a:b]], ds.captions[a:b]),
                       len(ds.captions), min(options.batch_size, DECODER_BATCH), options.progress, "caption loss")
        nll = sum(float(s) for s, _ in sums)
        tokens = sum(int(n) for _, n in sums)
        return {"loss": nll / tokens}
