"""Captioning loss (Cap; CapPa's parallel prediction: Tschannen et al. 2023; CoCa's captioning half).

Token cross-entropy with padding excluded and <eot> included, averaged over each example's real tokens,
then over the batch. With `parallel_prob` p, each EXAMPLE (never a single token) is switched with
probability p to parallel prediction: all decoder inputs become [MASK], attention is full, targets unchanged.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from vlpt.objectives.base import Objective, fp32


class Captioning(Objective):
    needs = frozenset({"caption_logits"})

    @dataclasses.dataclass
    class Options:
        parallel_prob: float = 0.0  # CapPa: 0.75; Cap and CoCa: 0

    def prepare(self, batch: dict) -> None:
        """Draw the per-example parallel-prediction switch (training only; generation is always causal)."""
        p = self.opts.parallel_prob
        if self.training and p > 0:
            text = batch["text"]
            batch["parallel"] = torch.rand(text.shape[0], device=text.device) < p

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        logits, real = outputs["caption_logits"], outputs["caption_mask"]
        targets = batch["text"][:, 1:]
        with fp32(logits):
            nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        per_example = (nll * real).sum(1) / real.sum(1).clamp(min=1)
        with torch.no_grad():
            acc = ((logits.argmax(-1) == targets) & real).sum() / real.sum().clamp(min=1)
            metrics = {"token_acc": acc}
            if "parallel" in batch:
                metrics["parallel_fraction"] = batch["parallel"].float().mean()
        return per_example.mean(), metrics
