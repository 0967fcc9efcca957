"""The evaluation suite: run tasks named "KIND:DATASPEC" against a model exposing the eval contract.

Task kinds (contrastive ones need a text embedding, captioner ones a text decoder):
  zeroshot:DATASPEC              zero-shot classification of a labelled set (top1, top5)
  retrieval:DATASPEC             image<->text retrieval over a captioned set (t2i_R@K, i2t_R@K)
  linear_probe:TRAINSPEC|TESTSPEC  logistic regression on frozen pooled features (linear_probe_top1);
                                 "linear_probe:X:train" alone means "linear_probe:X:train|X:test"
  captioning:DATASPEC            one generated caption per image of a captioned set against all of that
                                 image's captions (bleu1..bleu4, cider; see eval.captioning)
  zeroshot_captioner:DATASPEC    zero-shot classification by captioner likelihood (CapPa): each class
                                 name (no prompt) scored by the sum of its token log-likelihoods (top1, top5)
  caption_loss:DATASPEC          mean per-token caption cross-entropy over a captioned set's captions (loss);
                                 compares a captioner with its blind (image-free) twin
DATASPEC is anything `vlpt.data.sources.open_source` understands. Metrics come back as
"<task>/<metric>", e.g. "zeroshot:scenes:colour_shape/top1". Decoded data sets are cached per
(spec, image size) for the life of the process, so periodic evaluation decodes each set once.
Generated captions can be kept: pass `samples={}` and each captioning task fills `samples[task]` with
one {"image", "caption", "references"} record per image (`write_samples` saves them as JSON).
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from vlpt.data import sources
from vlpt.data.dataset import ImageTextSet
from vlpt.eval import encode_batched
from vlpt.eval.captioning import caption_metrics
from vlpt.eval.probes import linear_probe
from vlpt.eval.retrieval import retrieval
from vlpt.eval.zeroshot import topk_accuracy, zeroshot_classify

KINDS = ("zeroshot", "retrieval", "linear_probe", "captioning", "zeroshot_captioner", "caption_loss")
NEEDS_TEXT_EMBED = ("zeroshot", "retrieval")
NEEDS_DECODER = ("captioning", "zeroshot_captioner", "caption_loss")
DECODER_BATCH = 64  # images per decoder call: beam search and class scoring multiply the work per image


class EvalModel(Protocol):
    """What the evaluators need from a model (see "Evaluation contract" in the interfaces)."""

    image_size: int

    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...  # uint8 [B,3,H,W] -> [B,D], unit norm

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...  # -> [N,D], unit norm

    def image_features(self, images: torch.Tensor) -> torch.Tensor: ...  # uint8 [B,3,H,W] -> [B,F] pooled

    # What the model can do; read with getattr, so a model without them counts as contrastive-only.
    has_text_embed: bool  # encode_texts exists (contrastive tasks)
    has_decoder: bool  # the three methods below exist (captioner tasks)

    def caption(self, images: torch.Tensor) -> list[str]: ...  # uint8 [B,3,H,W] -> one caption each

    def score_texts(  # [B,C] log-likelihood of each text given each image
        self, images: torch.Tensor, texts: list[str], prompt: str = "", normalize: bool = False
    ) -> torch.Tensor: ...

    def caption_loss(self, images: torch.Tensor, texts: list[str]) -> tuple[float, int]: ...  # (sum NLL, tokens)


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


def check_model(task: str, model: EvalModel) -> None:
    """A clear error when the model lacks what the task's kind needs."""
    kind, _ = parse_task(task)
    if kind in NEEDS_TEXT_EMBED and not getattr(model, "has_text_embed", True):
        raise ValueError(f"task {task!r} needs a text embedding, which this model (a captioner) does not have; "
                         f"use zeroshot_captioner / captioning / caption_loss tasks instead")
    if kind in NEEDS_DECODER and not getattr(model, "has_decoder", False):
        raise ValueError(f"task {task!r} needs a text decoder (a captioning model such as cap, cappa or coca); "
                         f"this model has none")


def references_by_image(ds: ImageTextSet) -> dict[int, list[str]]:
    """Every caption of each image that has one, keyed by image index."""
    refs: dict[int, list[str]] = {}
    for caption, image in zip(ds.captions, ds.caption_image):
        refs.setdefault(image, []).append(caption)
    return refs


def _batched(fn: Callable, n: int, batch_size: int, progress: bool, desc: str) -> list:
    """[fn(start, stop) for each batch] under no_grad, with a progress bar."""
    with torch.no_grad():
        return [fn(a, min(a + batch_size, n))
                for a in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False)]


