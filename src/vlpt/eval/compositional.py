"""Compositionality: does the model prefer the true caption to the same words in a wrong order or with
swapped parts? Three tasks, each scored by every scorer the model has (see `choice`: cosine for contrastive
models; likelihood with its blank-image, blind-twin and length controls for captioners; CoCa both):

  order:DATA          ARO's four order perturbations of every caption of DATA (`perturb`); precision@1 of the
                      true caption among it and its perturbations, and per perturbation true vs that one
  swaps:scenes        the built-in relation scenes: true caption vs the two objects swapped, and vs their
                      colours swapped; accuracy per relation and macro accuracy over relations
  sugarcrepe:DIR      SugarCrepe hard negatives (`vlpt.data.sugarcrepe`): accuracy per category, and their mean

Metrics are named GROUP/SCORER, e.g. order:flickr8k:test/nouns_adjectives/likelihood, in %. Options follow
the data as `:NAME=VALUE`: `blind=RUN` (every task) adds the blind twin's column (and is left out of the
metrics' names: `swaps:scenes:blind=runs/b` reports `swaps:scenes/...`), `seed=N` (order) draws other
perturbations.
"""
from __future__ import annotations

from typing import ClassVar

from vlpt.data.scenes import RELATIONS, relation_set
from vlpt.data.sugarcrepe import read_pairs
from vlpt.errors import VlptError
from vlpt.eval import perturb
from vlpt.eval.choice import (CAPTION, CONTRASTIVE, Question, credits, load_blind, mean_by, question,
                              score_options, task_options)
from vlpt.eval.data import load_decoded
from vlpt.eval.registry import EvalOptions, Evaluator, TaskError, register

BLIND = {"blind": "blind=RUN"}


class ChoiceEvaluator(Evaluator):
    """Shared by the compositional tasks: options, the blind twin, scoring and per-group accuracies."""

    requires_any = (CONTRASTIVE, CAPTION)
    known_options: ClassVar[dict[str, str]] = BLIND  # option name -> how help shows it

    def parse(self, data: str) -> tuple[str, dict[str, str]]:
        """(the task's data without its options, the options), checked."""
        task = f"{self.name}:{data}"
        spec, opts = task_options(task, data, self.known_options)
        if "blind" in opts:
            from vlpt.train import checkpoint

            try:
                checkpoint.find(opts["blind"])
            except VlptError as err:
                raise TaskError(f"task {task!r}: blind={opts['blind']}: {err}") from None
        return spec, opts

    def result_name(self, task: str) -> str:
        """Without `:blind=RUN`: the blind twin is a column of the results ("blind"), not another task."""
        data = task.partition(":")[2]
        spec, opts = task_options(task, data, self.known_options)
        return ":".join([self.name, spec, *(f"{k}={v}" for k, v in reversed(opts.items()) if k != "blind")])

    def scores(self, model, data: str, images, questions: list[Question], options: EvalOptions) -> dict:
        opts = self.parse(data)[1]
        blind = None
        if "blind" in opts:
            if "caption" not in model.abilities:
                raise TaskError(f"task '{self.name}:{data}': blind=RUN is a control of likelihood scores, and this "
                                f"model has no caption decoder")
            blind = load_blind(opts["blind"], f"{self.name}:{data}", getattr(model, "device", "cpu"))
        return score_options(model, images, questions, blind, options.batch_size, options.progress)


def grouped(labels: list[str], scores: dict, order: list[str] | None = None) -> dict[str, float]:
    """{LABEL/SCORER: %} over the questions of each label; labels in `order` (default: as they come), each
    label's scorers side by side (a result next to its controls)."""
    per_scorer = {name: mean_by(labels, values) for name, values in credits(scores).items()}
    return {f"{label}/{name}": by_label[label] for label in order or dict.fromkeys(labels)
            for name, by_label in per_scorer.items() if label in by_label}


def macro(metrics: dict[str, float], name: str) -> dict[str, float]:
    """The unweighted mean over groups: HEAD/GROUP/SCORER metrics -> HEAD/`name`/SCORER (HEAD may be absent)."""
    groups: dict[str, list[float]] = {}
    for key, value in metrics.items():
        rest, _, scorer = key.rpartition("/")
        head = rest.rpartition("/")[0]
        groups.setdefault(f"{head}/{name}/{scorer}" if head else f"{name}/{scorer}", []).append(value)
    return {key: sum(vs) / len(vs) for key, vs in groups.items()}


