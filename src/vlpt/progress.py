"""What a person watches while vlpt works: tqdm bars on a terminal; redirected to a file or a pipe, plain
lines. tqdm redraws its bar with carriage returns, which a log file shows as one endless line, so every
bar in vlpt comes from `bar` here and training progress from `TrainProgress`."""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, TextIO

from tqdm import tqdm


def on_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def bar(iterable=None, show: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr when `show` and stderr is a terminal; otherwise a silent pass-through."""
    return tqdm(iterable, file=sys.stderr, disable=not (show and on_terminal()), dynamic_ncols=True, **kwargs)


def duration(seconds: float) -> str:
    """12.3s, 7m05s, 2h03m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class TrainProgress:
    """Training progress for a person, and the totals the end-of-run summary reports.

    On a terminal a tqdm bar (loss and samples/s of the last second as its postfix); otherwise a line when
    training starts, every `every_s` seconds and at the last step: step, loss, samples/s since the
    previous line, ETA. `show=False` (--quiet, the other ranks) prints nothing but still counts.
    """

    def __init__(self, desc: str, start: int, total: int, every_s: float, show: bool = True,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.perf_counter):
        self.desc, self.start, self.total, self.clock = desc, start, total, clock
        self.stream = sys.stderr if stream is None else stream
        terminal = on_terminal(self.stream)
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", file=self.stream, dynamic_ncols=True,
                        disable=not (show and terminal))
        self.lines = show and not terminal
        self.every_s = every_s if self.lines else 1.0  # the bar's postfix: the last second
        self.step, self.samples, self.loss, self.final_loss = start, 0, math.nan, None
        self.began = self.tick = clock()
        self.tick_samples = 0
        self.ended: float | None = None
        if self.lines and start < total:
            self._print(f"{desc}: step {start}/{total}, starting")

    def update(self, step: int, loss: float, samples: int) -> None:
        """Step `step` is done: its loss (nan when it was skipped) and the samples it took on all ranks."""
        self.step, self.loss = step, loss
        self.samples += samples
        self.tick_samples += samples
        if math.isfinite(loss):
            self.final_loss = loss
        now = self.clock()
        last = step == self.total
        if last:
            self.ended = now
        first_on_bar = step == self.start + 1 and not self.lines  # the bar shows a loss from the start
        if now - self.tick >= self.every_s or last or first_on_bar:
            rate = self.tick_samples / max(now - self.tick, 1e-9)
            self.tick, self.tick_samples = now, 0
            if self.lines:
                self._print(self._line(now, rate))
            self.bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{rate:.0f}", refresh=False)
        self.bar.update(1)

    def _line(self, now: float, rate: float) -> str:
        elapsed = now - self.began
        if self.step == self.total:
            when = f"done in {duration(elapsed)}"
        else:
            when = f"ETA {duration(elapsed / (self.step - self.start) * (self.total - self.step))}"
        return (f"{self.desc}: step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%)  "
                f"loss {self.loss:.4f}  {rate:.0f} samples/s  {when}")

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    @property
    def seconds(self) -> float:
        """Time of the training steps of this call (from the first step's start to the last step's end)."""
        return (self.ended if self.ended is not None else self.clock()) - self.began

    def close(self) -> None:
        self.bar.close()
