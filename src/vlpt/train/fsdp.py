"""Sharded training (train.fsdp): FSDP2 (torch's `fully_shard`) instead of DDP when torchrun starts more than
one process. Weights, gradients and AdamW's moments are split over the processes; each transformer block
gathers its weights for its forward and backward only, so a process holds one block whole at a time.

The run folder stays what every other command reads: model.safetensors holds the full weights (gathered to
rank 0 at each save); the optimizer is saved as shards with torch.distributed.checkpoint in `optim-dcp/`,
which loads on any number of processes, one included (with or without train.fsdp); a checkpoint saved
without FSDP (the optimizer whole in state.pt) is split on loading. The evaluation runs on
rank 0 on an unsharded copy of the weights gathered for it. What this does not support is refused with the
config (vlpt.config._validate_fsdp).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlpt.config import Config, ConfigError
from vlpt.data.tokenizer import Vocab
from vlpt.train import distributed
from vlpt.train.ema import EMA
from vlpt.train.pretrainer import Pretrainer, build

OPTIM_DIR = "optim-dcp"  # a checkpoint's subfolder with the optimizer's shards


def active(cfg: Config) -> bool:
    """train.fsdp with more than one process; in one process FSDP would only add overhead."""
    return cfg.train.fsdp and distributed.is_distributed()


def blocks(module: Pretrainer) -> list[nn.Module]:
    """The units sharded on their own: every member of an nn.ModuleList in the model (the towers' and
    decoders' transformer blocks), each once."""
    found: dict[int, nn.Module] = {}
    for child in module.model.modules():
        if isinstance(child, nn.ModuleList):
            found.update((id(b), b) for b in child if any(True for _ in b.parameters()))
    return list(found.values())


def shard(module: Pretrainer, weights: dict | None = None) -> None:
    """In place: `weights` (a resumed run's full state dict) loaded, heads' batch norms synchronised (before
    sharding: FSDP keeps the modules it was given), then each block sharded, then the rest as one unit."""
    from torch.distributed.fsdp import fully_shard

    if any(isinstance(m, EMA) for m in module.modules()):  # an objective from a plug-in may hold one
        raise ConfigError("train.fsdp=true: an objective keeps an averaged copy of the model (vlpt.train.ema.EMA), "
                          "which cannot be sharded; train it with train.fsdp=false")
    if weights is not None:
        module.load_state_dict(weights)
    distributed.convert_sync_batchnorm(module)
    kept = set(replicated(module))
    for block in blocks(module):
        fully_shard(block, ignored_params=kept)
    fully_shard(module, ignored_params=kept)


def replicated(module: nn.Module) -> list[nn.Parameter]:
    """The parameters FSDP cannot shard, 0-d ones (temperatures, scales): whole on every rank, outside FSDP,
    so their gradients are averaged by `average_replicated` instead."""
    return [p for p in module.parameters() if p.ndim == 0]


def average_replicated(module: nn.Module) -> None:
    """After the backward: the replicated parameters' gradients averaged over ranks, as FSDP does the rest's."""
    distributed.average_gradients([p for p in replicated(module) if p.requires_grad])


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over sharded (DTensor) and replicated gradients together, which it cannot mix:
    the norm of the whole gradient, the same on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    whole = [g for g in grads if not hasattr(g, "full_tensor")]
    norms = [torch.nn.utils.get_total_norm(sharded).full_tensor()] if sharded else []
    norms += [torch.nn.utils.get_total_norm(whole)] if whole else []
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    coef = min(1.0, max_norm / (total.item() + 1e-6))  # a float: DTensors take no plain tensor as a factor
    if coef < 1.0:
        torch._foreach_mul_(sharded + whole, coef)
    return total


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_weights(module: nn.Module) -> dict:
    """Every rank calls it (a gather): the full state dict on rank 0, on the CPU; {} on the others."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(full_state_dict=True, cpu_offload=True))


def save_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shards of the optimizer's state into `folder`; rank 0 the metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save(get_optimizer_state_dict(module, optimizer), checkpoint_id=str(folder))


def load_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The optimizer's state from `folder`, resharded to this run's processes (or whole, in one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = get_optimizer_state_dict(module, optimizer)  # the layout to read into (created if still empty)
    dcp.load(state, checkpoint_id=str(folder), no_dist=not distributed.is_distributed())
    set_optimizer_state_dict(module, optimizer, state)


def load_whole_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """A whole optimizer state (state.pt of a checkpoint saved without FSDP: parameters by their index in the
    optimizer) into the sharded optimizer: named by the parameters, then split like them."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = {p: n for n, p in module.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]  # build_optimizer's order
    state = {order[i]: s for i, s in saved["state"].items()}
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
    set_optimizer_state_dict(module, optimizer, {"state": state, "param_groups": groups},
                             options=_options(full_state_dict=True))


def gathered(cfg: Config, vocab: Vocab, module: nn.Module, device: torch.device) -> Pretrainer | None:
    """Every rank calls it: an unsharded copy of the module on rank 0 for the evaluation, which runs there
    alone; None on the others. Built without drawing from the run's random streams."""
    weights = full_weights(module)
    if not distributed.is_main():
        return None
    with torch.random.fork_rng(devices=[]):
        copy = build(cfg, vocab)
    copy.load_state_dict(weights)
    return copy.to(device).eval()
