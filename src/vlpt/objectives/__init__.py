"""Objectives by recipe name, or by import path ("my_pkg.losses:Align") for objectives outside vlpt.

Adding a method = adding an objective (and a recipe), never editing the loop or the model.
"""
from __future__ import annotations

import difflib

from vlpt.objectives.barlow import Barlow
from vlpt.objectives.base import Objective
from vlpt.objectives.bow import BowPrediction
from vlpt.objectives.byol import Byol
from vlpt.objectives.captioning import Captioning
from vlpt.objectives.cl2l import CL2L
from vlpt.objectives.contrastive import Contrastive
from vlpt.objectives.m3ae import M3AE
from vlpt.objectives.mae import MAE
from vlpt.objectives.siamese import Siamese
from vlpt.objectives.sigmoid import Sigmoid
from vlpt.objectives.simclr import SimCLR
from vlpt.objectives.swav import SwAV

OBJECTIVES: dict[str, type[Objective]] = {
    "contrastive": Contrastive,
    "sigmoid": Sigmoid,
    "captioning": Captioning,
    "simclr": SimCLR,  # SLIP
    "barlow": Barlow,  # BarLIP
    "siamese": Siamese,  # SiamLIP
    "swav": SwAV,  # SwALIP
    "cl2l": CL2L,  # clip-rocket
    "bow_prediction": BowPrediction,
    "mae": MAE,
    "m3ae": M3AE,
    "byol": Byol,
}


def objective_class(name: str) -> type[Objective]:
    """A built-in objective by name, or any Objective subclass by "module.path:Class"."""
    from vlpt.plugins import import_class
    from vlpt.typed import ConfigError

    if ":" in name:
        try:
            return import_class(name, Objective, "objective")
        except ValueError as err:
            raise ConfigError(f"objectives.{name}: {err}") from None
    if name not in OBJECTIVES:
        near = difflib.get_close_matches(name, list(OBJECTIVES), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"unknown objective 'objectives.{name}'{hint}; objectives: {', '.join(OBJECTIVES)}, "
                          f"or an import path such as my_pkg.losses:MyObjective")
    return OBJECTIVES[name]


__all__ = ["OBJECTIVES", "Objective", "objective_class"]
