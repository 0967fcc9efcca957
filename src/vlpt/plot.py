"""A run's training curves as one PNG: loss, learning rate, throughput and evaluation metrics against the
step, from its metrics.jsonl (`vlpt plot RUN`; training writes RUN/curves.png at its end)."""
from __future__ import annotations

import json
from pathlib import Path

from vlpt.errors import UsageError


class NothingToPlot(UsageError):
    """The path holds no metrics.jsonl, or one without training rows."""


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that does not parse (cut off by a kill) is passed over."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _series(rows: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def curves_figure(rows: list[dict], title: str = ""):
    """A 2x2 matplotlib Figure (no pyplot, so no display and no global backend): loss (and each objective's
    loss when there are several), learning rate, samples/s against the step, and the evaluation metrics:
    against the step, or as bars when they were measured at one step only (the final evaluation)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5), layout="constrained")
    (loss, lr), (speed, evals) = fig.subplots(2, 2)
    for ax in (lr, speed):
        ax.sharex(loss)
    train_keys = {k for r in rows if r.get("kind") == "train" for k in r}
    parts = sorted(k for k in train_keys if k.endswith("/loss"))
    loss.plot(*_series(rows, "train", "loss"), label="loss", color="black")
    if len(parts) > 1:  # one objective's loss is the loss itself
        for k in parts:
            loss.plot(*_series(rows, "train", k), label=k, linewidth=1)
        loss.legend(fontsize=8)
    lr.plot(*_series(rows, "train", "lr"))
    speed.plot(*_series(rows, "train", "samples_per_s"))
    tab20 = colormaps["tab20"]
    _evaluation(evals, loss, rows, lambda i: tab20((2 * i) % 20 + (2 * i // 20) % 2))  # the dark ten first
    for ax, name in ((loss, "loss"), (lr, "learning rate"), (speed, "samples/s")):
        ax.set_title(name, fontsize=10)
    for ax in (loss, lr, speed, evals):
        ax.grid(alpha=0.3)
    speed.set_xlabel("step")
    if title:
        fig.suptitle(title)
    return fig


MAX_EVAL_LINES = 12


def _evaluation(ax, steps_ax, rows: list[dict], colours) -> None:
    evals = [r for r in rows if r.get("kind") == "eval"]
    keys = sorted({k for r in evals for k in r} - {"step", "kind"})
    if not keys:
        ax.set_title("evaluation", fontsize=10)
        ax.text(0.5, 0.5, "no evaluation rows", ha="center", va="center", transform=ax.transAxes)
        return
    shown = f"evaluation ({MAX_EVAL_LINES} of {len(keys)} metrics; all in metrics.jsonl)" \
        if len(keys) > MAX_EVAL_LINES else "evaluation"
    keys = keys[:MAX_EVAL_LINES]  # more lines than this make an unreadable legend that squeezes the axes away
    at = {r["step"] for r in evals}
    if len(at) == 1:  # one point per metric reads better as a labelled bar than as a dot at the last step
        values = [_series(rows, "eval", k)[1][-1] for k in keys]
        ax.barh(range(len(keys)), values, color=[colours(i) for i in range(len(keys))], alpha=0.6)
        for i, (k, v) in enumerate(zip(keys, values)):  # names on the bars: long task names need no margin
            ax.text(0, i, f" {k}  {v:.2f}", va="center", ha="left", fontsize=7)
        ax.set_yticks([])
        ax.invert_yaxis()
        ax.set_title(f"{shown} at step {at.pop()}", fontsize=10)
        return
    ax.sharex(steps_ax)
    for i, k in enumerate(keys):
        ax.plot(*_series(rows, "eval", k), marker="o", markersize=3, label=k, color=colours(i))
    ax.legend(fontsize=7)
    ax.set_title(shown, fontsize=10)
    ax.set_xlabel("step")


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Draws RUN's metrics.jsonl (RUN: a run folder or the file itself) to `out` (default RUN/curves.png)."""
    run = Path(run)
    path = run if run.is_file() else run / "metrics.jsonl"
    if not path.exists():
        raise NothingToPlot(f"{path} not found: give a run folder written by `vlpt train` (or its metrics.jsonl)")
    rows = read_rows(path)
    if not any(r.get("kind") == "train" and "loss" in r for r in rows):
        raise NothingToPlot(f"{path} has no training rows yet (one is written every train.log_every steps)")
    out = Path(out) if out else path.parent / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = curves_figure(rows, title=_title(path.parent))
    fig.savefig(out, dpi=80)
    return out


def _title(run: Path) -> str:
    """The run folder's name and recipe (from its config.yaml, when there is one)."""
    import yaml

    try:
        recipe = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("recipe")
    except (OSError, yaml.YAMLError):
        recipe = None
    return f"{run.name} ({recipe})" if recipe else run.name
