"""Plan, train and resume the runs of a comparison: every recipe on the same data, encoder, seeds, budget
(train.samples) and evaluation suite, one run folder per (recipe, budget, seed) under DIR/runs.

A finished run (results.json beside its final checkpoint) is never retrained; an unfinished one continues
from its last checkpoint with the training loop's resume machinery, so an interrupted compare resumes.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vlpt import config as config_lib
from vlpt.config import Config
from vlpt.errors import UsageError
from vlpt.eval.defaults import resolve_tasks
from vlpt.eval.registry import TaskError, check_task


@dataclass
class PlannedRun:
    name: str  # RECIPE-seedS, or RECIPE-xM-seedS for a budget M times the base one
    cfg: Config
    skipped: dict[str, str] = field(default_factory=dict)  # task of the suite this recipe cannot run -> why
    flops: dict | None = None  # --flops: {"flops", "flops_per_sample"}, saved as the run's budget.json


def run_name(recipe: str, multiple: float, seed: int) -> str:
    scale = "" if multiple == 1 else f"-x{multiple:g}"
    return f"{recipe}{scale}-seed{seed}"


def sees_and_captions(cfg: Config) -> bool:
    """A captioner that looks at the image: the recipes that get a blind twin (`--with-blind`)."""
    return "captioning" in cfg.objectives and not cfg.model.decoder.blind


def blind_overrides(cfg: Config) -> dict:
    """The recipe's blind twin (the Cap paper's blind baseline, METHODS.md): the same caption decoder and
    training with no image input, so its other objectives (CoCa's contrastive half) go, and it evaluates
    nothing itself: it is a column of its sighted twin's likelihood-scored compositional results."""
    return {"model": {"decoder": {"blind": True}}, "eval": {"tasks": []},
            "objectives": {name: False for name in cfg.objectives if name != "captioning"}}


def with_blind_column(tasks: list[str], twin: Path) -> list[str]:
    """The tasks, each likelihood-scored compositional one given the twin as its `blind=RUN` control."""
    from vlpt.eval.registry import parse_task

    return [f"{t}:blind={twin}" if "blind" in getattr(parse_task(t)[0], "known_options", {}) else t for t in tasks]


def suite(cfgs: list[Config], explicit: bool) -> list[str]:
    """The one evaluation suite of a comparison: eval.tasks as given (`explicit`), else the union, in order,
    of what each recipe's own tasks ("auto" expanded for its abilities) resolve to."""
    from vlpt.train.pretrainer import abilities

    tasks: list[str] = []
    for cfg in cfgs:
        entries = [t.task for t in cfg.eval.tasks]
        own = entries if explicit else resolve_tasks(entries, cfg.data.source, abilities(cfg))
        tasks += [t for t in own if t != "auto" and t not in tasks]
    return tasks


def split_runnable(tasks: list[str], cfg: Config) -> tuple[list[str], dict[str, str]]:
    """(the tasks this recipe's model can run, {task: why not} for the others)."""
    from vlpt.train.pretrainer import abilities

    able, runnable, skipped = abilities(cfg), [], {}
    for task in tasks:
        try:
            check_task(task, able)
            runnable.append(task)
        except TaskError as err:
            skipped[task] = str(err)
    return runnable, skipped


BUDGET_FILE = "budget.json"  # {"flops", "flops_per_sample"}: a --flops run's budget, read back by the report
PROBES = ("linear_probe", "attentional_probe")  # each trains a classifier: evaluated once, at the end


def _entries(tasks: list[str]) -> list:
    """eval.tasks entries: probes at the end only, every other task at the compare's evaluation points."""
    return [{"task": t, "every_steps": 0} if t.partition(":")[0] in PROBES else t for t in tasks]


def plan(recipes: list[str], overrides: list[str], samples: int | None, seeds: int, multiples: list[float],
         points: int, runs_dir: Path | None = None, with_blind: bool = False,
         flops: float | None = None) -> list[PlannedRun]:
    """Every run of the comparison, each config resolved and checked before any training. The budget is
    `samples` seen by every recipe, or `flops` of training (each recipe's samples from its counted FLOPs per
    sample, vlpt.train.flops). With `with_blind`, each captioner's blind twin (RECIPE-blind-seedS, in
    `runs_dir`) is planned before it, on its budget in samples."""
    if not recipes:
        raise UsageError("vlpt compare needs at least one recipe, e.g. `vlpt compare clip cap --budget 20000`")
    if (samples is None) == (flops is None):
        raise UsageError("vlpt compare needs one budget: --budget SAMPLES (samples seen by every recipe) or "
                         "--flops F (training FLOPs of every recipe)")
    if (samples or flops) <= 0 or seeds < 1 or points < 1 or any(m <= 0 for m in multiples):
        raise UsageError(f"--budget or --flops ({samples or flops}), --seeds ({seeds}), --points ({points}) and "
                         f"every --budgets multiple ({multiples}) must be positive")
    top = config_lib.parse_overrides(overrides)
    for key in config_lib.BUDGET_KEYS:
        section, name = key.split(".")
        if name in top.get(section, {}):
            raise UsageError(f"{key} is set by vlpt compare (--budget SAMPLES, the same for every recipe); "
                             f"drop {key}=...")
    explicit = "tasks" in top.get("eval", {})
    base_seed = top.get("train", {}).get("seed", 0)
    probes = [config_lib.resolve(r, config_lib.deep_merge(top, {"train": {"samples": samples or 1}}))
              for r in recipes]
    tasks = suite(probes, explicit)
    runs = []
    for recipe, probe in zip(recipes, probes):
        runnable, skipped = split_runnable(tasks, probe)
        per_sample = None
        if flops is not None:
            from vlpt.train.flops import recipe_flops_per_sample

            per_sample = recipe_flops_per_sample(probe)
            print(f"vlpt compare: {probe.recipe}: {per_sample / 1e6:,.2f} MFLOP per training sample (counted)",
                  file=sys.stderr)
        for multiple in multiples:
            budget = max(1, round(samples * multiple if flops is None else flops * multiple / per_sample))
            steps = math.ceil(budget / probe.train.batch_size)
            train = {"samples": budget}
            spent = None if flops is None else {"flops": flops * multiple, "flops_per_sample": per_sample}
            evaluation = {"tasks": _entries(runnable)}
            if "every_steps" not in top.get("eval", {}):  # evaluate at `points` points of training
                evaluation["every_steps"] = max(1, math.ceil(steps / points))
            for i in range(seeds):
                seed = base_seed + i
                run_top = config_lib.deep_merge(top, {"train": {**train, "seed": seed}, "eval": evaluation})
                if with_blind and sees_and_captions(probe):
                    twin_top = config_lib.deep_merge(run_top, blind_overrides(probe))
                    twin = config_lib.resolve(recipe, twin_top)
                    twin.recipe = f"{twin.recipe}-blind"
                    twin_name = run_name(twin.recipe, multiple, seed)
                    runs.append(PlannedRun(twin_name, twin))
                    twin_dir = (runs_dir or Path("runs")).resolve() / twin_name
                    run_top = config_lib.deep_merge(
                        run_top, {"eval": {"tasks": _entries(with_blind_column(runnable, twin_dir))}})
                cfg = config_lib.resolve(recipe, run_top)
                runs.append(PlannedRun(run_name(cfg.recipe, multiple, seed), cfg, skipped, spent))
    names = [r.name for r in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"two recipes of this compare share a name ({', '.join(twice)}); give each recipe once")
    return runs


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "results.json").exists()


