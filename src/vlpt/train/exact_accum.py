"""Exact gradient accumulation for losses that couple examples (GradCache: Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup").

Plain accumulation computes each micro-batch's loss on its own, so a contrastive objective takes its
negatives from B/k examples instead of the batch the config names. Here a step
1. runs the model on every micro-batch without a graph and keeps its outputs (embeddings, features, the
   decoder's hidden states: small next to the activations a graph holds);
2. computes the objectives' losses on the whole batch's outputs, and back-propagates them to those outputs
   (and into the objectives' own parameters: temperatures, heads, the caption loss's output layer);
3. runs each micro-batch again, with its graph, and back-propagates the cached gradients of its outputs.
The result is the full-batch loss and gradient (up to float rounding) at the memory of one micro-batch, for
one more forward pass of the model. The objectives' per-batch draws (`prepare`: CapPa's switches) are made
once, on the whole batch; each micro-batch's RNG state is saved before pass 1 and restored for pass 3, so
dropout draws the same masks in both.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vlpt.train import distributed
from vlpt.train.microbatch import batch_dim, split

if TYPE_CHECKING:
    from vlpt.train.step import StepParts


class RngState:
    """The CPU generator's state and the accelerator's (whose generator dropout on it draws from)."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.accel = torch.get_device_module(device) if device.type != "cpu" else None
        self.accel_state = self.accel.get_rng_state() if self.accel is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accel is not None:
            self.accel.set_rng_state(self.accel_state)


def _joined(values: list, dim: int):
    """The micro-batches' values of one output as the whole batch's: float tensors become leaves that
    collect the loss's gradient; other tensors (masks) are concatenated; anything else (the caption head
    module) is the same object in every micro-batch."""
    first = values[0]
    if not isinstance(first, torch.Tensor):
        return first
    whole = torch.cat(values, dim=dim)
    return whole.requires_grad_() if whole.is_floating_point() else whole


def exact_backward(parts: StepParts, batch: dict) -> tuple[torch.Tensor, dict]:
    """Gradients of the whole batch's loss, accumulated over `parts.accum_steps` micro-batches (added to the
    parameters' .grad, averaged over ranks as DDP would) -> (the loss, its metrics)."""
    module, n, scaler = parts.module, parts.accum_steps, parts.scaler
    device = next(module.parameters()).device

    def autocast():
        return torch.autocast(device.type, dtype=parts.amp or torch.float32, enabled=parts.amp is not None)

    batch = module.prepare(batch)
    chunks = split(batch, n)
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState(device))
            with autocast():
                cached.append(module.model(chunk, module.needs))
    after = RngState(device)
    outputs = {k: _joined([c[k] for c in cached], batch_dim(k)) for k in cached[0]}
    del cached
    with autocast():
        loss, metrics = module.losses(outputs, batch)
    (scaler.scale(loss) if scaler else loss).backward()
    grads = {k: v.grad.chunk(n, dim=batch_dim(k)) for k, v in outputs.items()
             if isinstance(v, torch.Tensor) and v.grad is not None}
    del outputs
    for i, (chunk, state) in enumerate(zip(chunks, states)):
        state.restore()
        with autocast():
            got = module.model(chunk, module.needs)
        pairs = [(got[k], g[i]) for k, g in grads.items() if got[k].requires_grad]  # not a locked tower's
        if pairs:
            torch.autograd.backward(*zip(*pairs))
    after.restore()  # the RNG goes on as after one pass over the micro-batches, as plain accumulation's does
    if parts.ddp is not None:  # DDP's forward never ran, so its reducer did not average the gradients
        distributed.average_gradients(module.parameters())
    return loss.detach().float(), metrics
