"""`eval.tasks: [auto]` -> the evaluation suite that fits the training data and what the model can do.

A model with a text embedding (CLIP-like, CoCa) gets the contrastive tasks; a model with a text decoder
(Cap, CapPa, CoCa) gets the captioner tasks: likelihood zero-shot, captioning and caption loss; a model with
a bag-of-words head (BoW prediction) gets zero-shot on the same labelled sets through that head.
"""
from __future__ import annotations

from vlpt.models.outputs import CONTRASTIVE

SCENES_SUITE = [
    "zeroshot:scenes:colour_shape",
    "zeroshot:scenes:colour",
    "zeroshot:scenes:shape",
    "retrieval:scenes:test",
]
SCENES_CAPTIONER_SUITE = [
    "zeroshot_captioner:scenes:colour_shape",
    "zeroshot_captioner:scenes:colour",
    "zeroshot_captioner:scenes:shape",
]


def _flickr8k_test(source: str) -> str:
    """The Flickr8k test split of the folder a `flickr8k[:PATH][:SPLIT]` source uses."""
    rest = source.partition(":")[2]
    path = rest.split(":")[0] if rest and rest.split(":")[0] not in ("train", "dev", "test", "all") else ""
    return f"flickr8k:{path}:test" if path else "flickr8k:test"


def auto_tasks(source: str, abilities: frozenset[str] = CONTRASTIVE) -> list[str]:
    kind, _, rest = source.partition(":")
    contrastive: list[str] = []
    captioner: list[str] = []
    if kind == "scenes":
        contrastive, captioner = SCENES_SUITE, SCENES_CAPTIONER_SUITE
    elif kind == "flickr8k":
        test = _flickr8k_test(source)
        contrastive, captioner = [f"retrieval:{test}"], [f"captioning:{test}", f"caption_loss:{test}"]
    elif kind == "cifar10":
        contrastive, captioner = ["zeroshot:cifar10:test"], ["zeroshot_captioner:cifar10:test"]
    elif kind == "folder":
        test = f"folder:{rest.rsplit(':', 1)[0]}:test" if ":" in rest else source
        contrastive, captioner = [f"zeroshot:{test}"], [f"zeroshot_captioner:{test}"]
    # captions tables and shards: no held-out split is implied; name tasks explicitly
    bow = [t.replace("zeroshot:", "zeroshot_bow:", 1) for t in contrastive if t.startswith("zeroshot:")]
    return (list(contrastive) if CONTRASTIVE <= abilities else []) + (list(captioner) if "caption" in abilities else []) \
        + (bow if "bow_logits" in abilities else [])


def resolve_tasks(tasks: list[str], source: str, abilities: frozenset[str] = CONTRASTIVE) -> list[str]:
    """`tasks` with every "auto" replaced by the suite for `source` and a model with these abilities."""
    out = []
    for t in tasks:
        out += auto_tasks(source, abilities) if t == "auto" else [t]
    return out
