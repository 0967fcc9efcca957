"""The objective contract: an nn.Module that declares the model outputs it reads and returns (loss, metrics).

Objectives may own parameters (a temperature, a head); they train with the model and live in checkpoints.
"""
from __future__ import annotations

import dataclasses
import difflib

import torch
from torch import nn


def fp32(like: torch.Tensor):
    """Autocast off: similarity logits and their softmax/sigmoid need fp32 even in a bf16/fp16 run."""
    return torch.autocast(like.device.type, enabled=False)


class Objective(nn.Module):
    needs: frozenset[str] = frozenset()

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, options: dict | None = None):
        super().__init__()
        self.opts = self.parse_options(options or {})

    @classmethod
    def parse_options(cls, options: dict, prefix: str = "options"):
        from vlpt.config import ConfigError

        valid = [f.name for f in dataclasses.fields(cls.Options)]
        for k in options:
            if k not in valid:
                near = difflib.get_close_matches(k, valid, n=1)
                hint = f"; did you mean '{prefix}.{near[0]}'?" if near else f" (valid: {', '.join(valid) or 'none'})"
                raise ConfigError(f"unknown option '{prefix}.{k}'{hint}")
        return cls.Options(**options)

    @classmethod
    def check_options(cls, options: dict, prefix: str) -> None:
        cls.parse_options(options, prefix)

    def prepare(self, batch: dict) -> None:
        """Add per-batch inputs the model must see (e.g. CapPa's parallel switch) before the forward pass."""

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError
