"""A trained model with its tokenizer, ready to embed images and texts (what evaluation uses)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlpt import config as config_lib
from vlpt.data.tokenizer import TextTokenizer
from vlpt.models.model import ImageTextModel
from vlpt.train import checkpoint
from vlpt.train.pretrainer import Pretrainer, build


class Encoder:
    """encode_images / encode_texts / image_features on batches, in inference mode."""

    def __init__(self, model: ImageTextModel, tokenizer: TextTokenizer, device: torch.device | str = "cpu"):
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.image_size = model.cfg.vision.image_size

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self._eval(lambda: self.model.encode_image(images.to(self.device)))

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self._eval(lambda: self.model.encode_text(self.tokenizer(texts).to(self.device)))

    @torch.inference_mode()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self._eval(lambda: self.model.image_features(images.to(self.device)))

    def _eval(self, fn):
        was_training = self.model.training
        self.model.eval()
        try:
            return fn().float().cpu()
        finally:
            self.model.train(was_training)


def load_pretrainer(path: str | Path, device: str = "cpu") -> tuple[config_lib.Config, TextTokenizer, Pretrainer, Path]:
    """Rebuilds the model and objectives of a run folder / checkpoint folder / model.safetensors."""
    ckpt = checkpoint.find(path)
    weights, meta = checkpoint.load_weights(ckpt)
    cfg = config_lib.from_dict(json.loads(meta["config"]))
    tokenizer = TextTokenizer.from_str(meta["tokenizer"], cfg.model.text.context_length)
    module = build(cfg, tokenizer)
    module.load_state_dict(weights)
    return cfg, tokenizer, module.to(device).eval(), ckpt


def load(path: str | Path, device: str = "cpu") -> Encoder:
    cfg, tokenizer, module, _ = load_pretrainer(path, device)
    return Encoder(module.model, tokenizer, device)