@register("order")
class Order(ChoiceEvaluator):
    """order:DATA[:seed=N][:blind=RUN]: ARO's order perturbations of every caption (precision@1 of 5, and the
    true caption vs each perturbation), in %."""

    known_options = {**BLIND, "seed": "seed=N"}

    def data_specs(self, data: str) -> list[str]:
        spec, opts = self.parse(data)
        if "seed" in opts and not opts["seed"].isdigit():
            raise TaskError(f"task 'order:{data}': seed={opts['seed']} is not a whole number (seed=0, seed=1, ...)")
        try:
            perturb.load_tagger()
        except (ImportError, OSError) as err:
            raise TaskError(f"task 'order:{data}' needs a part-of-speech tagger ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]}); {perturb.INSTALL}") from None
        return [spec]

    def __call__(self, model, data: str, options: EvalOptions) -> dict[str, float]:
        (spec,), opts = self.data_specs(data), self.parse(data)[1]
        images, ds = load_decoded(spec, model.image_size, options)
        if not ds.captions:
            raise ValueError(f"data set {ds.name!r} has no captions to perturb")
        kinds = perturb.PERTURBATIONS
        questions, labels = [], []
        for variants, image in zip(perturb.perturbations(ds.captions, int(opts.get("seed", 0))), ds.caption_image):
            for label, wrong in (("precision@1", kinds), *((k, (k,)) for k in kinds)):
                q = question(image, variants["caption"], [variants[w] for w in wrong])
                if q is not None:
                    questions.append(q)
                    labels.append(label)
        if not questions:
            raise ValueError(f"no caption of {ds.name!r} has a word order that a perturbation can change")
        return grouped(labels, self.scores(model, data, images, questions, options), ["precision@1", *kinds])


@register("swaps")
class Swaps(ChoiceEvaluator):
    """swaps:scenes[:blind=RUN]: relation scenes, the true caption vs the objects swapped and vs their colours
    swapped; accuracy per relation and the macro mean over relations, in %."""

    def data_specs(self, data: str) -> list[str]:
        spec = self.parse(data)[0]
        if spec not in ("scenes", "scenes:relation"):
            raise TaskError(f"task 'swaps:{data}': swaps runs on the built-in relation scenes only; write it "
                            f"as 'swaps:scenes'")
        return ["scenes:relation"]

    def __call__(self, model, data: str, options: EvalOptions) -> dict[str, float]:
        images, ds = load_decoded(self.data_specs(data)[0], model.image_size, options)
        items = relation_set(ds.num_images)[1]  # the same scenes as the "scenes:relation" split
        questions, labels = [], []
        for it in items:
            for swap, key in (("objects", "swap_objects"), ("attributes", "swap_attributes")):
                # never None: the two objects of a relation scene differ in colour and in shape
                questions.append(question(it["image"], it["true"], [it[key]]))
                labels.append(f"{swap}/{it['relation']}")
        order = [f"{swap}/{rel}" for swap in ("objects", "attributes") for rel in RELATIONS]
        per_relation = grouped(labels, self.scores(model, data, images, questions, options), order)
        return {**per_relation, **macro(per_relation, "macro")}


@register("sugarcrepe")
class SugarCrepe(ChoiceEvaluator):
    """sugarcrepe:DIR[:blind=RUN]: hard-negative pairs in the SugarCrepe format, the true caption vs its
    negative; accuracy per category (the file's name) and the mean over categories, in %."""

    def data_specs(self, data: str) -> list[str]:
        return [f"sugarcrepe:{self.parse(data)[0]}"]

    def __call__(self, model, data: str, options: EvalOptions) -> dict[str, float]:
        spec = self.data_specs(data)[0]
        images, ds = load_decoded(spec, model.image_size, options)
        decoded = {str(ref): i for i, ref in enumerate(ds.images)}  # images that failed to decode are skipped
        questions, labels = [], []
        for pair in read_pairs(spec.partition(":")[2]):
            q = question(decoded[pair.image], pair.caption, [pair.negative]) if pair.image in decoded else None
            if q is not None:
                questions.append(q)
                labels.append(pair.category)
        if not questions:
            raise ValueError(f"{spec}: no pair whose image could be read and whose negative differs from its caption")
        per_category = grouped(labels, self.scores(model, data, images, questions, options))
        return {**per_category, **macro(per_category, "mean")}
