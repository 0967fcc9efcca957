"""Evaluation during and after training: the run's tasks, checked before the first step, each on its own
cadence. A task that fails during training is reported and training goes on; the final evaluation runs once
the final checkpoint is on disk, and a failure there says how to run it again with `vlpt eval`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from vlpt.config import Config, ConfigError
from vlpt.data import sources
from vlpt.eval.defaults import resolve_tasks
from vlpt.errors import RunError
from vlpt.eval.registry import TaskError, check_task, run_task, write_samples
from vlpt.train import distributed
from vlpt.train.logging import MetricsLog


class EvaluationFailed(RunError):
    """The final evaluation failed; the run itself (its final checkpoint) is complete. `detail` names the
    failed tasks and why, `results` holds the metrics of the tasks that ran."""

    def __init__(self, message: str, detail: str, results: dict):
        super().__init__(message)
        self.detail, self.results = detail, results


class EvalPlan:
    """(task, period) for every task of eval.tasks ("auto" expanded); period 0 = only at the end."""

    def __init__(self, cfg: Config, abilities: frozenset[str]):
        self.cfg, self.tasks = cfg, []
        for i, entry in enumerate(cfg.eval.tasks):
            period = cfg.eval.every_steps if entry.every_steps is None else entry.every_steps
            for task in resolve_tasks([entry.task], cfg.data.source, abilities):
                try:
                    evaluator, data = check_task(task, abilities)
                except TaskError as err:
                    raise ConfigError(f"eval.tasks[{i}]: {err}") from None
                for spec in evaluator.data_specs(data):  # a missing file or a typo fails now, not after the run
                    try:
                        sources.open_source(spec)
                    except Exception as err:  # noqa: BLE001 - any reason a set cannot be opened
                        raise ConfigError(f"eval.tasks[{i}]: task {task!r} cannot open its data {spec!r}: {err}") from None
                self.tasks.append((task, period))

    def absent(self) -> str:
        """Why the run has no evaluation ("" when it has tasks)."""
        if self.tasks:
            return ""
        if not self.cfg.eval.tasks:
            return "none: eval.tasks is empty"
        return (f"none: eval.tasks=[auto] has no suite for data.source={self.cfg.data.source}; name tasks in "
                f"eval.tasks (see `vlpt eval --help`)")

    def due(self, step: int, total: int) -> list[str]:
        """Tasks whose period divides `step`, except at the last step (the final evaluation runs them all)."""
        return [t for t, period in self.tasks if period and step % period == 0 and step != total]

    def run(self, tasks: list[str], model, step: int, log: MetricsLog, progress: bool,
            samples: dict | None = None, averaged=None) -> tuple[dict, dict]:
        """(metrics, {task: error message}) on the main process; the other ranks wait. `averaged`: the
        model's average of weights (train.ema), whose metrics and failures are named `ema/...`."""
        results, failed = {}, {}
        if distributed.is_main():
            for prefix, m, keep in (("", model, samples), ("ema/", averaged, None)):
                for task in tasks if m is not None else ():
                    try:
                        got = run_task(task, m, templates=self.cfg.eval.templates, progress=progress, samples=keep,
                                       max_bad_fraction=self.cfg.data.max_bad_fraction)
                        results.update({prefix + k: v for k, v in got.items()})
                    except Exception as err:  # noqa: BLE001 - reported; training and other tasks go on
                        failed[prefix + task] = f"{type(err).__name__}: {err}"
            if results:
                log.write(step, "eval", results)
            for task, message in failed.items():
                log.note(step, "eval_error", task=task, message=message)
        distributed.barrier()
        return results, failed

    def periodic(self, model, step: int, total: int, log: MetricsLog) -> None:
        tasks = self.due(step, total)
        if tasks:
            _, failed = self.run(tasks, model, step, log, progress=False)
            for task, message in failed.items():
                print(f"warning: evaluation task {task!r} failed at step {step} ({message}); training goes on",
                      file=sys.stderr)

    def final(self, model, step: int, log: MetricsLog, progress: bool, run_dir: Path, averaged=None) -> dict:
        """Every task, on the model and on its `averaged` weights if given (as ema/...); results.json and
        captions.json (the model's generated captions) in the run folder."""
        samples: dict = {}
        results, failed = self.run([t for t, _ in self.tasks], model, step, log, progress, samples, averaged)
        if distributed.is_main():
            (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            if samples:
                write_samples(samples, run_dir / "captions.json")
        if failed and distributed.is_main():
            averaged_failed = [t[len("ema/"):] for t in failed if t.startswith("ema/")]
            model_failed = [t for t in failed if not t.startswith("ema/")]
            reruns = [f"vlpt eval {run_dir}{flag} " + " ".join(f"--task '{t}'" for t in tasks)
                      for flag, tasks in (("", model_failed), (" --ema", averaged_failed)) if tasks]
            detail = "; ".join(f"{t}: {m}" for t, m in failed.items())
            raise EvaluationFailed(f"the final evaluation failed ({detail}). The trained model is saved; "
                                   f"evaluate it again with: {' and '.join(reruns)}", detail, results)
        return results
