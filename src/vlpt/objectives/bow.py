"""Bag-of-words prediction: the baseline between captioning and contrastive in CLIP's Figure 2 (Radford et
al. 2021, section 2.3; after Joulin et al. 2016).

The pooled image feature goes through one linear layer to the vocabulary; the target is the caption's
distinct tokens (padding, <sot> and <eot> excluded) as a normalised multi-hot distribution; the loss is the
softmax cross-entropy against it, averaged over the captions that have a token. The head is this
objective's own, and it offers it to evaluators as the ability "bow_logits" (zero-shot: vlpt.eval.bow).
"""
from __future__ import annotations

import torch
from torch import nn

from vlpt.data.tokenizer import Vocab
from vlpt.models.outputs import output_width
from vlpt.objectives.base import Objective, fp32


def bag_of_words(text: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """Token ids [B,L] -> [B,V]: 1/n on each of the caption's n distinct tokens (a token seen twice counts
    once; padding, <sot> and <eot> are not words); a caption without words is all zeros."""
    hot = torch.zeros(text.shape[0], vocab.size, device=text.device).scatter_(1, text, 1.0)
    hot[:, [vocab.pad, vocab.sot, vocab.eot]] = 0
    return hot / hot.sum(1, keepdim=True).clamp(min=1)


class BowPrediction(Objective):
    needs = frozenset({"image_pooled"})
    padding_free = True
    abilities = frozenset({"bow_logits"})

    def __init__(self, options: dict | None = None, model=None, vocab: Vocab | None = None):
        super().__init__(options, model, vocab)
        width = output_width(model, "image_pooled")
        self.head = nn.Linear(width, vocab.size)
        # initialised as the model's projections, not zero as the caption decoder's output layer: a zero head
        # passes the encoder no gradient while the bias fits the word frequencies, a plateau the image
        # features were slow to leave (micro model on scenes, zero-shot colour: chance after 100 steps with
        # a zero head, 70% after 300; 61-81% after 100 steps with this one)
        nn.init.normal_(self.head.weight, std=width**-0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        target = bag_of_words(batch["text"], self.vocab)
        logits = self.head(outputs["image_pooled"])
        with fp32(logits):
            nll = -(target * logits.float().log_softmax(-1)).sum(1)
        has_words = target.sum(1) > 0
        loss = nll.sum() / has_words.sum().clamp(min=1)
        with torch.no_grad():  # is the likeliest word one of the caption's?
            hit = (target.gather(1, logits.argmax(1, keepdim=True))[:, 0] > 0).float().mean()
        return loss, {"top1_in_caption": hit}

    def ability(self, name: str, model, images: torch.Tensor) -> torch.Tensor:
        """"bow_logits": the head's vocabulary logits [B,V] on the model's pooled image features."""
        if name != "bow_logits":
            return super().ability(name, model, images)
        return self.head(model.image_features(images))
