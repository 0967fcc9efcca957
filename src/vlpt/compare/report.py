"""A report folder from finished runs: report.md (tables, plots, scaling), plots/*.png, report.html (one
self-contained page) and summary.json (the tables' numbers)."""
from __future__ import annotations

import json
import re
from itertools import combinations
from pathlib import Path

from vlpt.compare import html, plots, scaling
from vlpt.compare.chance import chance
from vlpt.compare.stats import is_setting, lower_is_better
from vlpt.compare.table import (HEADLINE_GROUPS, Group, budget_text, group_runs, load_run, markdown_tables,
                                metrics_by_task, split_scorer, summary)

RULE = ("A difference is a win when the two recipes' intervals mean ± std over seeds do not overlap, "
        "otherwise a tie; with one seed nothing is called a win (docs/guide.md, \"Comparing recipes\"). "
        "Bold: the best and every recipe that ties with it. ↓: lower is better.")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _setup(groups: list[Group]) -> list[str]:
    cfg = groups[0].runs[0].cfg
    seeds = sorted({r.cfg.train.seed for g in groups for r in g.runs})
    return [f"Recipes: {', '.join(dict.fromkeys(g.recipe for g in groups))}. Data: `{cfg.data.source}`; model "
            f"preset: `{cfg.model.preset}`; seeds: {', '.join(map(str, seeds))}; budgets: "
            f"{', '.join(budget_text(b, groups[0].unit) for b in sorted({g.budget for g in groups}))}.", ""]


def plotted(task: str, metrics: list[str]) -> list[str]:
    """The metrics of a task worth a panel: for a choice task only its summary groups (precision@1, macro),
    with each scorer and control; every metric of any other task."""
    headline = [m for m in metrics if (p := split_scorer(task, m)) and p[0].rsplit("/", 1)[-1] in HEADLINE_GROUPS]
    return headline or metrics


def fitted(task: str, metric: str) -> bool:
    """A scaling fit is for a model's own score: not a setting chosen on validation data, not a control."""
    from vlpt.eval.choice import CONTROLS

    part = split_scorer(task, metric)
    return not is_setting(metric) and not (part and part[1] in CONTROLS)


def figure2_section(groups: list[Group], out: Path) -> list[str]:
    """Zero-shot against samples seen for every recipe that classifies, each in its own way (CLIP's Figure 2
    compares a captioner, both bag-of-words baselines and CLIP like this)."""
    panels = plots.zero_shot_series(groups)
    if not panels or sum(len(v) for v in panels.values()) < 2:
        return []
    odds = {data: chance(f"zeroshot:{data}").get("top1") for data in panels}
    path = plots.zero_shot(groups, out / "plots" / "zero-shot.png", "zero-shot top-1 against samples seen",
                           {k: v for k, v in odds.items() if v is not None})
    return ["## Zero-shot against samples seen (CLIP's Figure 2)", "",
            "Each recipe classifies its own way: contrastive models by embeddings, captioners by caption "
            "likelihood, bag-of-words prediction by its head; mean over seeds, band from min to max.", "",
            f"![zero-shot against samples seen](plots/{path.name})", ""]


def error(metric: str, value: float) -> float:
    """What the scaling law fits: the metric itself when lower is better, else 100 - score (scores in %)."""
    return value if lower_is_better(metric) else 100.0 - value


def scaling_section(groups: list[Group], out: Path, n_boot: int) -> list[str]:
    """Per metric: each recipe's fit with 95% intervals, the plot, and where curves cross."""
    recipes = list(dict.fromkeys(g.recipe for g in groups))
    metrics = [m for task, ms in metrics_by_task(groups).items() for m in plotted(task, ms) if fitted(task, m)]
    lines = ["## Scaling", "", f"Error (100 - score, or the loss) against {groups[0].unit}; fits of E = a (C + b)^-c + d "
             f"with {scaling.MIN_SATURATING}+ budgets, else a line in log-log space (E = a C^-c) through the "
             f"per-budget best; [2.5%, 97.5%] from {n_boot} bootstrap fits.", ""]
    for metric in metrics:
        points, fits = {}, {}
        for recipe in recipes:
            cs, es = [], []
            for g in (g for g in groups if g.recipe == recipe):
                for r in g.runs:
                    if metric in r.results and error(metric, r.results[metric]) > 0:
                        cs.append(float(g.budget))
                        es.append(error(metric, r.results[metric]))
            if len(set(cs)) >= 2:
                points[recipe] = (cs, es)
                fits[recipe] = scaling.fit(cs, es, n_boot=n_boot)
        if not fits:
            continue
        path = plots.scaling(points, fits, metric, out / "plots" / f"scaling-{_slug(metric)}.png", groups[0].unit)
        lines += [f"### {metric}", "", f"![scaling {metric}](plots/{path.name})", ""]
        for recipe, f in fits.items():
            iv = f.intervals
            lines.append(f"- {recipe} ({f.kind}): " + ", ".join(
                f"{k} = {v:.4g} [{iv[k][0]:.4g}, {iv[k][1]:.4g}]" for k, v in f.params.items()))
        for ra, rb in combinations(fits, 2):
            lo = max(min(points[ra][0]), min(points[rb][0]))
            hi = min(max(points[ra][0]), max(points[rb][0]))
            if lo < hi:
                lines.append("- " + scaling.describe(ra, rb, scaling.crossing(fits[ra], fits[rb], lo, hi), lo, hi,
                                                     groups[0].unit))
        lines.append("")
    return lines


def build(run_dirs: list[Path], out: Path, n_boot: int = 200, title: str = "vlpt comparison") -> Path:
    """Write the report of these runs into `out`; returns report.html."""
    groups = group_runs([load_run(p) for p in run_dirs])
    (out / "plots").mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""] + _setup(groups) + [RULE, "", "## Results", ""] + markdown_tables(groups)
    lines += ["## Training curves", ""]
    for budget in sorted({g.budget for g in groups}):
        rows = [g for g in groups if g.budget == budget]
        tag, plot, said = f"{budget:g}", out / "plots", budget_text(budget, rows[0].unit)
        p = plots.curves(rows, ["train/loss"], plot / f"loss-{tag}.png", f"training loss, {said}")
        lines += [f"![training loss, {said}](plots/{p.name})", ""]
        for task, metrics in metrics_by_task(rows).items():
            metrics = plotted(task, metrics)
            p = plots.curves(rows, metrics, plot / f"curves-{tag}-{_slug(task)}.png", f"{task} during training",
                             chance(task))
            b = plots.bars(rows, metrics, chance(task), plot / f"bars-{tag}-{_slug(task)}.png", f"{task}, final")
            lines += [f"![{task} during training](plots/{p.name})", f"![{task}, final](plots/{b.name})", ""]
    lines += figure2_section([g for g in groups if g.budget == max(g.budget for g in groups)], out)
    if len({g.budget for g in groups}) > 1:
        lines += scaling_section(groups, out, n_boot)
    lines += ["## Runs", ""] + [f"- `{r.path}`" for g in groups for r in g.runs] + [""]
    markdown = "\n".join(lines)
    (out / "report.md").write_text(markdown)
    (out / "summary.json").write_text(json.dumps(summary(groups), indent=1) + "\n")
    page = out / "report.html"
    page.write_text(html.render(markdown, out, title))
    return page
