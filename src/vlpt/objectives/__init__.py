"""Objectives by recipe name. Adding a method = adding an objective here, never editing the loop."""
from vlpt.objectives.base import Objective
from vlpt.objectives.captioning import Captioning
from vlpt.objectives.contrastive import Contrastive
from vlpt.objectives.sigmoid import Sigmoid

OBJECTIVES: dict[str, type[Objective]] = {
    "contrastive": Contrastive,
    "sigmoid": Sigmoid,
    "captioning": Captioning,
}

__all__ = ["OBJECTIVES", "Objective"]
