"""One Markdown table across tasks from a report's summary.json (`vlpt compare` / `vlpt report` write it):
a row per recipe, a column per metric given as LABEL=METRIC, cells mean ± std over seeds. A recipe whose
model cannot produce a metric gets "–". docs/results.md quotes tables made this way.

  python benchmarks/summary_table.py runs/cmp/summary.json \
      "zero-shot=zeroshot:scenes:colour_shape/top1|zeroshot_captioner:scenes:colour_shape/top1" \
      "t2i R@10=retrieval:scenes:test/t2i_R@10"

`|` separates alternatives: the first metric a recipe has fills its cell (each recipe's own way of
classifying, say). Rows keep the summary's order; `--budget B` keeps one budget of a scaling study.
With `--curve`, SUMMARY is a compare folder and the table is one metric (the first alternative a recipe
has) at every evaluation point during training, mean over seeds, a column per samples-seen point:

  python benchmarks/summary_table.py runs/cmp --curve "zeroshot:scenes:shape/top1|zeroshot_bow:scenes:shape/top1"
"""
from __future__ import annotations

import argparse
import json


def cell(stats: dict | None) -> str:
    if stats is None:
        return "–"
    return f"{stats['mean']:.1f} ± {stats['std']:.1f}" if stats["n"] > 1 else f"{stats['mean']:.1f}"


def curve_table(folder: str, spec: str, budget: str | None) -> None:
    from vlpt.compare.plots import _seed_band
    from vlpt.compare.table import find_runs, group_runs, load_run

    finished = [r for r in find_runs([folder]) if (r / "results.json").exists()]  # a compare may still run
    groups = [g for g in group_runs([load_run(r) for r in finished]) if any(x.results for x in g.runs)]
    top = max(g.budget for g in groups) if budget is None else float(budget)
    rows = {}
    for g in (g for g in groups if g.budget == top):
        metric = next((m for m in spec.split("|") if any(m in r.curves for r in g.runs)), None)
        if metric is not None:
            xs, mean, _, _ = _seed_band(g.runs, metric)
            rows[f"{g.recipe} ({len(g.runs)} seeds)"] = dict(zip(xs, mean))
    points = sorted({x for r in rows.values() for x in r})
    print("| recipe | " + " | ".join(f"{x:,}" for x in points) + " |")
    print("|---|" + "---:|" * len(points))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{values[x]:.1f}" if x in values else "–" for x in points) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summary")
    p.add_argument("columns", nargs="*", metavar="LABEL=METRIC[|METRIC...]")
    p.add_argument("--budget", help="only rows of this budget (the part after @ in summary.json)")
    p.add_argument("--curve", metavar="METRIC[|METRIC...]", help="SUMMARY is a compare folder: this metric "
                   "at every evaluation point (default: the largest budget)")
    args = p.parse_intermixed_args()
    if args.curve:
        return curve_table(args.summary, args.curve, args.budget)
    try:
        summary = json.loads(open(args.summary).read())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {args.summary}: {err}; give the summary.json that `vlpt compare` or `vlpt report` wrote")
    bad = [c for c in args.columns if "=" not in c]
    if bad:
        raise SystemExit(f"error: column {bad[0]!r} is not LABEL=METRIC, e.g. \"t2i R@1=retrieval:scenes:test/t2i_R@1\"")
    columns = [c.split("=", 1) for c in args.columns]
    print("| recipe | " + " | ".join(label for label, _ in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for key, metrics in summary.items():
        recipe, _, budget = key.rpartition("@")
        if args.budget and budget != args.budget or not metrics:
            continue
        cells = [cell(next((metrics[m] for m in spec.split("|") if m in metrics), None)) for _, spec in columns]
        print(f"| {recipe} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
