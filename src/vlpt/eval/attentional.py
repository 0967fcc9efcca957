"""Attentional probe (CoCa's frozen-feature protocol): a new attention pooler with one learned query, a
LayerNorm and a linear classifier, trained with AdamW on the frozen image encoder's tokens.

The tokens are computed once per evaluation and kept as float16 on the CPU (images x tokens x width x 2
bytes). The number of epochs is chosen on a seeded, stratified fifth of TRAIN: a run of `epochs` epochs on
the other four fifths, the epoch with the best validation accuracy (the earliest on ties). The probe is then
trained afresh on all of TRAIN for that many epochs and scored once on TEST. The learning rate is constant,
so an epoch count carries over from the first run to the second. Same tokens and seed, same result (on a CPU).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from vlpt.progress import bar

from vlpt.eval.batching import batched
from vlpt.eval.probes import labelled_pair, probe_specs, validation_split
from vlpt.eval.registry import EvalOptions, Evaluator, register
from vlpt.models.layers import AttentionPool

# the defaults, documented in docs/guide.md ("Evaluation tasks")
EPOCHS = 30
LR = 1e-3
WEIGHT_DECAY = 1e-4
BATCH_SIZE = 64
HEADS = 8  # or the most heads below 8 that divide the token width
VAL_FRACTION = 0.2


class ProbeHead(nn.Module):
    """tokens [B,N,W] -> class logits [B,C]: one-query attention pooling, LayerNorm, linear."""

    def __init__(self, width: int, classes: int, heads: int):
        super().__init__()
        self.pool = AttentionPool(width, heads, queries=1)
        self.norm = nn.LayerNorm(width)
        self.classify = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classify(self.norm(self.pool(tokens)[:, 0]))


def pooler_heads(width: int, wanted: int = HEADS) -> int:
    """The most heads, up to `wanted`, that divide the token width."""
    return max(h for h in range(1, wanted + 1) if width % h == 0)


@torch.no_grad()
def _accuracy(head: ProbeHead, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> float:
    head.eval()
    right = sum(int((head(x[a:a + batch_size].to(device).float()).argmax(1).cpu() == y[a:a + batch_size]).sum())
                for a in range(0, len(x), batch_size))
    return 100.0 * right / len(x)


@torch.enable_grad()  # trains even when a caller evaluates under no_grad
def _train(x, y, classes, epochs, seed, lr, weight_decay, batch_size, heads, device, progress, val=None, desc=""):
    """A probe trained on (x, y) for `epochs` epochs; with `val` = (x, y), also the validation accuracy
    after each epoch."""
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's random stream alone
        torch.manual_seed(seed)
        head = ProbeHead(x.shape[-1], classes, pooler_heads(x.shape[-1], heads)).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    order = torch.Generator().manual_seed(seed)
    val_acc = []
    for _ in bar(range(epochs), progress, desc=desc, leave=False):
        head.train()
        for idx in torch.randperm(len(x), generator=order).split(batch_size):
            loss = F.cross_entropy(head(x[idx].to(device).float()), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if val is not None:
            val_acc.append(_accuracy(head, *val, batch_size, device))
    return head, val_acc


def attentional_probe(
    train_tokens: torch.Tensor,
    train_labels,
    test_tokens: torch.Tensor,
    test_labels,
    seed: int = 0,
    epochs: int = EPOCHS,
    lr: float = LR,
    weight_decay: float = WEIGHT_DECAY,
    batch_size: int = BATCH_SIZE,
    heads: int = HEADS,
    val_fraction: float = VAL_FRACTION,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """attentional_probe_top1 (test accuracy, %), attentional_probe_epochs (the epochs chosen) and
    attentional_probe_val_top1 (their validation accuracy, %; absent when TRAIN is too small to hold out a
    split, and then all `epochs` are trained). Tokens: [N, T, W]; labels: ints."""
    y_tr = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    y_te = torch.as_tensor(np.asarray(test_labels), dtype=torch.long)
    if len(y_tr.unique()) < 2:
        raise ValueError("an attentional probe needs at least two classes in the training labels")
    classes = int(max(y_tr.max(), y_te.max())) + 1
    fit = dict(classes=classes, seed=seed, lr=lr, weight_decay=weight_decay, batch_size=batch_size, heads=heads,
               device=device, progress=progress)
    val_top1 = None
    split = validation_split(y_tr.numpy(), val_fraction, seed)
    if split is not None:
        f, v = (torch.as_tensor(i) for i in split)
        _, val_acc = _train(train_tokens[f], y_tr[f], epochs=epochs, val=(train_tokens[v], y_tr[v]),
                            desc="probe epochs (validation)", **fit)
        epochs = int(np.argmax(val_acc)) + 1  # the first of the best
        val_top1 = val_acc[epochs - 1]
    head, _ = _train(train_tokens, y_tr, epochs=epochs, desc="probe epochs", **fit)
    out = {"attentional_probe_top1": _accuracy(head, test_tokens, y_te, batch_size, device),
           "attentional_probe_epochs": float(epochs)}
    if val_top1 is not None:
        out["attentional_probe_val_top1"] = val_top1
    return out


def frozen_tokens(model, images: torch.Tensor, options: EvalOptions, desc: str) -> torch.Tensor:
    """The encoder's tokens of every image, [N,T,W] float16 on the CPU."""
    parts = batched(lambda a, b: model.image_tokens(images[a:b]).to("cpu", torch.float16), len(images),
                    options.batch_size, options.progress, desc)
    return torch.cat(parts)


@register("attentional_probe")
class AttentionalProbe(Evaluator):
    """attentional_probe:TRAIN|TEST: a one-query attention pooler + LayerNorm + linear classifier trained on the
    frozen encoder tokens, epochs chosen on a fifth of TRAIN (attentional_probe_top1 and
    attentional_probe_val_top1 in %, attentional_probe_epochs); "X:train" alone means "X:train|X:test"."""

    requires = frozenset({"image_tokens"})

    def data_specs(self, data: str) -> list[str]:
        return list(probe_specs(data, self.name))

    def __call__(self, model, data: str, options: EvalOptions) -> dict[str, float]:
        (train_images, train), (test_images, test) = labelled_pair(self.name, data, model.image_size, options)
        train_tokens = frozen_tokens(model, train_images, options, "train tokens")
        test_tokens = frozen_tokens(model, test_images, options, "test tokens")
        return attentional_probe(train_tokens, train.labels, test_tokens, test.labels,
                                 device=getattr(model, "device", "cpu"), progress=options.progress)
