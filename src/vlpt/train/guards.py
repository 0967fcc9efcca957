"""The run's two stopping rules for bad input and bad numbers, with the counters they keep."""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from vlpt.data.sources import BadDataError
from vlpt.errors import RunError
from vlpt.train.logging import MetricsLog


class TrainingStopped(RunError):
    """The run stopped itself (a non-finite streak); the message says why and what to resume from."""


class BadImageBudget:
    """Images found unreadable as batches are decoded (data.cache_images=false): this rank's counts, the
    first ten different files named on the console; past data.max_bad_fraction the run stops naming them (a
    rank that stops ends the torchrun group)."""

    def __init__(self, counters: dict, max_bad_fraction: float):
        self.counters, self.limit, self.names = counters, max_bad_fraction, []

    def add(self, bad: list[str], good: int, step: int) -> None:
        c = self.counters
        c["bad_images"] += len(bad)
        c["images"] += good + len(bad)
        for name in bad:
            if len(self.names) < 10 and name not in self.names:  # a file drawn again is not named again
                more = "; further ones are only counted (metrics.jsonl, the summary)" if len(self.names) == 9 else ""
                tqdm.write(f"warning: skipped an unreadable image at step {step}: {name}{more}", file=sys.stderr)
                self.names.append(name)
        if not good or (c["bad_images"] > 1 and c["bad_images"] / c["images"] > self.limit):
            shown = "\n  ".join(self.names)
            raise BadDataError(f"{c['bad_images']} of {c['images']} images read by step {step} were unreadable, more "
                               f"than data.max_bad_fraction={self.limit}:\n  {shown}\n"
                               f"Fix or remove these files, or raise data.max_bad_fraction to skip them.")


class NonFiniteStreak:
    """Counts steps skipped for a non-finite loss or gradient (logged); `limit` in a row stop the run."""

    def __init__(self, counters: dict, limit: int, log: MetricsLog):
        self.counters, self.limit, self.log, self.length = counters, limit, log, 0

    def add(self, updated: bool, step: int, newest: Path | None) -> None:
        if updated:
            self.length = 0
            return
        self.length += 1
        self.counters["nonfinite_steps"] += 1
        self.log.write(step, "train", {"nonfinite_steps": self.counters["nonfinite_steps"],
                                       "nonfinite_in_a_row": self.length})
        if self.length >= self.limit:
            first = step - self.length + 1
            raise TrainingStopped(
                f"{self.length} non-finite losses or gradients in a row (steps {first} to {step}; "
                f"train.max_nonfinite_steps={self.limit}): the run stopped. Newest checkpoint, from before "
                f"step {first}: {newest or 'none'}. Continue with --resume and e.g. a lower train.lr, more "
                f"train.warmup_steps or train.precision=fp32")
