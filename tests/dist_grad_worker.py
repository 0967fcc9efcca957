"""Run by tests/test_distributed.py under torchrun: one rank's share of a global batch -> DDP gradients."""
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from vlpt import config
from vlpt.data.tokenizer import Vocab
from vlpt.models.model import ImageTextModel
from vlpt.objectives import OBJECTIVES
from vlpt.train import distributed
from vlpt.train.pretrainer import Pretrainer

GLOBAL_BATCH, VOCAB, EOT = 8, 64, 2


def make(objective: str, options: dict) -> Pretrainer:
    torch.manual_seed(0)
    cfg = config.resolve("clip", ["model=micro", "train.steps=1"])
    model = ImageTextModel(cfg.model, Vocab(VOCAB, eot=EOT))
    return Pretrainer(model, {objective: OBJECTIVES[objective](options)}, {objective: 1.0})


def global_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (GLOBAL_BATCH, 3, 32, 32), generator=g, dtype=torch.uint8)
    text = torch.randint(5, VOCAB, (GLOBAL_BATCH, 24), generator=g)
    lengths = torch.randint(3, 20, (GLOBAL_BATCH,), generator=g)
    for row, n in zip(text, lengths):
        row[n] = EOT
        row[n + 1 :] = 0
    return {"image": image, "text": text}


def grads(module: torch.nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def save_rank0_grads(out: str, objective: str, local_loss: str) -> None:
    rank, world = distributed.rank(), distributed.world_size()
    options = {"local_loss": local_loss == "1"} if objective == "contrastive" else {}
    module = make(objective, options)
    ddp = DistributedDataParallel(module)
    b = GLOBAL_BATCH // world
    batch = {k: v[rank * b : (rank + 1) * b] for k, v in global_batch().items()}
    loss, _ = ddp(batch)
    loss.backward()
    if rank == 0:
        torch.save(grads(module), out)


def main(out: str, objective: str, local_loss: str) -> None:
    distributed.setup()
    # DDP's reducer holds the process group: it must be freed (on return) before the group is destroyed, or
    # gloo's threads are torn down during interpreter exit and can abort the process.
    save_rank0_grads(out, objective, local_loss)
    distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
