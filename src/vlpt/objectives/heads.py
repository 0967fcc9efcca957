"""Heads the self-supervised objectives own: MLP projectors and predictors with batch norm, applied per view.

Their BatchNorm1d layers become synchronised batch norm under DDP (vlpt.train.distributed.
convert_sync_batchnorm), so the statistics are those of the global batch, as in the reference code.
"""
from __future__ import annotations

import torch
from torch import nn

from vlpt.train.distributed import all_gather_with_grad


def mlp(widths: list[int], bias: bool = True, last_bias: bool = True, last_norm: str = "none") -> nn.Sequential:
    """Linear-BN-ReLU between each pair of `widths`, a plain Linear last: mlp([w, 4096, 4096, 256]) is
    Linear(w,4096)-BN-ReLU-Linear(4096,4096)-BN-ReLU-Linear(4096,256). `bias`: of the hidden Linears (a BN
    follows them); `last_norm`: "none", "bn" or "bn-plain" (a BN without affine parameters) after the last."""
    if last_norm not in ("none", "bn", "bn-plain"):
        raise ValueError(f"last_norm={last_norm!r}: choose none, bn or bn-plain")
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(w_in, w_out, bias=bias), nn.BatchNorm1d(w_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(widths[-2], widths[-1], bias=last_bias))
    if last_norm != "none":
        layers.append(nn.BatchNorm1d(widths[-1], affine=last_norm == "bn"))
    return nn.Sequential(*layers)


def per_view(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """head over each view of x [V,B,W] on its own -> [V,B,D]: each batch norm sees one view's batch, as when
    the reference code runs the head once per view."""
    return torch.stack([head(v) for v in x.unbind(0)])


def gather_views(x: torch.Tensor) -> torch.Tensor:
    """[V,B,D] on every rank -> [V,G,D] (G the global batch, ranks in order), with gradients."""
    return all_gather_with_grad(x.transpose(0, 1).contiguous()).transpose(0, 1)
