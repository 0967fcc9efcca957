"""Captioning loss (Cap; CapPa's parallel prediction: Tschannen et al. 2023; CoCa's captioning half).

Token cross-entropy with padding excluded and <eot> included, averaged over each example's real tokens,
then over the batch. With `parallel_prob` p, each EXAMPLE (never a single token) is switched with
probability p to parallel prediction: all decoder inputs become [MASK], attention is full, targets unchanged.
"""
from __future__ import annotations

import dataclasses

import torch

from vlpt.objectives.base import Objective
from vlpt.objectives.linear_ce import linear_cross_entropy
from vlpt.typed import ConfigError

CHUNK_LOGITS = 2**26  # logits per chunk by default on a GPU: few large kernels
# on a CPU (their gradients 32 MB in bf16): tiny-coca trains as fast as with 2^26, in less memory (docs/results.md)
CHUNK_LOGITS_CPU = 2**24


class Captioning(Objective):
    """The loss applies the decoder's output layer itself, to the real target tokens only, in chunks
    (vlpt.objectives.linear_ce): the [B,L-1,V] logits are never built."""

    needs = frozenset({"caption_hidden"})
    per_example = True

    @dataclasses.dataclass
    class Options:
        parallel_prob: float = 0.0  # CapPa: 0.75; Cap and CoCa: 0
        chunk_tokens: int = 0  # target tokens per chunk of logits; 0: as many as make CHUNK_LOGITS(_CPU) logits

    @property
    def padding_free(self) -> bool:  # CapPa's parallel rows attend to every position, padding included
        return self.opts.parallel_prob == 0

    @classmethod
    def check(cls, options, cfg) -> None:
        if options.chunk_tokens < 0:
            raise ConfigError(f"chunk_tokens={options.chunk_tokens} must be >= 0 (0: automatic, or a number of "
                              f"target tokens per chunk of logits)")

    def prepare(self, batch: dict) -> None:
        """Draw the per-example parallel-prediction switch (training only; generation is always causal)."""
        p = self.opts.parallel_prob
        if self.training and p > 0:
            text = batch["text"]
            batch["parallel"] = torch.rand(text.shape[0], device=text.device) < p

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        hidden, head, real = outputs["caption_hidden"], outputs["caption_head"], outputs["caption_mask"]
        targets = batch["text"][:, 1:]
        # each token weighs 1 / (its example's real tokens * examples): per-example means, then their mean
        per_token = 1.0 / (real.sum(1).clamp(min=1) * real.shape[0]).float()
        scale = per_token[:, None].expand_as(real)[real]
        logits = CHUNK_LOGITS_CPU if hidden.device.type == "cpu" else CHUNK_LOGITS
        chunk = self.opts.chunk_tokens or max(1, logits // head.out_features)
        loss, correct = linear_cross_entropy(hidden[real], head.weight, head.bias, targets[real], scale, chunk)
        metrics = {"token_acc": correct.sum() / max(correct.numel(), 1)}
        if "parallel" in batch:
            metrics["parallel_fraction"] = batch["parallel"].float().mean()
        return loss, metrics
