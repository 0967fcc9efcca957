"""A trained model with its tokenizer and preprocessing: what `vlpt.load` returns and evaluation uses.

    model = vlpt.load("runs/clip")
    image_embeddings = model.encode_image([Image.open("cat.jpg")])
    text_embeddings = model.encode_text(["a photo of a cat", "a photo of a dog"])
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch
from PIL import Image

from vlpt import config as config_lib
from vlpt.data.dataset import to_uint8
from vlpt.data.tokenizer import TextTokenizer
from vlpt.errors import UsageError
from vlpt.models import captioner
from vlpt.models.model import ImageTextModel
from vlpt.objectives import Objective
from vlpt.train import checkpoint
from vlpt.train.pretrainer import Pretrainer, build


Images = Union[Image.Image, str, Path, torch.Tensor, Sequence[Union[Image.Image, str, Path]]]


class Model:
    """A trained model in inference mode.

    User API (images: PIL images, paths, or uint8 tensors [B,3,H,W]; texts: a string or a list):
      encode_image, encode_text -> unit-norm embeddings; score_captions -> [B,C] log-likelihoods;
      generate -> captions; preprocess -> uint8 [B,3,S,S] as the model saw in training.
    Evaluation contract (uint8 batches): encode_images, encode_texts, image_features, image_tokens, caption,
    score_texts, caption_loss, count_tokens, token_ids, and `ability(name, images)` for what an objective's
    head offers (its `abilities`).
    """

    def __init__(self, model: ImageTextModel, tokenizer: TextTokenizer, device: torch.device | str = "cpu",
                 objectives: Mapping[str, Objective] | None = None):
        """`objectives`: the run's trained objectives, whose heads give abilities of their own (BoW prediction)."""
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.objectives = dict(objectives or {})
        self.image_size = model.cfg.vision.image_size

    # ------------------------------------------------------------------------------------ user API
    def preprocess(self, images: Images) -> torch.Tensor:
        """PIL images or paths -> uint8 [B,3,S,S] (RGB, shorter side resized, centre crop); tensors pass through."""
        if isinstance(images, torch.Tensor):
            return images if images.dim() == 4 else images[None]
        if isinstance(images, (Image.Image, str, Path)):
            images = [images]
        return torch.stack([to_uint8(Image.open(i) if isinstance(i, (str, Path)) else i, self.image_size) for i in images])

    def encode_image(self, images: Images) -> torch.Tensor:
        self._need(self.model.has_text_embed, "image embeddings", "a contrastive objective (CLIP, SigLIP, CoCa)")
        return self.encode_images(self.preprocess(images))

    def encode_text(self, texts: str | list[str]) -> torch.Tensor:
        self._need(self.model.has_text_embed, "text embeddings", "a contrastive objective (CLIP, SigLIP, CoCa)")
        return self.encode_texts([texts] if isinstance(texts, str) else list(texts))

    def score_captions(self, images: Images, texts: str | list[str], prompt: str = "", normalize: bool = False) -> torch.Tensor:
        self._need(self.model.has_decoder, "caption scores", "a caption decoder (Cap, CapPa, CoCa)")
        return self.score_texts(self.preprocess(images), [texts] if isinstance(texts, str) else list(texts), prompt, normalize)

    def generate(self, images: Images, **generation) -> list[str]:
        """Captions; keywords: method (beam|greedy|nucleus), beam_width, max_tokens, length_penalty, top_p, temperature."""
        self._need(self.model.has_decoder, "captions", "a caption decoder (Cap, CapPa, CoCa)")
        return self.caption(self.preprocess(images), **generation)

    def _need(self, ok: bool, what: str, needs: str) -> None:
        if not ok:
            raise UsageError(f"this model cannot give {what}: "
                             f"that needs a model trained with {needs}")

    # ------------------------------------------------------------------------------------ batches

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self._eval(lambda: self.model.encode_image(images.to(self.device)))

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self._eval(lambda: self.model.encode_text(self.tokenizer(texts).to(self.device)))

    @torch.inference_mode()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self._eval(lambda: self.model.image_features(images.to(self.device)))

    @torch.inference_mode()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B,N,W]: every token of the image encoder's last layer (what attentional probes read)."""
        return self._eval(lambda: self.model.visual(images.to(self.device))[1])

    @torch.inference_mode()
    def ability(self, name: str, images: torch.Tensor) -> torch.Tensor:
        """What the objective that declares ability `name` computes on uint8 images (e.g. "bow_logits")."""
        owner = next((o for o in self.objectives.values() if name in o.abilities), None)
        if owner is None:
            raise UsageError(f"this model has no ability {name!r}; it has {', '.join(sorted(self.abilities))}")
        return self._eval(lambda: owner.ability(name, self.model, images.to(self.device)))

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids as the model reads them, without <sot>, <eot> and padding."""
        specials = (self.tokenizer.pad_id, self.tokenizer.sot_id, self.tokenizer.eot_id)
        return [[i for i in row if i not in specials] for row in self.tokenizer(texts).tolist()]

    @property
    def abilities(self) -> frozenset[str]:
        """What evaluators may ask of this model (see vlpt.eval.registry): its towers' and its objectives'."""
        return self.model.abilities.union(*(o.abilities for o in self.objectives.values()))

    @property
    def has_decoder(self) -> bool:
        return self.model.has_decoder

    def _images(self, images: torch.Tensor) -> torch.Tensor | None:
        return None if self.model.visual is None else images.to(self.device)

    @torch.inference_mode()
    def caption(self, images: torch.Tensor, **generation) -> list[str]:
        """Captions for uint8 images [B,3,H,W]; keywords go to `vlpt.models.captioner.generate`."""
        generation.setdefault("max_tokens", min(30, self.model.cfg.text.context_length - 2))
        ids = self._eval(lambda: captioner.generate(self.model, self._images(images), batch=len(images), **generation))
        return [self.tokenizer.decode(seq) for seq in ids]

    @torch.inference_mode()
    def score_texts(self, images: torch.Tensor, texts: list[str], prompt: str = "", normalize: bool = False) -> torch.Tensor:
        """[B,C] log-likelihood of each text given each image; a `prompt` is read before it, not scored
        (the text's own tokens in the sentence "PROMPT TEXT" are: see TextTokenizer.after_prompt)."""
        ids, prefix = self.tokenizer.after_prompt(prompt, texts)
        return self._eval(lambda: captioner.score(self.model, self._images(images), ids.to(self.device),
                                                  normalize=normalize, prefix_len=prefix.to(self.device),
                                                  batch=len(images)))

    @torch.inference_mode()
    def score_own_texts(self, images: torch.Tensor, texts: list[list[str]]) -> list[torch.Tensor]:
        """For each image [i] the log-likelihoods of its own texts[i] (as score_texts without a prompt), in
        one decoder pass for all images: options of questions, without scoring every image x every text."""
        k = max(len(t) for t in texts)
        flat = [t for own in texts for t in [*own, *[own[-1]] * (k - len(own))]]  # repeat to k texts each
        ids = self.tokenizer(flat).to(self.device)
        scores = self._eval(lambda: captioner.score(self.model, self._images(images), ids, per_image=True,
                                                    batch=len(texts)))
        return [row[: len(own)] for row, own in zip(scores, texts)]

    def count_tokens(self, texts: list[str]) -> torch.Tensor:
        """[N] the number of tokens of each text that score_texts sums over (<eot> included, cut to the context)."""
        ids = self.tokenizer(texts)
        return (ids[:, 1:] != self.tokenizer.pad_id).sum(1)

    @torch.inference_mode()
    def caption_loss(self, images: torch.Tensor, texts: list[str]) -> tuple[float, int]:
        """(summed token negative log-likelihood, number of tokens) of texts[i] given images[i], <eot> included."""
        ids = self.tokenizer(texts).to(self.device)

        def run():
            m = self.model
            memory = None if m.decoder.blind else m.image_memory(m.visual(images.to(self.device))[1])
            logits, _ = m.decoder(ids, memory)
            real = ids[:, 1:] != m.decoder.pad_id
            nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
            return torch.stack([(nll * real).sum(), real.sum()])

        total, count = self._eval(run).tolist()
        return total, int(count)

    def _eval(self, fn):
        modules = [self.model, *self.objectives.values()]
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            out = fn()
            return out.float().cpu() if isinstance(out, torch.Tensor) else out
        finally:
            for m, mode in zip(modules, was_training):
                m.train(mode)


def load_pretrainer(path: str | Path, device: str = "cpu") -> tuple[config_lib.Config, TextTokenizer, Pretrainer, Path]:
    """Rebuilds the model and objectives of a run folder / checkpoint folder / model.safetensors."""
    ckpt = checkpoint.find(path)
    weights, meta = checkpoint.load_weights(ckpt)
    cfg = config_lib.from_dict(json.loads(meta["config"]))
    tokenizer = TextTokenizer.from_str(meta["tokenizer"], cfg.model.text.context_length)
    module = build(cfg, tokenizer.vocab)
    module.load_state_dict(weights)
    return cfg, tokenizer, module.to(device).eval(), ckpt


def load(path: str | Path, device: str = "cpu") -> Model:
    """A run folder, checkpoint folder or model.safetensors -> Model (see the module docstring)."""
    cfg, tokenizer, module, _ = load_pretrainer(path, device)
    return Model(module.model, tokenizer, device, module.objectives)

