"""Metrics to metrics.jsonl (always) and TensorBoard (when installed), from the main process only."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                print("note: TensorBoard is not installed, so the metrics go to metrics.jsonl only "
                      "(pip install tensorboard for a tensorboard/ folder)", file=sys.stderr)

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **clean}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()

    def note(self, step: int, kind: str, **text: str) -> None:
        """A row of words rather than numbers (e.g. why an evaluation task failed)."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "kind": kind, **text}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class StepLog:
    """The training rows of metrics.jsonl (every `every` steps and the last); samples/s is measured over the
    steps since the last row."""

    def __init__(self, log: MetricsLog, every: int, total: int, samples_per_epoch: int | None, batch_size: int):
        self.log, self.every, self.total = log, every, total
        self.samples_per_epoch, self.batch_size = samples_per_epoch, batch_size
        self.since, self.samples = time.perf_counter(), 0

    def __call__(self, step: int, result, samples: int, lr: float, counters: dict) -> None:
        self.samples += samples
        if result.updated and (step % self.every == 0 or step == self.total):
            rate = self.samples / (time.perf_counter() - self.since)
            epoch = {} if self.samples_per_epoch is None else {"epoch": step * self.batch_size / self.samples_per_epoch}
            self.log.write(step, "train", {
                "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "samples_per_s": rate, **epoch,
                "nonfinite_steps": counters["nonfinite_steps"], **{k: float(v) for k, v in result.metrics.items()}})
            data = {}
            if counters["bad_images"]:
                data.update(bad_images=counters["bad_images"], images_seen=counters["images"])
            if counters.get("bad_shards") or counters.get("bad_samples"):  # streamed shards (data/streaming.py)
                data.update(bad_shards=counters["bad_shards"], shards_read=counters["shards"],
                            bad_samples=counters["bad_samples"], samples_read=counters["samples"])
            if data:
                self.log.write(step, "data", data)
            self.since, self.samples = time.perf_counter(), 0
