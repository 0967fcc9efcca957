"""The report's PNG plots (matplotlib, Agg backend: no display needed): curves against samples seen, bars
per benchmark, scaling fits with their bootstrap bands."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

DPI = 80


def _seed_band(runs, metric: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(samples seen, mean, min, max) over the seeds at each evaluation point they share."""
    by_x: dict[int, list[float]] = {}
    for run in runs:
        for x, v in run.curves.get(metric, []):
            by_x.setdefault(x, []).append(v)
    xs = sorted(x for x, vs in by_x.items() if len(vs) == len(runs))
    return xs, [sum(by_x[x]) / len(by_x[x]) for x in xs], [min(by_x[x]) for x in xs], [max(by_x[x]) for x in xs]


def _grid(n: int):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def curves(groups, metrics: list[str], path: Path, title: str, odds: dict[str, float] | None = None) -> Path:
    """Each metric against samples seen, one line per recipe (mean over seeds, band: min to max), chance
    (`odds`, by metric name) as a dashed line."""
    fig, axes = _grid(len(metrics))
    for ax, metric in zip(axes, metrics):
        for g in groups:
            xs, mean, lo, hi = _seed_band(g.runs, metric)
            if xs:
                line, = ax.plot(xs, mean, marker="o", ms=3, label=g.recipe)
                if len(g.runs) > 1:
                    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        name = metric.rsplit("/", 1)[-1]
        if odds and name in odds:
            ax.axhline(odds[name], color="grey", linestyle="dashed", label="chance")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("samples seen", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def bars(groups, metrics: list[str], odds: dict[str, float], path: Path, title: str) -> Path:
    """Final scores per metric, one bar per recipe (error bar: std over seeds), chance as a dashed line."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(metrics) * max(1, len(groups)) / 2 + 2), 3.2))
    width = 0.8 / max(1, len(groups))
    for j, g in enumerate(groups):
        stats = [g.stats(m) for m in metrics]
        xs = [i + (j - (len(groups) - 1) / 2) * width for i, s in enumerate(stats) if s is not None]
        present = [s for s in stats if s is not None]
        if present:
            ax.bar(xs, [s.mean for s in present], width, yerr=[s.std for s in present], capsize=3, label=g.recipe)
    labelled = False
    for i, m in enumerate(metrics):
        name = m.rsplit("/", 1)[-1]
        if name in odds:
            ax.hlines(odds[name], i - 0.45, i + 0.45, colors="grey", linestyles="dashed",
                      label=None if labelled else "chance")
            labelled = True
    ax.set_xticks(range(len(metrics)), [m.rsplit("/", 1)[-1] for m in metrics], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def scaling(points: dict[str, tuple[list[float], list[float]]], fits: dict, metric: str, path: Path,
            unit: str = "samples seen") -> Path:
    """Error against budget per recipe, log-log: the runs (dots), the fitted law and its 95% bootstrap band."""
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for label, (cs, es) in points.items():
        dots = ax.scatter(cs, es, s=12, label=label)
        fit = fits.get(label)
        if fit is not None:
            xs, mid, lo, hi = fit.band(min(cs), max(cs))
            ax.plot(xs, mid, color=dots.get_facecolor()[0])
            ax.fill_between(xs, lo, hi, color=dots.get_facecolor()[0], alpha=0.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(unit, fontsize=8)
    ax.set_ylabel("error", fontsize=8)
    ax.set_title(metric, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


ZERO_SHOT_KINDS = {"zeroshot": "embeddings", "zeroshot_captioner": "likelihood", "zeroshot_bow": "bag of words"}


def zero_shot_series(groups) -> dict[str, dict[str, str]]:
    """{DATA: {line label: metric}}: every recipe's zero-shot top-1, whichever way it classifies (embeddings,
    caption likelihood, bag-of-words head); a recipe with several ways gets one line each."""
    panels: dict[str, dict[str, str]] = {}
    for g in groups:
        found = sorted({m for r in g.runs for m in r.curves if m.endswith("/top1") and
                        m.partition(":")[0] in ZERO_SHOT_KINDS})
        for m in found:
            kind, _, rest = m.partition(":")
            data = rest.rsplit("/", 1)[0]
            several = len({x.partition(":")[0] for x in found if x.partition(":")[2] == rest}) > 1
            label = f"{g.recipe} ({ZERO_SHOT_KINDS[kind]})" if several else g.recipe
            panels.setdefault(data, {})[label] = m
    return panels


def zero_shot(groups, path: Path, title: str, odds: dict[str, float]) -> Path:
    """CLIP's Figure 2: zero-shot top-1 against samples seen, one line per recipe (mean over seeds, band:
    min to max), one panel per labelled set; `odds`: chance per set."""
    panels = zero_shot_series(groups)
    by_label = {g.recipe: g for g in groups}
    fig, axes = _grid(len(panels))
    for ax, (data, lines) in zip(axes, panels.items()):
        for label, metric in lines.items():
            g = by_label[label.split(" (")[0]]
            xs, mean, lo, hi = _seed_band(g.runs, metric)
            if xs:
                line, = ax.plot(xs, mean, marker="o", ms=3, label=label)
                if len(g.runs) > 1:
                    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        if data in odds:
            ax.axhline(odds[data], color="grey", linestyle="dashed", label="chance")
        ax.set_title(f"zero-shot top-1 (%), {data}", fontsize=9)
        ax.set_xlabel("samples seen", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
