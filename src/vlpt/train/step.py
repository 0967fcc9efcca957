"""One optimisation step: forward, weighted losses, backward, clip, optimiser, the objectives' after-step
hooks. The training loop, the benchmarks and the tests all call `train_step`.

A batch is a dict of tensors. Device transfer and the micro-batch split (vlpt.train.microbatch) treat every
key alike, so a new key needs no change here.

With several micro-batches per step (`accum_steps`), gradients accumulate in one of two ways. Plain: each
micro-batch's loss on its own, which is exact only for losses that are means of per-example terms. Exact
(vlpt.train.exact_accum, GradCache): the loss over the whole batch, for one more forward pass; used whenever
an objective couples examples (`Objective.per_example` is False), e.g. contrastive negatives.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from vlpt.train import distributed, fsdp
from vlpt.train.exact_accum import exact_backward
from vlpt.train.microbatch import batch_dim, split  # noqa: F401  (importable from here too)
from vlpt.train.pretrainer import Pretrainer


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def sum_over_ranks(device: torch.device, *values: int) -> list[int]:
    """Per-step decisions (skip, stop, save) must be the same on every rank: one small all-reduce."""
    if not distributed.is_distributed():
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], device=device, dtype=torch.int64)
    torch.distributed.all_reduce(t)
    return t.tolist()


@dataclass
class StepParts:
    """What one step needs. `run` computes (loss, metrics) from a batch: the module itself, or the module
    wrapped in DDP (`ddp`) and/or compiled. `exact`: accumulate exactly (GradCache) when accum_steps > 1;
    None chooses it when an objective couples examples. `sharded`: the module is sharded with FSDP2
    (vlpt.train.fsdp) instead of wrapped in DDP."""

    module: Pretrainer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    run: Callable | None = None
    ddp: DistributedDataParallel | None = None
    scaler: torch.amp.GradScaler | None = None
    amp: torch.dtype | None = None
    accum_steps: int = 1
    grad_clip: float = 1.0
    exact: bool | None = None
    sharded: bool = False

    def __post_init__(self):
        if self.run is None:
            self.run = self.ddp if self.ddp is not None else self.module
        if self.exact is None:
            self.exact = not all(o.per_example for o in self.module.objectives.values())
        self.exact = self.exact and self.accum_steps > 1


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    metrics: dict  # the last micro-batch's metrics, the whole batch's when exact (tensors: read them when logging)
    updated: bool  # False: a non-finite loss or gradient somewhere; no update was made
    flags: list[int]  # the caller's flags, summed over ranks


def backward(parts: StepParts, batch: dict) -> tuple[torch.Tensor, dict]:
    """Plain accumulation: each micro-batch's loss and backward on its own (DDP reduces during the last one).
    -> (the mean of the micro-batches' losses, the last one's metrics)."""
    device = next(parts.module.parameters()).device
    chunks = split(batch, parts.accum_steps)
    total_loss, metrics = torch.zeros((), device=device), {}
    for k, chunk in enumerate(chunks):
        last = k == len(chunks) - 1
        sync = nullcontext() if last or parts.ddp is None else parts.ddp.no_sync()
        if parts.sharded:  # FSDP2's no_sync: gradients are reduce-scattered in the last backward only
            parts.module.set_requires_gradient_sync(last)
        with sync, torch.autocast(device.type, dtype=parts.amp or torch.float32, enabled=parts.amp is not None):
            loss, metrics = parts.run(chunk)
            scaled = loss / len(chunks)
        (parts.scaler.scale(scaled) if parts.scaler else scaled).backward()
        total_loss += loss.detach().float() / len(chunks)
    return total_loss, metrics


def train_step(parts: StepParts, batch: dict, step: int, total: int, flags: tuple[int, ...] = ()) -> StepResult:
    """Optimisation step `step` (1-based) of `total` on a batch already on the device.

    A non-finite loss or gradient norm on any rank skips the update everywhere (the schedule still
    advances). `flags` (e.g. "a stop signal arrived") are summed over ranks in the same all-reduce as that
    check, the step's one host sync.
    """
    module, optimizer, scaler = parts.module, parts.optimizer, parts.scaler
    device = next(module.parameters()).device
    total_loss, metrics = (exact_backward if parts.exact else backward)(parts, batch)
    if scaler:
        scaler.unscale_(optimizer)
    # parameters without a gradient (a locked tower) are skipped by clip_grad_norm_ itself
    max_norm = parts.grad_clip if parts.grad_clip > 0 else float("inf")
    if not parts.sharded:
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    else:  # the parameters FSDP leaves whole have their gradients averaged here
        fsdp.average_replicated(module)
        grad_norm = fsdp.clip_grad_norm_(module.parameters(), max_norm)
    loss_value, norm_value = torch.stack([total_loss, grad_norm.detach().float()]).tolist()  # the step's host sync
    nonfinite, *summed = sum_over_ranks(device, not (math.isfinite(loss_value) and math.isfinite(norm_value)), *flags)
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.update()
    else:
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.after_step(step, total)
    if parts.scheduler is not None:
        parts.scheduler.step()
    return StepResult(loss_value, norm_value, metrics, not nonfinite, summed)
