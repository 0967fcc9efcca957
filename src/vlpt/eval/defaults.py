"""`eval.tasks: [auto]` -> the evaluation suite that fits the training data."""
from __future__ import annotations

SCENES_SUITE = [
    "zeroshot:scenes:colour_shape",
    "zeroshot:scenes:colour",
    "zeroshot:scenes:shape",
    "retrieval:scenes:test",
]


def auto_tasks(source: str) -> list[str]:
    kind, _, rest = source.partition(":")
    if kind == "scenes":
        return SCENES_SUITE
    if kind == "flickr8k":
        path = rest.split(":")[0] if rest and rest.split(":")[0] not in ("train", "dev", "test", "all") else ""
        return [f"retrieval:flickr8k:{path}:test" if path else "retrieval:flickr8k:test"]
    if kind in ("folder", "cifar10"):
        return [f"zeroshot:{kind}:{rest.rsplit(':', 1)[0]}:test" if ":" in rest else f"zeroshot:{source}"]
    return []  # captions tables and shards: no held-out split is implied; name tasks explicitly


def resolve_tasks(tasks: list[str], source: str) -> list[str]:
    out = []
    for t in tasks:
        out += auto_tasks(source) if t == "auto" else [t]
    return out
