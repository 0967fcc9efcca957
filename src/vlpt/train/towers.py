"""Towers that start from given weights (`model.init.<tower>`) or stay locked (`model.lock`, LiT).

A tower's weights come from a vlpt run folder, checkpoint folder or model.safetensors (the tensors under
`model.<module>.`), or from any safetensors file holding them with or without the `model.` prefix; a
`model.text.kind=minilm` text tower without model.init.text starts from the package's weights. Every
tensor of the tower must be there with its shape: a missing, unexpected or mis-shaped tensor is an error
naming it. The tower's projection into the shared space (image_proj, text_proj) is not part of it: it
starts fresh and trains, so a locked encoder of any width can be read by a contrastive loss.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vlpt.config import TOWERS, ConfigError, ModelConfig
from vlpt.models import minilm
from vlpt.models.outputs import TOWER_MODULES as MODULES
from vlpt.models.model import ImageTextModel
from vlpt.train import checkpoint


def source_file(path: str | Path) -> Path:
    """The safetensors file behind a run folder, checkpoint folder or file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"cannot read weights from {path}: no such run folder or safetensors file")
    if path.is_file():
        return path
    try:
        return checkpoint.find(path) / "model.safetensors"
    except checkpoint.CheckpointError as err:
        raise ConfigError(f"cannot read weights from {path}: {err}") from None


def source_metadata(path: str | Path) -> dict:
    """The metadata of a weights file (a vlpt checkpoint carries its config and tokenizer)."""
    try:
        with safe_open(str(source_file(path)), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for a file that is not one
        raise ConfigError(f"cannot read weights from {path}: {err}") from None


def tower_weights(path: str | Path, module: str) -> dict[str, torch.Tensor]:
    """The tensors of one tower module ("visual", "text", "decoder") in a weights file, keys without it."""
    state = load_file(str(source_file(path)))
    for prefix in (f"model.{module}.", f"{module}."):
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return found
    raise ConfigError(f"{path} holds no tensors of a {module} tower (no keys model.{module}.* or {module}.*)")


def from_package(cfg: ModelConfig, tower: str) -> bool:
    """A tower that starts from an installed package's weights: a minilm text tower not given model.init.text."""
    return tower == "text" and cfg.text.kind == "minilm" and cfg.init.text is None


def check_sources(cfg: ModelConfig) -> None:
    """Every model.init source (and package) is there and readable (before a run does any work)."""
    for tower in TOWERS:
        if getattr(cfg.init, tower) is not None:
            source_metadata(getattr(cfg.init, tower))
        elif from_package(cfg, tower):
            minilm.package_dir()


def init_towers(model: ImageTextModel, cfg: ModelConfig) -> None:
    """Copy each tower named in model.init (or a pretrained kind's) from its weights, checking names and
    shapes first."""
    for tower in TOWERS:
        path = getattr(cfg.init, tower)
        if path is not None:
            load_tower(model.tower(tower), tower_weights(path, MODULES[tower]), tower, f"model.init.{tower}={path}")
        elif from_package(cfg, tower):
            load_tower(model.tower(tower), minilm.pretrained_state(), tower, f"the package {minilm.PACKAGE}")


def load_tower(module, source: dict[str, torch.Tensor], tower: str, where: str) -> None:
    own = module.state_dict()
    if tower == "vision" and ("cls_token" in source) != ("cls_token" in own):  # pooling decides a ViT's [CLS]
        has, fix = ("a", "model.vision.pool=cls") if "cls_token" in source else ("no", "model.vision.pool=gap (or max, map)")
        raise ConfigError(f"{where}: that encoder has {has} [CLS] token and this model's pooling does not match; "
                          f"add {fix}")
    for name, tensor in own.items():
        if name not in source:
            raise ConfigError(f"{where} has no tensor {MODULES[tower]}.{name}; "
                              f"its model differs from this recipe's (compare its config)")
        if source[name].shape != tensor.shape:
            raise ConfigError(f"{where}: tensor {MODULES[tower]}.{name} has shape "
                              f"{list(source[name].shape)}, this model's has {list(tensor.shape)}")
    extra = sorted(set(source) - set(own))
    if extra:
        raise ConfigError(f"{where} has tensors this model's {tower} tower lacks "
                          f"({MODULES[tower]}.{extra[0]}{' and more' if len(extra) > 1 else ''}); "
                          f"its model differs from this recipe's (compare its config)")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in source.items()})


def lock_towers(model: ImageTextModel, lock: list[str]) -> None:
    for tower in lock:
        model.lock(tower)