def run_captioning(model: EvalModel, images: torch.Tensor, ds: ImageTextSet, batch_size: int = DECODER_BATCH,
                   progress: bool = False) -> tuple[dict[str, float], list[dict]]:
    """Caption every image that has captions; (caption metrics, one record per image)."""
    refs = references_by_image(ds)
    keep = sorted(refs)
    if not keep:
        raise ValueError(f"data set {ds.name!r} has no captions to compare with")
    idx = torch.tensor(keep)
    chunks = _batched(lambda a, b: list(model.caption(images[idx[a:b]])), len(keep), batch_size, progress, "captioning")
    captions = [c for chunk in chunks for c in chunk]
    if len(captions) != len(keep):
        raise ValueError(f"model.caption returned {len(captions)} captions for {len(keep)} images")
    predictions = dict(zip(keep, captions))
    records = [{"image": str(ds.images[i]), "caption": predictions[i], "references": refs[i]} for i in keep]
    return caption_metrics(predictions, {i: refs[i] for i in keep}), records


def run_zeroshot_captioner(model: EvalModel, images: torch.Tensor, ds: ImageTextSet, batch_size: int = DECODER_BATCH,
                           progress: bool = False) -> dict[str, float]:
    """Predict the class whose name the captioner finds most likely (sum of log-likelihoods, no prompt)."""
    labels = torch.as_tensor(ds.labels, dtype=torch.long)
    names = list(ds.classnames)
    scores = _batched(lambda a, b: model.score_texts(images[a:b], names, prompt="", normalize=False).float().cpu(),
                      len(images), batch_size, progress, "scoring classes")
    logits = torch.cat(scores)
    out = {"top1": topk_accuracy(logits, labels, 1)}
    if len(ds.classnames) > 5:
        out["top5"] = topk_accuracy(logits, labels, 5)
    return out


def run_caption_loss(model: EvalModel, images: torch.Tensor, ds: ImageTextSet, batch_size: int = DECODER_BATCH,
                     progress: bool = False) -> dict[str, float]:
    """Cross-entropy per token over all captions (each with its own image): total NLL / total tokens."""
    if not ds.captions:
        raise ValueError(f"data set {ds.name!r} has no captions")
    owner = torch.as_tensor(ds.caption_image, dtype=torch.long)
    sums = _batched(lambda a, b: model.caption_loss(images[owner[a:b]], ds.captions[a:b]),
                    len(ds.captions), batch_size, progress, "caption loss")
    nll = sum(float(s) for s, _ in sums)
    tokens = sum(int(n) for _, n in sums)
    return {"loss": nll / tokens}


def write_samples(samples: dict[str, list[dict]], path: str | Path) -> Path:
    """Save the records that captioning tasks collected (see `run_task(samples=...)`) as JSON."""
    path = Path(path)
    path.write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n")
    return path


def _need_labels(ds: ImageTextSet, task: str) -> None:
    if ds.labels is None or ds.classnames is None:
        raise ValueError(f"task {task!r}: data set {ds.name!r} has no labels/classnames")


def run_task(
    task: str, model: EvalModel, templates="imagenet80", progress: bool = True, batch_size: int = 256,
    samples: dict[str, list[dict]] | None = None,
) -> dict[str, float]:
    """Run one task; metrics named "<task>/<metric>". `samples`, if given, receives generated captions."""
    kind, spec = parse_task(task)
    check_model(task, model)
    size = model.image_size
    decoder_batch = min(batch_size, DECODER_BATCH)
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
    elif kind == "captioning":
        images, ds = load_decoded(spec, size, progress)
        metrics, records = run_captioning(model, images, ds, decoder_batch, progress)
        if samples is not None:
            samples[task] = records
    elif kind == "zeroshot_captioner":
        images, ds = load_decoded(spec, size, progress)
        _need_labels(ds, task)
        metrics = run_zeroshot_captioner(model, images, ds, decoder_batch, progress)
    elif kind == "caption_loss":
        images, ds = load_decoded(spec, size, progress)
        metrics = run_caption_loss(model, images, ds, decoder_batch, progress)
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
    """Run every task (all are checked first, so a typo or a task the model cannot do fails before any work)
    and merge the metrics."""
    for task in tasks:
        check_model(task, model)
    out: dict[str, float] = {}
    for task in tasks:
        out.update(run_task(task, model, **kw))
    return out