def _check_same(run: PlannedRun, run_dir: Path) -> None:
    """A run folder is continued only when it was started with the very config planned for it (read as a saved
    config: keys added to vlpt since it was written take their defaults, which keep the old behaviour)."""
    saved = config_lib.to_dict(config_lib.from_dict(config_lib.read_yaml(run_dir / "config.yaml")))
    planned = config_lib.to_dict(run.cfg)
    for section in planned:
        if saved.get(section) != planned[section]:
            raise UsageError(f"{run_dir} holds a run with another {section} config than this compare plans "
                             f"(e.g. a different budget, seed count or key=value); use another --out or remove "
                             f"{run_dir}")


def train_all(runs: list[PlannedRun], runs_dir: Path, progress: bool = True) -> dict[str, str]:
    """Train what is not finished; returns {run: error} for runs whose training or final evaluation failed
    (the others go on). Interruption (Ctrl-C, SIGTERM) propagates: the next compare resumes."""
    from vlpt.errors import VlptError
    from vlpt.train import loop

    for run in runs:  # a mismatching folder is refused before any training
        if (runs_dir / run.name / "config.yaml").exists():
            _check_same(run, runs_dir / run.name)
    failed = {}
    for run in runs:
        run_dir = runs_dir / run.name
        if is_finished(run_dir):
            print(f"vlpt compare: {run.name} is finished; not retrained", file=sys.stderr)
            continue
        started = (run_dir / "config.yaml").exists()
        print(f"vlpt compare: {'resuming' if started else 'training'} {run.name} "
              f"({run.cfg.train.samples} samples, seed {run.cfg.train.seed})", file=sys.stderr)
        try:
            loop.train(run.cfg, run_dir, resume=started, progress=progress)
        except VlptError as err:  # e.g. a failed final evaluation: the other runs still train
            failed[run.name] = str(err)
            print(f"vlpt compare: {run.name} failed: {err}", file=sys.stderr)
    for run in runs:
        if run.flops is not None and is_finished(runs_dir / run.name):
            (runs_dir / run.name / BUDGET_FILE).write_text(json.dumps(run.flops) + "\n")
    return failed
