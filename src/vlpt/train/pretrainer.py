"""The model plus a recipe's objectives: one forward pass computes every output the objectives need; and,
with `train.ema`, an average of the model's weights (vlpt.train.ema) evaluated beside it."""
from __future__ import annotations

import torch
from torch import nn

from vlpt.config import Config, model_needs
from vlpt.data.tokenizer import Vocab
from vlpt.models.model import ImageTextModel
from vlpt.models.outputs import abilities_of
from vlpt.objectives import Objective, objective_class
from vlpt.train.ema import EMA
from vlpt.train.towers import init_towers, lock_towers

TEXT_KEYS = ("text", "text_views")  # a batch's token ids [..., L], positions last


def module_key(name: str) -> str:
    """An objective's name as a submodule name ("my_pkg.losses:Align" has dots, which modules cannot)."""
    return name.replace(".", "_")


class Pretrainer(nn.Module):
    def __init__(self, model: ImageTextModel, objectives: dict[str, Objective], weights: dict[str, float],
                 ema: float = 0.0, ema_schedule: str = "warmup"):
        """`ema` > 0: also keep `self.ema`, an average of the model's weights with that decay (train.ema)."""
        super().__init__()
        self.model = model
        self.objectives = nn.ModuleDict({module_key(k): o for k, o in objectives.items()})
        self.names = dict(zip(self.objectives, objectives))  # module key -> the recipe's name
        self.weights = {module_key(k): w for k, w in weights.items()}
        self.needs = frozenset().union(*(o.needs for o in objectives.values()))
        for objective in self.objectives.values():
            objective.attach(model)
        self.ema = EMA(model, ema, ema_schedule) if ema > 0 else None

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        batch = self.prepare(batch)
        return self.losses(self.model(batch, self.needs), batch)

    @property
    def padding_free(self) -> bool:
        """Whether the losses are the same with the batch's all-padding text columns dropped."""
        return self.model.padding_free and all(o.padding_free for o in self.objectives.values())

    def trim_padding(self, batch: dict, multiple: int = 8) -> dict:
        """`batch` without the trailing text columns that are padding in every caption and every text view,
        rounded up to a multiple of `multiple` columns (aligned matmuls, few shapes for torch.compile); the
        batch itself when a part of the recipe reads padding. Call it while the batch is on the host: the
        length is read from the tokens. Captions are mostly shorter than the context, so the text towers and
        the caption decoder skip most padding (positions are absolute, so the rest is unchanged)."""
        keys = [k for k in TEXT_KEYS if k in batch]
        if not keys or not self.padding_free:
            return batch
        width = batch[keys[0]].shape[-1]
        real = torch.cat([(batch[k] != self.model.pad_id).reshape(-1, width) for k in keys]).any(0)
        used = int(real.nonzero().max()) + 1 if real.any() else 1
        length = min(width, -(-used // multiple) * multiple)
        if length == width:
            return batch
        return {**batch, **{k: batch[k][..., :length].contiguous() for k in keys}}

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
        """The objectives' hooks after optimiser step `step` (EMA targets, clamps), then the model's average."""
        for objective in self.objectives.values():
            objective.after_step(step, total)
        if self.ema is not None:
            self.ema.update(step, total)


def abilities(cfg: Config) -> frozenset[str]:
    """What evaluators may ask of a model trained with this recipe (vlpt.inference.Model.abilities), known
    before it is built: its towers' abilities and its objectives' heads'."""
    own = [objective_class(name).abilities for name in cfg.objectives]
    return abilities_of(cfg.model, model_needs(cfg)).union(*own)


def build(cfg: Config, vocab: Vocab, init: bool = False) -> Pretrainer:
    """The model the objectives need, then the objectives (which may build heads on its widths).

    `init`: a new run, whose towers start from model.init (a resumed or loaded run reads its own weights
    after this). Towers are initialised and locked before the objectives attach, so that averaged copies of
    the model start from the weights the run starts from.
    """
    model = ImageTextModel(cfg.model, vocab, model_needs(cfg), cfg.views.text_views.dropout)
    if init:
        init_towers(model, cfg.model)
    lock_towers(model, cfg.model.lock)
    objectives = {name: objective_class(name)(o.options, cfg.model, vocab) for name, o in cfg.objectives.items()}
    return Pretrainer(model, objectives, {name: o.weight for name, o in cfg.objectives.items()}, cfg.train.ema,
                      cfg.train.ema_schedule)
