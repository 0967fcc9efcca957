"""Evaluation: zero-shot classification, image-text retrieval, probes, captioning, and their registry.

`registry` holds the Evaluator plug-in contract and runs tasks "KIND:DATA"; `zeroshot`, `retrieval`,
`probes` and `captioner` are the built-in evaluators (each protocol a pure function over callables, plus its
Evaluator class); `data` decodes evaluation sets once; `templates` holds prompt sets. Evaluators never see
a model class, only the evaluation contract (`registry.EvalModel`).
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
