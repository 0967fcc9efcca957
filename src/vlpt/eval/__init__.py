"""Evaluation: zero-shot classification, image-text retrieval, linear probes and the task-suite runner.

Modules: `templates` (prompt sets), `zeroshot`, `retrieval`, `probes` (pure protocols over callables),
`tasks` (`run_task` / `run_suite` over "KIND:DATASPEC" strings). Evaluators never see a model class,
only the callables of the evaluation contract (see `tasks.EvalModel`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm


def encode_batched(
    fn: Callable, items: Sequence | torch.Tensor, batch_size: int = 256, progress: bool = False, desc: str | None = None
) -> torch.Tensor:
    """`fn` applied to `items` in batches under no_grad; the outputs as one float32 CPU tensor."""
    if len(items) == 0:
        raise ValueError("nothing to encode")
    outs = []
    starts = range(0, len(items), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            outs.append(fn(items[start : start + batch_size]).float().cpu())
    return torch.cat(outs)
