"""Picking the true caption of an image among wrong ones: each model scores the options its own way, and
every likelihood score comes with its controls (METHODS.md, "Evaluation protocols").

Scorers, each a column of the results:
  cosine           image_embed . text_embed (a contrastive model: clip, siglip, coca)
  likelihood       the caption decoder's log-likelihood of the option given the image (sum over its tokens,
                   <eot> included; cap, cappa, coca)
  blank_image      the same decoder given a mid-grey image instead of the real one
  blind            the blind twin's log-likelihood (the task's `blind=RUN` option: the recipe trained with
                   model.decoder.blind=true)
  length_baseline  prefer the shorter text: minus its number of tokens as the decoder scores them
A question counts as answered when the true caption scores highest. A tie for the top among k options counts
1/k, the expected score of breaking it at random: deterministic, and chance when all options are equally long.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from vlpt.progress import bar

from vlpt.eval.batching import encode_batched
from vlpt.eval.registry import TaskError

SCORERS = ("cosine", "likelihood")  # the model's own answers
CONTROLS = ("blank_image", "blind", "length_baseline")  # what a likelihood score must beat to say it looked
CONTRASTIVE = frozenset({"image_embed", "text_embed"})
CAPTION = frozenset({"caption"})
MID_GREY = 128
TEXT_BATCH = 256  # options scored per call against one blank image
IMAGE_BATCH = 64  # images whose own options are scored in one call


@dataclass(frozen=True)
class Question:
    image: int  # index into the evaluated images
    options: tuple[str, ...]  # the true caption first, then distinct wrong ones


def question(image: int, true: str, wrong: Sequence[str]) -> Question | None:
    """The question, with wrong options equal to the true caption (or to each other) dropped; None when
    no wrong option is left (a perturbation that could not change the caption is no question)."""
    options = tuple(dict.fromkeys([true, *wrong]))
    return Question(image, options) if len(options) > 1 else None


def credit(scores: torch.Tensor) -> float:
    """1 when option 0 alone scores highest, 1/k when it ties with k-1 others for the top, else 0."""
    top = scores == scores.max()
    return float(top[0]) / int(top.sum())


def _text_only(score: Callable[[list[str]], torch.Tensor], texts: list[str], progress: bool, desc: str) -> torch.Tensor:
    chunks = range(0, len(texts), TEXT_BATCH)
    with torch.no_grad():
        return torch.cat([score(texts[a : a + TEXT_BATCH]).float().cpu().reshape(-1)
                          for a in bar(chunks, progress, desc=desc, leave=False)])


def blank(size: int) -> torch.Tensor:
    """One mid-grey uint8 image [1,3,size,size]."""
    return torch.full((1, 3, size, size), MID_GREY, dtype=torch.uint8)


def score_options(model, images: torch.Tensor, questions: Sequence[Question], blind=None, batch_size: int = 256,
                  progress: bool = False) -> dict[str, list[torch.Tensor]]:
    """{scorer: per question the scores of its options} for every scorer this model (and twin) has."""
    texts = list(dict.fromkeys(t for q in questions for t in q.options))
    index = {t: i for i, t in enumerate(texts)}
    rows = [torch.tensor([index[t] for t in q.options]) for q in questions]
    out: dict[str, list[torch.Tensor]] = {}
    if CONTRASTIVE <= model.abilities:
        used = sorted({q.image for q in questions})
        place = {image: r for r, image in enumerate(used)}
        img = F.normalize(encode_batched(model.encode_images, images[used], batch_size, progress, "images"), dim=-1)
        txt = F.normalize(encode_batched(model.encode_texts, texts, batch_size, progress, "options"), dim=-1)
        out["cosine"] = [txt[r] @ img[place[q.image]] for q, r in zip(questions, rows)]
    if "caption" in model.abilities:
        out["likelihood"] = _likelihoods(model, images, questions, progress)
        grey = blank(model.image_size)
        per_text = {"blank_image": _text_only(lambda t: model.score_texts(grey, t), texts, progress, "blank image")}
        if blind is not None:
            grey_b = blank(blind.image_size)
            per_text["blind"] = _text_only(lambda t: blind.score_texts(grey_b, t), texts, progress, "blind twin")
        per_text["length_baseline"] = -torch.as_tensor(model.count_tokens(texts)).float().reshape(-1)
        out.update({name: [scores[r] for r in rows] for name, scores in per_text.items()})
    return out


def _likelihoods(model, images: torch.Tensor, questions: Sequence[Question], progress: bool) -> list[torch.Tensor]:
    """Each image is scored once against every option any of its questions has, IMAGE_BATCH images a call."""
    by_image: dict[int, dict[str, None]] = {}
    for q in questions:
        by_image.setdefault(q.image, {}).update(dict.fromkeys(q.options))
    items = list(by_image.items())
    scores: dict[tuple[int, str], float] = {}
    with torch.no_grad():
        for a in bar(range(0, len(items), IMAGE_BATCH), progress, desc="likelihoods", leave=False):
            block = items[a : a + IMAGE_BATCH]
            rows = model.score_own_texts(images[[image for image, _ in block]], [list(t) for _, t in block])
            for (image, texts), row in zip(block, rows):
                scores.update(zip(((image, t) for t in texts), row.float().cpu().tolist()))
    return [torch.tensor([scores[q.image, t] for t in q.options]) for q in questions]


def credits(scores: Mapping[str, list[torch.Tensor]]) -> dict[str, list[float]]:
    return {name: [credit(s) for s in per_question] for name, per_question in scores.items()}


def mean_by(labels: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    """% per label (in order of first appearance)."""
    groups: dict[str, list[float]] = {}
    for label, v in zip(labels, values):
        groups.setdefault(label, []).append(v)
    return {label: 100.0 * sum(vs) / len(vs) for label, vs in groups.items()}


# ---------------------------------------------------------------------------------------- task options
def task_options(task: str, data: str, known: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """"flickr8k:test:seed=1:blind=runs/b" -> ("flickr8k:test", {"seed": "1", "blind": "runs/b"}): trailing
    `:NAME=VALUE` parts are options of the task; `known` maps each name to its help ("blind=RUN")."""
    parts, opts = data.split(":"), {}
    while len(parts) > 1 and re.fullmatch(r"[a-z_]+=.*", parts[-1]):
        name, _, value = parts.pop().partition("=")
        if name not in known:
            raise TaskError(f"task {task!r}: unknown option {name!r}; options: {', '.join(known.values())}")
        if name in opts:
            raise TaskError(f"task {task!r}: option {name!r} given twice")
        opts[name] = value
    return ":".join(parts), opts


def load_blind(run: str, task: str, device="cpu"):
    """The blind twin of a `blind=RUN` option; TaskError unless it is a caption decoder without images."""
    from vlpt.inference import load

    twin = load(run, device)
    if "caption" not in twin.abilities or twin.model.visual is not None:
        raise TaskError(f"task {task!r}: blind={run} is not a blind captioner; give a run trained with "
                        f"model.decoder.blind=true (e.g. vlpt train cap model.decoder.blind=true)")
    return twin
