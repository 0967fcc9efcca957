"""A linear layer's cross-entropy computed in chunks of rows (a fused linear + cross-entropy).

A vocabulary head's loss never needs all its logits at once. Each chunk of rows gets its logits (in fp32, as
a softmax over tens of thousands of classes needs, a few rows at a time), its share of the loss and, since
the loss is a weighted sum whose weights are known in the forward pass, its gradients w.r.t. the rows, the
weight and the bias; then its logits are freed. Backward only scales the stored gradients. So a step does
the dense loss's three matmuls while holding one chunk's logit gradients (in the compute dtype) and a few
rows of fp32 logits, instead of all [N,V] logits plus their fp32 copy, their log-softmax and its gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         scale: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i scale_i * CE(x_i @ weight.T + bias, targets_i) -> (that sum in fp32, [N] bool: argmax == target).

    x [N,W], weight [V,W], bias [V] or None, targets [N] class ids, scale [N] per-row weights (constants: no
    gradient), chunk: rows per chunk. Under autocast the matmuls run in the autocast dtype, as nn.Linear's
    would; logits, softmax and the loss are fp32.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _LinearCrossEntropy.apply(x, weight, bias, targets, scale, chunk)
    return _chunked(x, weight, bias, targets, scale, chunk, (False, False, False))[:2]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, scale, chunk):
        loss, correct, *grads = _chunked(x, weight, bias, targets, scale, chunk, ctx.needs_input_grad[:3])
        ctx.grads = grads  # intermediates, not inputs or outputs: kept on ctx, scaled in place by backward
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward through the same loss twice")
        grads, ctx.grads = ctx.grads, None
        return (*(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads), None, None, None)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


SOFTMAX_LOGITS = 2**22  # fp32 logits per softmax pass (16 MB): row blocks that stay in a CPU's caches


def _chunked(x, weight, bias, targets, scale, chunk, need):
    """-> (loss, correct, grad x, grad weight, grad bias); a gradient is None where `need` says so.

    Each chunk of rows keeps its logits' gradient in the compute dtype, built by softmax passes over
    smaller row blocks (SOFTMAX_LOGITS), so the chunk's weight-gradient matmul has as many rows as memory
    allows while the fp32 softmax work stays small."""
    n, dtype = x.shape[0], _compute_dtype(x)
    grads = any(need)
    with torch.autocast(x.device.type, enabled=False):  # the casts are explicit here
        xc, w = x.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        correct = torch.empty(n, device=x.device, dtype=torch.bool)
        gx = torch.empty_like(x) if need[0] else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None  # fp32 sums over the chunks
        gb = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and need[2] else None
        block = max(1, min(chunk, SOFTMAX_LOGITS // weight.shape[0]))
        for start in range(0, n, chunk):
            xr = xc[start : start + chunk]
            g = torch.empty(len(xr), weight.shape[0], device=x.device, dtype=dtype) if grads else None
            for sub in range(0, len(xr), block):
                end = min(sub + block, len(xr))
                rows = slice(start + sub, start + end)
                t, s = targets[rows], scale[rows]
                logits = F.linear(xr[sub:end], w, b).float()
                top, best = logits.max(1)  # one pass for the argmax and logsumexp's shift
                target = logits.gather(1, t[:, None]).squeeze(1)
                correct[rows] = best == t
                p = logits.sub_(top[:, None]).exp_()  # the softmax's numerators, in place of the logits: one exp
                total = p.sum(1)
                loss += ((total.log() + top - target) * s).sum()
                if not grads:
                    continue
                p.mul_((s / total)[:, None])  # scale * softmax
                p[torch.arange(len(t), device=p.device), t] -= s  # d loss / d logits
                if gb is not None:
                    gb += p.sum(0)
                g[sub:end] = p
            if gx is not None:
                gx[start : start + chunk] = g @ w
            if gw is not None:
                if dtype == torch.float32:
                    gw.addmm_(g.T, xr)
                else:  # the [V,W] product added in place, with no fp32 copy of it
                    gw += g.T @ xr
    gw = None if gw is None else gw.to(weight.dtype)
    gb = None if gb is None else gb.to(bias.dtype)
    return loss, correct, gx, gw, gb
