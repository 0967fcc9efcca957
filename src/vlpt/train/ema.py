"""An exponential moving average (EMA) of a module's weights: BYOL-style target networks, and `train.ema`
(a run evaluated with averaged weights as well).

After optimiser step k of K, for every parameter: target = m_k * target + (1 - m_k) * online, with
  constant  m_k = decay                                  (clip-rocket's BYOLIP target: 0.99)
  cosine    m_k = 1 - (1 - decay) * (cos(pi k / K) + 1) / 2   (BYOL's: from decay up to 1 at the end)
  warmup    m_k = min(decay, (1 + k) / (10 + k))          (TensorFlow's ExponentialMovingAverage with
            num_updates: early steps, when the weights move most, are not averaged with the random init)
Buffers (e.g. batch-norm statistics) are copied from the online module at each update.

The average is a frozen deep copy of the online module, made when the EMA is built: it has no gradients,
no optimiser state (the optimiser takes only parameters that require grad), no weight decay, and DDP does
not synchronise it. It is a function of the online weights after each step, which DDP keeps equal on every
rank, so every rank holds the same average. As a submodule of the module trained, it lives in the
checkpoints' weights, so a resumed run continues it bit-exactly.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from vlpt.config import EMA_SCHEDULES as SCHEDULES


def decay_at(decay: float, schedule: str, step: int, total: int) -> float:
    """m_k of the module docstring for optimiser step `step` (1-based) of `total`."""
    if schedule == "constant":
        return decay
    if schedule == "cosine":
        return 1 - (1 - decay) * (math.cos(math.pi * min(step, total) / max(total, 1)) + 1) / 2
    if schedule == "warmup":
        return min(decay, (1 + step) / (10 + step))
    raise ValueError(f"EMA schedule {schedule!r}: choose {', '.join(SCHEDULES)}")


class EMA(nn.Module):
    """`EMA(online, decay, schedule)`; `.module` is the average (call it as the online module), `update(step,
    total)` after each optimiser step."""

    def __init__(self, online: nn.Module, decay: float, schedule: str = "constant"):
        super().__init__()
        if not 0 <= decay <= 1:
            raise ValueError(f"EMA decay {decay} must be in [0, 1]")
        decay_at(decay, schedule, 1, 1)  # an unknown schedule fails here, not after the first step
        self.decay, self.schedule = decay, schedule
        self.module = copy.deepcopy(online).requires_grad_(False)
        self._online = (online,)  # a reference, not a submodule: the online weights stay where they are
        names = [n for n, _ in online.named_parameters()]
        if names != [n for n, _ in self.module.named_parameters()]:
            raise ValueError("the EMA's copy does not have the online module's parameters")

    @property
    def online(self) -> nn.Module:
        return self._online[0]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, step: int, total: int) -> float:
        """Average in the online weights after optimiser step `step` (1-based) of `total`; returns m_k."""
        m = decay_at(self.decay, self.schedule, step, total)
        targets = list(self.module.parameters())
        # lerp: target + (1 - m) (online - target), one fused op, and an online weight that does not move
        # (a locked tower) leaves its average exactly as it is
        torch._foreach_lerp_(targets, [p.detach() for p in self.online.parameters()], 1 - m)
        for mine, theirs in zip(self.module.buffers(), self.online.buffers()):
            mine.copy_(theirs)
        return m

    def extra_repr(self) -> str:
        return f"decay={self.decay}, schedule={self.schedule}"
