"""SimCLR's NT-Xent on two image views (Chen et al. 2020), the self-supervised half of SLIP (Mu et al. 2021)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from vlpt.models.outputs import output_width
from vlpt.objectives.base import Objective, fp32
from vlpt.objectives.heads import gather_views, mlp, per_view
from vlpt.train.distributed import rank
from vlpt.typed import ConfigError


class SimCLR(Objective):
    """Both image views' pooled features -> MLP head Linear(w,4096)-BN-ReLU-Linear(4096,4096)-BN-ReLU-
    Linear(4096,256) -> unit norm. Each embedding's positive is the other view of its image; its negatives
    are every other embedding of both views over the global batch (2G-2 of them); temperature fixed at 0.1.
    Loss = mean over all 2G anchors of -log softmax. Each rank scores its own anchors against the gathered
    embeddings (with gradients)."""

    needs = frozenset({"image_pooled@image_views"})
    padding_free = True

    @dataclasses.dataclass
    class Options:
        hidden: int = 4096  # SLIP's head (ssl_mlp_dim)
        dim: int = 256  # its output (ssl_emb_dim)
        temperature: float = 0.1

    def __init__(self, options: dict | None = None, model=None, vocab=None):
        super().__init__(options, model, vocab)
        w = output_width(model, "image_pooled")
        self.head = mlp([w, self.opts.hidden, self.opts.hidden, self.opts.dim])

    @classmethod
    def check(cls, options, cfg) -> None:
        if cfg.views.image_views.count != 2:
            raise ConfigError(f"NT-Xent reads exactly 2 image views, the recipe makes "
                              f"{cfg.views.image_views.count}; set views.image_views.count=2")

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        z = per_view(self.head, outputs["image_pooled@image_views"])
        with fp32(z):
            return nt_xent(F.normalize(z.float(), dim=-1), self.opts.temperature)


def nt_xent(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, dict]:
    """z [2,B,D] unit-norm embeddings of two views on this rank -> (NT-Xent over the global batch, metrics)."""
    a, b = z.unbind(0)
    keys_a, keys_b = gather_views(z).unbind(0)
    labels = torch.arange(a.shape[0], device=a.device) + rank() * a.shape[0]
    self_mask = F.one_hot(labels, keys_a.shape[0]).bool()
    # columns: the other view (the positive at `labels`), then the same view without the anchor itself
    logits_a = torch.cat([a @ keys_b.T, (a @ keys_a.T).masked_fill(self_mask, float("-inf"))], 1) / temperature
    logits_b = torch.cat([b @ keys_a.T, (b @ keys_b.T).masked_fill(self_mask, float("-inf"))], 1) / temperature
    loss = (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2
    with torch.no_grad():
        acc = (logits_a.argmax(1) == labels).float().mean()
    return loss, {"acc": acc}
