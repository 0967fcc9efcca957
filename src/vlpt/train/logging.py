"""Metrics to metrics.jsonl (always) and TensorBoard (when installed), from the main process only."""
from __future__ import annotations

import json
import math
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
                self.tb = None

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

