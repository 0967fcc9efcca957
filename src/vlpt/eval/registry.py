"""Evaluators as plug-ins: one class per protocol, registered by name, run as tasks "KIND:DATA".

An evaluator declares what it requires of a model (`requires`, from the abilities image_embed,
text_embed, image_features, image_tokens, caption, and those of objectives' heads such as bow_logits;
`requires_any`: at least one of several sets) and which data specs it reads (`data_specs`), and returns
{metric: value} from `evaluator(model, data, options)`. A task names a registered kind
("zeroshot:scenes:colour") or any Evaluator subclass by import path
("my_pkg.evals:Sharpness:scenes:test").
`vlpt eval --task`, `eval.tasks` during training and the final evaluation all come here; every task of a
suite is checked (kind, data syntax, the model's abilities) before any of them runs.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Protocol, Sequence

import torch

from vlpt.errors import UsageError


class EvalModel(Protocol):
    """What evaluators may call (vlpt.inference.Model implements it); images are uint8 [B,3,H,W]."""

    image_size: int
    abilities: frozenset[str]  # which groups below exist: image_embed/text_embed, image_features, image_tokens,
    #                            caption, and what objectives' heads offer through `ability` (bow_logits)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...  # [B,D], unit norm

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...  # [N,D], unit norm

    def image_features(self, images: torch.Tensor) -> torch.Tensor: ...  # [B,F] pooled, unprojected

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor: ...  # [B,N,W] the encoder's last-layer tokens

    def caption(self, images: torch.Tensor) -> list[str]: ...  # one caption each

    def score_texts(self, images: torch.Tensor, texts: list[str], prompt: str = "",
                    normalize: bool = False) -> torch.Tensor: ...  # [B,C] log-likelihoods

    def score_own_texts(self, images: torch.Tensor, texts: list[list[str]]) -> list[torch.Tensor]: ...  # image i: [len(texts[i])]

    def caption_loss(self, images: torch.Tensor, texts: list[str]) -> tuple[float, int]: ...  # (sum NLL, tokens)

    def count_tokens(self, texts: list[str]) -> torch.Tensor: ...  # [N] tokens score_texts sums over

    def ability(self, name: str, images: torch.Tensor) -> torch.Tensor: ...  # an objective's head, e.g. bow_logits [B,V]

    def token_ids(self, texts: list[str]) -> list[list[int]]: ...  # without <sot>, <eot>, padding


class TaskError(UsageError):
    """A task that cannot run: an unknown kind, a malformed data part, a model without what it needs."""


@dataclass
class EvalOptions:
    templates: str | Sequence[str] = "imagenet80"  # zero-shot prompt templates: imagenet80, simple, or a list
    batch_size: int = 256
    progress: bool = False
    samples: list | None = None  # when a list, captioning tasks append one {"image", "caption", "references"} per image
    max_bad_fraction: float = 0.01  # unreadable images a data set may have (data.max_bad_fraction)


class Evaluator:
    """Subclass, set `requires`, implement __call__; register with @register("name") or name it by path."""

    requires: ClassVar[frozenset[str]] = frozenset()
    requires_any: ClassVar[tuple[frozenset[str], ...]] = ()  # when given, the model must also have one of these
    name: ClassVar[str] = ""

    def data_specs(self, data: str) -> list[str]:
        """The data specs this task reads (opened before training starts); TaskError if `data` is malformed."""
        return [data]

    def __call__(self, model, data: str, options: EvalOptions) -> dict[str, float]:
        raise NotImplementedError

    def result_name(self, task: str) -> str:
        """The prefix of this task's metrics: the task itself, less any option that names a file rather than
        changing what is measured (so that runs of one comparison share their metric names)."""
        return task


EVALUATORS: dict[str, type[Evaluator]] = {}


def register(name: str) -> Callable[[type[Evaluator]], type[Evaluator]]:
    def add(cls: type[Evaluator]) -> type[Evaluator]:
        cls.name = name
        EVALUATORS[name] = cls
        return cls

    return add


def kinds() -> list[str]:
    """The registered kinds (the built-in ones register when vlpt.eval is imported)."""
    return list(EVALUATORS)


def _is_import_path(module: str, rest: str) -> bool:
    """"pkg.mod:Class:DATA": `module` names an importable module and `rest` starts with an identifier."""
    import importlib.util

    if not rest.partition(":")[0].isidentifier():
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def parse_task(task: str) -> tuple[type[Evaluator], str]:
    """"KIND:DATA" or "module.path:Class:DATA" -> (the evaluator class, DATA)."""
    from vlpt.plugins import import_class

    head, _, rest = task.partition(":")
    if head not in kinds() and _is_import_path(head, rest):
        cls_name, _, data = rest.partition(":")
        kind = f"{head}:{cls_name}"
        try:
            cls = import_class(kind, Evaluator, "evaluator")
        except ValueError as err:
            raise TaskError(f"task {task!r}: {err}") from None
    else:
        kind, data = head, rest
        known = list(EVALUATORS)
        if kind not in EVALUATORS:
            close = difflib.get_close_matches(kind, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise TaskError(f"unknown evaluation task kind {kind!r} in {task!r}{hint} Known kinds: {', '.join(known)}, "
                            f"or an import path module.path:Class")
        cls = EVALUATORS[kind]
    if not data:
        raise TaskError(f"task {task!r} names no data set; write it as '{kind}:DATASPEC'")
    return cls, data


_WHAT = {"text_embed": "a text embedding (a contrastive model such as clip, siglip or coca)",
         "image_embed": "an image embedding (a contrastive model such as clip, siglip or coca)",
         "caption": "a caption decoder (a captioning model such as cap, cappa or coca)",
         "bow_logits": "a bag-of-words head (objectives.bow_prediction, recipe bow-prediction)",
         "image_features": "an image encoder", "image_tokens": "an image encoder"}


def _needs(missing: frozenset[str]) -> str:
    return _WHAT[sorted(missing, key=list(_WHAT).index)[0]] if missing <= set(_WHAT) else ", ".join(sorted(missing))


def check_task(task: str, abilities: frozenset[str]) -> tuple[Evaluator, str]:
    """(the evaluator, its data) of a task this model can run; TaskError names what is missing."""
    cls, data = parse_task(task)
    missing = cls.requires - abilities
    if missing:
        raise TaskError(f"task {task!r} needs {_needs(missing)}, which this model does not have")
    if cls.requires_any and not any(need <= abilities for need in cls.requires_any):
        needs = " or ".join(dict.fromkeys(_needs(need - abilities) for need in cls.requires_any))
        raise TaskError(f"task {task!r} needs {needs}, which this model does not have")
    evaluator = cls()
    evaluator.data_specs(data)  # a malformed data part fails here
    return evaluator, data


def run_task(task: str, model, templates="imagenet80", progress: bool = True, batch_size: int = 256,
             samples: dict | None = None, max_bad_fraction: float = 0.01) -> dict[str, float]:
    """Run one task on a model of the evaluation contract (vlpt.inference.Model); "<task>/<metric>"."""
    evaluator, data = check_task(task, model.abilities)
    options = EvalOptions(templates, batch_size, progress, None if samples is None else [], max_bad_fraction)
    metrics = evaluator(model, data, options)
    if options.samples:
        samples[task] = options.samples
    prefix = evaluator.result_name(task)
    return {f"{prefix}/{name}": float(value) for name, value in metrics.items()}


def run_suite(tasks: Sequence[str], model, **kw) -> dict[str, float]:
    """Every task, all checked first (a typo or a task the model cannot do fails before any work)."""
    for task in tasks:
        check_task(task, model.abilities)
    out: dict[str, float] = {}
    for task in tasks:
        out.update(run_task(task, model, **kw))
    return out


def write_samples(samples: dict[str, list[dict]], path: str | Path) -> Path:
    """Save the records that captioning tasks collected (`run_task(samples=...)`) as JSON."""
    path = Path(path)
    path.write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n")
    return path
