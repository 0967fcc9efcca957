"""SIGTERM/SIGINT as a request to stop at the next step boundary, after saving that step."""
from __future__ import annotations

import signal
import threading
from pathlib import Path


class Interrupted(Exception):
    """SIGTERM/SIGINT: the last finished step was saved (outside a non-finite streak) and the run stopped."""

    def __init__(self, signum: int, step: int, ckpt: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, ckpt
        saved = f"newest checkpoint {ckpt}" if ckpt else "no checkpoint yet"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {saved}; continue with --resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


class StopSignals:
    """Turns the first SIGTERM/SIGINT into a request the loop honours at the next step boundary; a second
    signal acts as it would without us (SIGINT raises KeyboardInterrupt, SIGTERM ends the process)."""

    def __init__(self):
        self.signum, self._previous = 0, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    @property
    def flags(self) -> tuple[int, int]:
        """(SIGTERM arrived, SIGINT arrived), for the step's all-reduce: every rank stops at the same step."""
        return self.signum == signal.SIGTERM, self.signum == signal.SIGINT
