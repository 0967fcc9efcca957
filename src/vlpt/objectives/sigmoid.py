"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), chunked over ranks: no global B x B matrix."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.objectives.base import Objective, fp32
from vlpt.train.distributed import all_gather_with_grad, rank


class Sigmoid(Objective):
    """-sum_j log sigmoid(z_ij * (exp(t) img_i . txt_j + b)), z = +1 on the diagonal else -1; mean over rows i.

    Each rank scores its local images against one rank's chunk of texts at a time, so the largest logits
    block is local x local.
    """

    needs = frozenset({"image_embed", "text_embed"})
    padding_free = True

    @dataclasses.dataclass
    class Options:
        init_scale: float = 10.0
        init_bias: float = -10.0

    def __init__(self, options: dict | None = None, model=None, vocab=None):
        super().__init__(options, model, vocab)
        self.log_scale = nn.Parameter(torch.tensor(math.log(self.opts.init_scale)))
        self.bias = nn.Parameter(torch.tensor(self.opts.init_bias))

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        with fp32(outputs["image_embed"]):
            return self._loss(outputs["image_embed"].float(), outputs["text_embed"].float())

    def _loss(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, dict]:
        b = img.shape[0]
        chunks = all_gather_with_grad(txt).split(b)
        scale = self.log_scale.exp()
        total = img.new_zeros(())
        for r, chunk in enumerate(chunks):
            logits = scale * img @ chunk.T + self.bias
            labels = -torch.ones_like(logits)
            if r == rank():
                labels += 2 * torch.eye(b, device=img.device)
            total = total + F.logsigmoid(labels * logits).sum()
        # every rank has the same number of rows, so the mean over ranks of this is the global row mean
        loss = -total / b
        return loss, {"scale": scale.detach(), "bias": self.bias.detach()}
