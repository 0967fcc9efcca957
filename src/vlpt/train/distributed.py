"""torchrun-aware process setup, the collectives objectives need (all through torch.distributed), and batch
norm over the global batch for the objectives' heads."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def setup() -> torch.device:
    """Joins the process group when launched by torchrun; returns this process's device."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def teardown() -> None:
    if is_distributed():
        dist.barrier()  # no rank may tear down gloo while another still talks to it (it aborts)
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def average_gradients(params) -> None:
    """Each gradient's mean over ranks, as DDP's reducer makes it, for a step that back-propagates without
    DDP's forward (exact accumulation). One all-reduce per dtype; every rank has the same gradients set."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):  # the same order on every rank
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, mean in zip(group, flat.split([g.numel() for g in group])):
            g.copy_(mean.view_as(g))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient of the gathered tensor and keeps this rank's
    slice (an all-reduce, which every backend has, unlike the all-to-all torch's own version needs on gloo)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size(), dim=0)[dist.get_rank()]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates x from every rank along dim 0; gradients flow back to each rank's own shard."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks forward; backward sums every rank's gradient of the sum (each rank's loss depends on
    it), the same convention as _GatherWithGrad: DDP's average then gives the gradient of the mean loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over ranks; gradients flow back to every rank's own x."""
    return _AllReduceWithGrad.apply(x) if is_distributed() else x


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch for CPU processes (gloo), where torch's nn.SyncBatchNorm refuses to
    run (and DDP refuses modules holding one): the per-channel sums are all-reduced with gradients. In eval
    mode or in one process it is plain batch norm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        flat = x.float().transpose(0, 1).reshape(c, -1)  # [C, N * spatial]
        sums = all_reduce_with_grad(torch.cat([flat.sum(1), flat.new_tensor([flat.shape[1]])]))
        count = sums[-1].detach()
        mean = sums[:c] / count
        centred = flat - mean[:, None]
        var = all_reduce_with_grad((centred * centred).sum(1)) / count  # two passes: no E[x^2] - E[x]^2 cancellation
        y = centred * torch.rsqrt(var + self.eps)[:, None]
        if self.affine:
            y = y * self.weight[:, None] + self.bias[:, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * count / (count - 1).clamp(min=1)).to(self.running_var.dtype), m)
        return y.reshape(c, x.shape[0], *x.shape[2:]).transpose(0, 1).to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every batch-norm layer in `module` (the objectives' heads) starts computing its statistics over the
    global batch, so that N processes normalise as one process with the global batch would: torch's
    nn.SyncBatchNorm on accelerators, CPUSyncBatchNorm on CPU. The new layers share the old ones' parameters
    and buffers (an optimiser built before keeps working; checkpoint keys do not change). In place."""
    for name, child in module.named_children():
        synced = isinstance(child, (nn.SyncBatchNorm, CPUSyncBatchNorm))
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not synced:
            cpu = (child.weight if child.affine else child.running_mean).device.type == "cpu"
            cls = CPUSyncBatchNorm if cpu else nn.SyncBatchNorm
            sync = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            sync.weight, sync.bias = child.weight, child.bias
            sync.running_mean, sync.running_var = child.running_mean, child.running_var
            sync.num_batches_tracked = child.num_batches_tracked
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module
