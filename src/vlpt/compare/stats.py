"""Seed statistics and the rule that calls a difference between two recipes a win or a tie.

The rule: with at least two seeds on each side, recipe A wins over B on a metric when their intervals
mean +- std (sample std over seeds, ddof=1) do not overlap, i.e. |mean_A - mean_B| > std_A + std_B; otherwise
it is a tie. Why not Welch's t-test at p<0.05: with the 2-3 seeds a report can afford it has 1-4 degrees of
freedom, leans entirely on normality of seed noise, and its p-value swings with one seed; the non-overlap
rule is what "larger than the seeds' spread" says, needs no distribution, and is about as strict (with
3 seeds of equal spread it asks for t > 2.45, two-sided p of about 0.07). With one seed nothing is known of
the spread, so no difference is called a win ("untested").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

WIN, LOSS, TIE, UNTESTED = "win", "loss", "tie", "untested"


@dataclass(frozen=True)
class Stats:
    mean: float
    std: float  # sample standard deviation over seeds (ddof=1); 0 with one seed
    n: int


def summarize(values: list[float]) -> Stats:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Stats(mean, std, n)


def lower_is_better(metric: str) -> bool:
    """Losses and perplexities go down; accuracies, recalls and caption scores go up."""
    name = metric.rsplit("/", 1)[-1].lower()
    return "loss" in name or "perplexity" in name


SETTINGS = ("linear_probe_C", "attentional_probe_epochs")  # chosen on validation data: reported, never ranked


def is_setting(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in SETTINGS


def verdict(a: Stats, b: Stats, lower_better: bool = False) -> str:
    """WIN when A is better than B by more than their spread (non-overlapping mean +- std), LOSS when B is,
    TIE otherwise; UNTESTED when either side has a single seed."""
    if a.n < 2 or b.n < 2:
        return UNTESTED
    if abs(a.mean - b.mean) <= a.std + b.std:
        return TIE
    better = a.mean < b.mean if lower_better else a.mean > b.mean
    return WIN if better else LOSS
