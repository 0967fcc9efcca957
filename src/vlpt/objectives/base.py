"""The objective contract. An objective is an nn.Module that

- declares the model outputs it reads (`needs`: names such as "image_embed" or "image_pooled@image_views",
  see vlpt.models.outputs), and its typed `Options` (checked with the config: a wrong key or type names it;
  `check` may ask more of the recipe, e.g. a number of views);
- owns whatever parameters it needs (a temperature, projector MLPs, predictors, prototypes, a decoder),
  built in __init__ from the model config's widths (`output_width`) and the vocabulary;
- may add per-batch inputs before the forward pass (`prepare`), returns (loss, metrics) from the outputs
  (`forward`), and acts after each optimiser step (`after_step`: EMA targets, clamps, normalisation);
- may keep what it needs of the model itself (`attach`, called once with the built model): e.g. a frozen,
  averaged copy of the towers as a target network (vlpt.train.ema.EMA; objectives/byol.py);
- may offer evaluators what only its heads compute (`abilities`, e.g. "bow_logits", and `ability`); the
  inference model (vlpt.inference.Model) adds them to the model's own abilities.

`per_example = True` declares a loss that is a mean of per-example terms, each reading only its own example's
outputs (captioning): plain gradient accumulation is then exact, so the training step needs no GradCache pass
for it (vlpt.train.exact_accum). The default, False, is the safe one: the loss couples examples (contrastive
negatives, batch statistics, gathers).

`padding_free = True` declares a loss that does not depend on how many padding positions follow the captions
(it reads embeddings, or token positions only where they are real): the training loop may then drop the
columns that are padding in every caption of a batch (Pretrainer.trim_padding), which saves the text towers'
and the caption decoder's work on them. The default, False, is the safe one: e.g. M3AE masks a fraction of
all text positions, and CapPa's parallel rows attend to every position.

Its parameters train with the model (no weight decay on 1-D tensors and on names ending in `_token` or
`query`) and live in checkpoints. Gathers across processes live in the objective.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vlpt.data.tokenizer import Vocab
from vlpt.typed import build


def fp32(like: torch.Tensor):
    """Autocast off: similarity logits and their softmax/sigmoid need fp32 even in a bf16/fp16 run."""
    return torch.autocast(like.device.type, enabled=False)


class Objective(nn.Module):
    needs: frozenset[str] = frozenset()
    abilities: frozenset[str] = frozenset()  # what its heads give evaluators at inference (see `ability`)
    sets: frozenset[str] = frozenset()  # batch keys its prepare() adds that a view reads (e.g. "image_keep")
    per_example: bool = False
    padding_free: bool = False  # its loss is the same with the batch's all-padding text columns dropped
    ema_target: bool = False  # keeps an averaged copy of the model (`attach`), which train.fsdp cannot shard

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, options: dict | None = None, model=None, vocab: Vocab | None = None):
        """options: this objective's keys of the recipe; model: the vlpt.config.ModelConfig (widths, see
        vlpt.models.outputs.output_width); vocab: the tokenizer's size and special ids. Subclasses build their
        heads after calling this."""
        super().__init__()
        self.opts = self.parse_options(options or {})
        self.model_cfg, self.vocab = model, vocab
        self.needs = self.needs_for(self.opts)

    @classmethod
    def parse_options(cls, options: dict, prefix: str = "options"):
        """The typed Options of a recipe's dict; a ConfigError names an unknown key or a wrong type."""
        return build(cls.Options, dict(options), prefix + ".")

    @classmethod
    def needs_for(cls, options) -> frozenset[str]:
        """What the objective reads with these options (override when an option changes it)."""
        return frozenset(cls.needs)

    @classmethod
    def check(cls, options, cfg) -> None:
        """Raise vlpt.typed.ConfigError (one line: the key and the fix) when the rest of the recipe `cfg` (a
        vlpt.config.Config) cannot feed this objective, e.g. it needs exactly two image views. Runs with the
        config's validation, before any work; the message is prefixed with the objective's key."""

    def prepare(self, batch: dict) -> None:
        """Add per-batch inputs the model must see (e.g. CapPa's parallel switch) before the forward pass."""

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        """Called once by the Pretrainer with the built vlpt.models.model.ImageTextModel (towers already
        initialised from model.init and locked), before the run moves it to its device. An objective that
        reads more of the model than its outputs keeps it here, e.g. `self.target = EMA(...)` over the
        towers and its heads: a submodule made of frozen copies (no gradients, no optimiser state, saved in
        the checkpoints), never the model itself (its weights would be registered twice)."""

    def after_step(self, step: int, total: int) -> None:
        """After optimiser step `step` (1-based) of `total`: EMA targets, parameter clamps, normalisation."""

    def ability(self, name: str, model, images: torch.Tensor) -> torch.Tensor:
        """Ability `name` (one of `abilities`) of the trained `model` (an ImageTextModel in eval mode) on uint8
        images [B,3,H,W], e.g. BoW prediction's vocabulary logits; called under inference mode."""
        raise NotImplementedError(f"{type(self).__name__} declares no ability {name!r}")
