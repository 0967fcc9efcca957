"""The model plus a recipe's objectives: one forward pass computes every output the objectives need."""
from __future__ import annotations

import torch
from torch import nn

from vlpt.config import Config, model_needs
from vlpt.data.tokenizer import Vocab
from vlpt.models.model import ImageTextModel
from vlpt.objectives import Objective, objective_class


def module_key(name: str) -> str:
    """An objective's name as a submodule name ("my_pkg.losses:Align" has dots, which modules cannot)."""
    return name.replace(".", "_")


class Pretrainer(nn.Module):
    def __init__(self, model: ImageTextModel, objectives: dict[str, Objective], weights: dict[str, float]):
        super().__init__()
        self.model = model
        self.objectives = nn.ModuleDict({module_key(k): o for k, o in objectives.items()})
        self.names = dict(zip(self.objectives, objectives))  # module key -> the recipe's name
        self.weights = {module_key(k): w for k, w in weights.items()}
        self.needs = frozenset().union(*(o.needs for o in objectives.values()))

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        batch = self.prepare(batch)
        return self.losses(self.model(batch, self.needs), batch)

    # the three stages, which exact gradient accumulation (vlpt.train.exact_accum) runs apart
    def prepare(self, batch: dict) -> dict:
        """A copy of `batch` with the objectives' per-batch inputs (e.g. CapPa's parallel switch)."""
        batch = dict(batch)
        for objective in self.objectives.values():
            objective.prepare(batch)
        return batch

    def losses(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        """The weighted sum of the objectives' losses on the model's `outputs`, and their metrics."""
        total, metrics = 0.0, {}
        for key, objective in self.objectives.items():
            loss, extra = objective(outputs, batch)
            total = total + self.weights[key] * loss
            name = self.names[key]
            metrics[f"{name}/loss"] = loss.detach()
            metrics.update({f"{name}/{k}": v for k, v in extra.items()})
        return total, metrics

    def after_step(self, step: int, total: int) -> None:
        """The objectives' hooks after optimiser step `step` (EMA targets, clamps)."""
        for objective in self.objectives.values():
            objective.after_step(step, total)


def build(cfg: Config, vocab: Vocab) -> Pretrainer:
    """The model the objectives need, then the objectives (which may build heads on its widths)."""
    model = ImageTextModel(cfg.model, vocab, model_needs(cfg), cfg.views.text_views.dropout)
    objectives = {name: objective_class(name)(o.options, cfg.model, vocab) for name, o in cfg.objectives.items()}
    return Pretrainer(model, objectives, {name: o.weight for name, o in cfg.objectives.items()})
