"""The end-of-run summary a person reads: what ran, how fast, how it ended, where everything is."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlpt.progress import duration


@dataclass
class RunSummary:
    recipe: str
    run_dir: Path
    start: int  # the step this call began at (a resumed run's checkpoint)
    steps: int  # the run's last step
    train_seconds: float  # the steps of this call alone
    samples: int  # trained in this call, all ranks
    final_loss: float | None  # the last finite loss of this call
    checkpoint: Path | None
    total_seconds: float = 0.0  # the whole call: data, steps, saving, evaluation
    curves: Path | str = "none"  # the PNG, or what to say instead ("not drawn: why")
    results: dict = field(default_factory=dict)
    eval_note: str = ""  # "none: eval.tasks is empty", "failed: TASK: why" (the table holds the tasks that ran)
    images_left_out: int = 0  # unreadable, found when decoding every image up front
    image_reads_skipped: int = 0  # unreadable, found as batches were read (data.cache_images=false)
    nonfinite_steps: int = 0

    def text(self) -> str:
        ran = self.steps - self.start
        if ran:
            rate = self.samples / self.train_seconds if self.train_seconds > 0 else 0.0
            resumed = f" (resumed at step {self.start})" if self.start else ""
            steps = f"{ran}{resumed} in {duration(self.train_seconds)}, {rate:.0f} samples/s"
        else:
            steps = f"none: the run was already at its last step, {self.steps}"
        rows = [("steps", steps),
                ("final loss", "n/a" if self.final_loss is None else f"{self.final_loss:.4f}"),
                ("time", f"{duration(self.total_seconds)} in all (data, training, saving, evaluation)"),
                ("run folder", str(self.run_dir)),
                ("checkpoint", str(self.checkpoint) if self.checkpoint else "none"),
                ("curves", str(self.curves))]
        skipped = [f"{n} {what}" for n, what in ((self.images_left_out, "unreadable images (left out)"),
                                                 (self.image_reads_skipped, "reads of unreadable images"),
                                                 (self.nonfinite_steps, "non-finite steps"))
                   if n]
        if skipped:
            rows.append(("skipped", "; ".join(skipped) + " (see metrics.jsonl)"))
        ran_at = f"at step {self.steps}" if self.results else ""
        note, *more = self.eval_note.splitlines() or [""]  # a long error is printed in full after the summary
        note += " [...]" if more else ""
        rows.append(("evaluation", "; ".join(x for x in (ran_at, note) if x) or "none"))
        lines = [f"{self.recipe}: run summary"] + [f"  {k:<12}{v}" for k, v in rows]
        return "\n".join(lines + metric_lines(self.results, "    "))


def metric_lines(results: dict, indent: str = "") -> list[str]:
    """One aligned line per metric: the end-of-run summary's table and `vlpt eval`'s."""
    width = max((len(k) for k in results), default=0)
    return [f"{indent}{k:<{width}}  {v:8.2f}" for k, v in results.items()]
