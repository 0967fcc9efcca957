"""The model plus a recipe's objectives: one forward pass computes every output the objectives need."""
from __future__ import annotations

import torch
from torch import nn

from vlpt.config import Config
from vlpt.data.tokenizer import TextTokenizer
from vlpt.models.model import ImageTextModel
from vlpt.objectives import OBJECTIVES


class Pretrainer(nn.Module):
    def __init__(self, model: ImageTextModel, objectives: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.model = model
        self.objectives = nn.ModuleDict(objectives)
        self.weights = weights
        self.needs = frozenset().union(*(o.needs for o in objectives.values()))

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        batch = dict(batch)
        for objective in self.objectives.values():
            objective.prepare(batch)
        outputs = self.model(batch, self.needs)
        total, metrics = 0.0, {}
        for name, objective in self.objectives.items():
            loss, extra = objective(outputs, batch)
            total = total + self.weights[name] * loss
            metrics[f"{name}/loss"] = loss.detach()
            metrics.update({f"{name}/{k}": v for k, v in extra.items()})
        return total, metrics


def build(cfg: Config, tokenizer: TextTokenizer) -> Pretrainer:
    objectives = {name: OBJECTIVES[name](o.options) for name, o in cfg.objectives.items()}
    needs = frozenset().union(*(o.needs for o in objectives.values()))
    model = ImageTextModel(cfg.model, tokenizer.vocab_size, tokenizer.eot_id, needs,
                           tokenizer.pad_id, tokenizer.mask_id, tokenizer.sot_id)
    return Pretrainer(model, objectives, {name: o.weight for name, o in cfg.objectives.items()})
