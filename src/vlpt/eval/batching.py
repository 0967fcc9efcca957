"""Evaluation in batches under no_grad, with a progress bar."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from vlpt.progress import bar


def encode_batched(
    fn: Callable, items: Sequence | torch.Tensor, batch_size: int = 256, progress: bool = False, desc: str | None = None
) -> torch.Tensor:
    """`fn` applied to `items` in batches under no_grad; the outputs as one float32 CPU tensor."""
    if len(items) == 0:
        raise ValueError("nothing to encode")
    outs = []
    starts = range(0, len(items), batch_size)
    with torch.no_grad():
        for start in bar(starts, progress, desc=desc, leave=False):
            outs.append(fn(items[start : start + batch_size]).float().cpu())
    return torch.cat(outs)


def batched(fn: Callable, n: int, batch_size: int, progress: bool, desc: str) -> list:
    """[fn(start, stop) for each batch] under no_grad, with a progress bar."""
    with torch.no_grad():
        return [fn(a, min(a + batch_size, n))
                for a in bar(range(0, n, batch_size), progress, desc=desc, leave=False)]
