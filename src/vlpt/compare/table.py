"""Runs read back from their folders, grouped per (recipe, budget) over seeds, and the Markdown tables.

Everything here comes from run folders alone (config.yaml, results.json, metrics.jsonl), so `vlpt report`
on the runs of a compare rebuilds the very table the compare wrote. Rows are sorted by recipe name and
budget, tasks by their first appearance in that order: the same runs give the same table in any order.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vlpt import config as config_lib
from vlpt.compare.chance import chance
from vlpt.compare.runs import BUDGET_FILE, split_runnable
from vlpt.compare.stats import TIE, UNTESTED, WIN, Stats, is_setting, lower_is_better, summarize, verdict
from vlpt.config import Config
from vlpt.errors import UsageError


SAMPLES, FLOPS = "samples seen", "training FLOPs"


def budget_text(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if unit == SAMPLES else f"{value:.3g} {unit}"


@dataclass
class RunRecord:
    path: Path
    cfg: Config
    results: dict[str, float]  # the final evaluation
    curves: dict[str, list[tuple[int, float]]]  # metric -> [(samples seen, value)] over training
    failed: dict[str, str]  # task -> why its evaluation failed (eval_error rows)
    flops: float | None = None  # the run's budget in training FLOPs, when `vlpt compare --flops` set it

    @property
    def budget(self) -> float:
        """What the run's comparison held equal: training FLOPs (--flops) or samples seen (--budget)."""
        return self.flops if self.flops is not None else self.samples

    @property
    def unit(self) -> str:
        return FLOPS if self.flops is not None else SAMPLES

    @property
    def samples(self) -> int:
        """The budget in samples seen: train.samples, or what the run's steps (or, for epochs, its last
        logged step) amount to."""
        tr = self.cfg.train
        if tr.samples is not None:
            return tr.samples
        if tr.steps is not None:
            return tr.steps * tr.batch_size
        return max((x for points in self.curves.values() for x, _ in points), default=0)


