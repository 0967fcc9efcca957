"""Micro-batches: every key of a batch (and every model output) is split on its batch dimension, dim 1 for
the `*_views` keys ([V,B,...]; outputs "NAME@image_views" too) and dim 0 otherwise, so a new key needs no
change here."""
from __future__ import annotations


def batch_dim(key: str) -> int:
    """Where the examples are: [V,B,...] for views, [B,...] for everything else."""
    return 1 if key.endswith("_views") else 0


def split(batch: dict, n: int) -> list[dict]:
    """n equal micro-batches of every tensor in `batch` (the loop checks that the batch divides)."""
    if n == 1:
        return [batch]
    parts = {k: v.chunk(n, dim=batch_dim(k)) for k, v in batch.items()}
    return [{k: p[i] for k, p in parts.items()} for i in range(n)]
