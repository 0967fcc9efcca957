"""What can go wrong that the user can fix: one exception family, one line each.

Every exception here carries a message that names the file, line or key, what was found and the fix. The
CLI prints it as `error: MESSAGE` and exits with `exit_code` (2: the command line or config, 1: data, a
checkpoint or the run); the Python API raises it as is. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class VlptError(Exception):
    """A problem the user can fix."""

    exit_code = 1


class UsageError(VlptError, ValueError):
    """The command line or the config cannot run."""

    exit_code = 2


class DataError(VlptError, ValueError):
    """The data cannot be read, or too much of it is unusable."""


class CheckpointError(VlptError, RuntimeError):
    """A run folder, checkpoint or weights file that is missing, damaged or of another format."""


class RunError(VlptError, RuntimeError):
    """The run itself stopped (non-finite losses) or its final evaluation failed; its checkpoint is safe."""


def one_line(err: BaseException) -> str:
    """The message on one line: continuation lines are joined with '; ' (lists of files stay readable)."""
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    return "; ".join(lines) or type(err).__name__