def load_run(path: Path) -> RunRecord:
    if not (path / "config.yaml").exists():
        raise UsageError(f"{path} is not a run folder (no config.yaml); give run folders or a compare folder")
    if not (path / "results.json").exists():
        started = (path / "command.txt").read_text().splitlines()[:1] if (path / "command.txt").exists() else []
        again = f"run the command that started it again, it resumes: {started[0]}" if started else \
            f"`vlpt train {config_lib.read_yaml(path / 'config.yaml').get('recipe')} --out {path} --resume`"
        raise UsageError(f"{path} is unfinished (no results.json); leave it out, or finish it: {again}")
    cfg = config_lib.from_dict(config_lib.read_yaml(path / "config.yaml"))
    curves: dict[str, list[tuple[int, float]]] = {}
    failed: dict[str, str] = {}
    batch = cfg.train.batch_size
    metrics = path / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        row = json.loads(line)
        seen = row["step"] * batch
        if row["kind"] == "train" and "loss" in row:
            curves.setdefault("train/loss", []).append((seen, row["loss"]))
        elif row["kind"] == "eval":
            for k, v in row.items():
                if k not in ("step", "kind"):
                    curves.setdefault(k, []).append((seen, v))
        elif row["kind"] == "eval_error":
            failed[row["task"]] = row["message"]
    budget = path / BUDGET_FILE
    flops = json.loads(budget.read_text())["flops"] if budget.exists() else None
    return RunRecord(path, cfg, json.loads((path / "results.json").read_text()), curves, failed, flops)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders: each path given, or the runs/* of a compare folder."""
    found = []
    for p in map(Path, paths):
        if (p / "config.yaml").exists():
            found.append(p)
        elif (p / "runs").is_dir():
            found += sorted(q for q in (p / "runs").iterdir() if (q / "config.yaml").exists())
        else:
            raise UsageError(f"{p} is neither a run folder (config.yaml) nor a compare folder (runs/); "
                             f"give `vlpt report` run folders or the --out of a compare")
    if not found:
        raise UsageError(f"no run folders in {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def task_of(metric: str, known: list[str] = ()) -> str:
    """The task a metric belongs to: the longest of the `known` task names it starts with, else all but
    its last part."""
    return max((t for t in known if metric.startswith(t + "/")), key=len, default=metric.rsplit("/", 1)[0])


def result_prefix(task: str) -> str:
    """The name a task's metrics start with (its evaluator's result_name)."""
    from vlpt.eval.registry import TaskError, parse_task

    try:
        return parse_task(task)[0]().result_name(task)
    except TaskError:
        return task


@dataclass
class Group:
    """The seeds of one recipe at one budget."""

    recipe: str
    budget: float
    unit: str
    runs: list[RunRecord] = field(default_factory=list)

    def stats(self, metric: str) -> Stats | None:
        values = [r.results[metric] for r in self.runs if metric in r.results]
        return summarize(values) if values else None

    def cannot(self, task: str) -> bool:
        """True when this recipe's model lacks what the task needs (e.g. a text embedding for zero-shot)."""
        return task in split_runnable([task], self.runs[0].cfg)[1]

    def why_missing(self, task: str) -> str:
        for run in self.runs:
            if task in run.failed:
                return f"task {task!r} failed: {run.failed[task]}"
        _, skipped = split_runnable([task], self.runs[0].cfg)
        return skipped.get(task, f"task {task!r} was not evaluated in these runs")


def group_runs(records: list[RunRecord]) -> list[Group]:
    groups: dict[tuple[str, int], Group] = {}
    if len({r.unit for r in records}) > 1:
        raise UsageError("these runs hold different things equal: some a FLOPs budget (vlpt compare --flops), "
                         "some samples seen; report them separately")
    for r in sorted(records, key=lambda r: (r.cfg.recipe, r.budget, r.cfg.train.seed)):
        groups.setdefault((r.cfg.recipe, r.budget), Group(r.cfg.recipe, r.budget, r.unit)).runs.append(r)
    return list(groups.values())


def metrics_by_task(groups: list[Group]) -> dict[str, list[str]]:
    """{task: its metrics}, in first-appearance order (the eval.tasks order of the runs, then results')."""
    tasks: dict[str, list[str]] = {}
    for g in groups:
        for run in g.runs:
            for t in run.cfg.eval.tasks:
                tasks.setdefault(result_prefix(t.task), [])
    known = list(tasks)
    for g in groups:
        for run in g.runs:
            for metric in run.results:
                names = tasks.setdefault(task_of(metric, known), [])
                if metric not in names:
                    names.append(metric)
    return {t: m for t, m in tasks.items() if m}


def _cell(s: Stats | None) -> str:
    if s is None:
        return ""
    return f"{s.mean:.2f} ± {s.std:.2f}" if s.n > 1 else f"{s.mean:.2f}"


def best_rows(stats: list[Stats | None], lower_better: bool) -> list[int]:
    """The best row and every row that ties with it (within the seeds' spread): the rows set in bold."""
    present = [i for i, s in enumerate(stats) if s is not None]
    if len(present) < 2:  # nothing to compare with
        return []
    pick = min if lower_better else max
    best = pick(present, key=lambda i: stats[i].mean)
    return [i for i in present if i == best or verdict(stats[best], stats[i], lower_better) == TIE]


def verdicts(groups: list[Group], metric: str) -> list[str]:
    """One sentence per other recipe: the best one wins over it, ties with it, or cannot be told (1 seed)."""
    return verdict_words([g.recipe for g in groups], [g.stats(metric) for g in groups], lower_is_better(metric))


def verdict_words(names: list[str], stats: list[Stats | None], lower: bool = False) -> list[str]:
    """The verdict sentences of the best row over each other row, from their stats."""
    rows = best_rows(stats, lower)
    if not rows:
        return []
    best = min(rows, key=lambda i: stats[i].mean) if lower else max(rows, key=lambda i: stats[i].mean)
    words = {WIN: "wins over", TIE: "ties with", UNTESTED: "is ahead of (1 seed: untested)"}
    return [f"{names[best]} {words[verdict(stats[best], s, lower)]} {names[i]}"
            for i, s in enumerate(stats) if i != best and s is not None]


CONTROL_LABELS = {"blank_image": "*blank image (control)*", "blind": "*blind twin (control)*",
                  "length_baseline": "*shorter text (control)*"}
HEADLINE_GROUPS = ("precision@1", "macro")  # the summary columns of choice tasks, first and in the verdicts


def split_scorer(task: str, metric: str) -> tuple[str, str] | None:
    """"swaps:scenes/objects/macro/likelihood" -> ("objects/macro", "likelihood"): the question group and
    the scorer of a choice task's metric (vlpt.eval.choice), or None for any other metric."""
    from vlpt.eval.choice import CONTROLS, SCORERS

    rest = metric[len(task) + 1:]
    group, _, scorer = rest.rpartition("/")
    return (group, scorer) if group and scorer in SCORERS + CONTROLS else None


def choice_table(task: str, metrics: list[str], rows: list[Group]) -> list[str]:
    """A compositional task: one row per (recipe, scorer), its controls in italics under its likelihood,
    one column per question group (summaries first). Bold and verdicts rank the models' own scorers only: a
    control is shown beside the score it qualifies, never ranked."""
    from vlpt.eval.choice import CONTROLS, SCORERS

    parts = [split_scorer(task, m) for m in metrics]
    columns = list(dict.fromkeys(g for g, _ in parts))
    columns.sort(key=lambda g: g.rsplit("/", 1)[-1] not in HEADLINE_GROUPS)  # stable: summaries first
    lines = [f"#### {task}", "", "| recipe | scored by | " + " | ".join(columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    table: list[tuple[str, str, list[Stats | None]]] = []
    for g in rows:
        for scorer in SCORERS + CONTROLS:
            stats = [g.stats(f"{task}/{col}/{scorer}") for col in columns]
            if any(s is not None for s in stats):
                table.append((g.recipe, scorer, stats))
    ranked = [i for i, (_, scorer, _) in enumerate(table) if scorer in SCORERS]
    bold: set[tuple[int, int]] = set()
    said = []
    for j, col in enumerate(columns):
        stats = [table[i][2][j] for i in ranked]
        bold |= {(ranked[k], j) for k in best_rows(stats, False)}
        if col.rsplit("/", 1)[-1] in HEADLINE_GROUPS:
            words = verdict_words([f"{table[i][0]} ({table[i][1]})" for i in ranked], stats)
            said += [f"{col}: " + ", ".join(words)] if words else []
    for i, (recipe, scorer, stats) in enumerate(table):
        cells = ["" if s is None else (f"**{_cell(s)}**" if (i, j) in bold else
                                       f"*{_cell(s)}*" if scorer in CONTROLS else _cell(s))
                 for j, s in enumerate(stats)]
        lines.append(f"| {recipe} | {CONTROL_LABELS.get(scorer, scorer)} | " + " | ".join(cells) + " |")
    return lines + ([""] + ["; ".join(said) + "."] if said else []) + [""]


def markdown_tables(groups: list[Group]) -> list[str]:
    """Per budget and per task, a table: one row per recipe, one column per metric, mean ± std over seeds,
    best (and ties with it) in bold, a chance row; a blank cell has a numbered note with the reason."""
    lines: list[str] = []
    controls = [g for g in groups if not any(r.results for r in g.runs)]
    if controls:
        lines += ["Blind twins, trained as controls and not evaluated themselves (their likelihoods are the "
                  "*blind twin* rows of their sighted recipe): " + ", ".join(sorted({g.recipe for g in controls})) + ".", ""]
    groups = [g for g in groups if g not in controls]
    budgets = sorted({g.budget for g in groups})
    tasks = metrics_by_task(groups)
    for budget in budgets:
        rows = [g for g in groups if g.budget == budget]
        seeds = sorted({len(g.runs) for g in rows})
        lines += [f"### {budget_text(budget, rows[0].unit)} ({'/'.join(map(str, seeds))} seed(s) per recipe)", ""]
        if rows[0].unit == FLOPS:
            lines += ["Samples seen at this budget: " + ", ".join(f"{g.recipe} {g.runs[0].samples:,}" for g in rows), ""]
        notes: list[str] = []
        for task, metrics in tasks.items():
            unable = [g.recipe for g in rows if g.cannot(task)]
            if all(split_scorer(task, m) for m in metrics):
                lines += choice_table(task, metrics, [g for g in rows if g.recipe not in unable])
            else:
                lines += _task_table(task, metrics, [g for g in rows if g.recipe not in unable], notes)
            if unable:
                lines[-1:] = ["", f"Not applicable (the model cannot run this task): {', '.join(unable)}.", ""]
        lines += [f"[{i}] {n}  " for i, n in enumerate(notes, 1)]  # two spaces: a Markdown line break
        lines.append("")
    return lines


def _task_table(task: str, metrics: list[str], rows: list[Group], notes: list[str]) -> list[str]:
    """One task: a row per recipe, a column per metric, chance below, verdicts after; a missing cell gets
    a numbered note (in `notes`) saying why."""
    lines: list[str] = []
    names = [m.rsplit("/", 1)[-1] + (" ↓" if lower_is_better(m) else "") for m in metrics]
    lines += [f"#### {task}", "", "| recipe | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(metrics)]
    cells = {g.recipe: [] for g in rows}
    for m in metrics:
        stats = [g.stats(m) for g in rows]
        bold = [] if is_setting(m) else best_rows(stats, lower_is_better(m))
        for i, (g, s) in enumerate(zip(rows, stats)):
            if s is None:
                note = f"{g.recipe}: {g.why_missing(task)}"
                notes += [note] if note not in notes else []
                cells[g.recipe].append(f"— [{notes.index(note) + 1}]")
            else:
                cells[g.recipe].append(f"**{_cell(s)}**" if i in bold else _cell(s))
    lines += [f"| {r} | " + " | ".join(c) + " |" for r, c in cells.items()]
    odds = chance(task)
    if odds:
        plain = [m.rsplit("/", 1)[-1] for m in metrics]
        lines.append("| *chance* | " + " | ".join(f"*{odds[n]:.2f}*" if n in odds else "" for n in plain) + " |")
    said = [f"{m.rsplit('/', 1)[-1]}: " + ", ".join(verdicts(rows, m)) for m in metrics
            if not is_setting(m) and verdicts(rows, m)]
    if said:
        lines += ["", "; ".join(said) + "."]
    lines.append("")
    return lines


def summary(groups: list[Group]) -> dict:
    """The numbers of the tables, as JSON: {recipe@budget: {metric: {mean, std, n}}}."""
    return {f"{g.recipe}@{g.budget:g}": {m: vars(s) for m in sorted({k for r in g.runs for k in r.results})
                                        if (s := g.stats(m)) is not None} for g in groups}
