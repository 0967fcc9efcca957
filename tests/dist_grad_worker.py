"""Run by tests/test_distributed.py and tests/test_ssl_objectives.py under torchrun: one rank's share of a
global batch -> the loss averaged over ranks and DDP's gradients (batch norm synchronised as in training)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from vlpt import config
from vlpt.data.tokenizer import Vocab
from vlpt.models.model import ImageTextModel
from vlpt.objectives import OBJECTIVES
from vlpt.train import distributed
from vlpt.train.pretrainer import Pretrainer
from vlpt.train.step import batch_dim

GLOBAL_BATCH, VOCAB, EOT, VIEWS = 8, 64, 2, 2
# narrow heads: the same code paths as the papers' widths, in seconds
SMALL = {"simclr": {"hidden": 16, "dim": 8}, "barlow": {"hidden": 16, "dim": 12}, "siamese": {"hidden": 16, "dim": 8},
         "swav": {"hidden": 16, "dim": 8}, "cl2l": {"hidden": 16, "dim": 8}}


def make(objectives: str, options: dict) -> Pretrainer:
    """objectives: a name or several joined by '+', each with its SMALL options and then `options`."""
    torch.manual_seed(0)
    model_cfg = config.resolve("clip", ["model=micro", "train.steps=1"]).model
    names = objectives.split("+")
    objs = {n: OBJECTIVES[n]({**SMALL.get(n, {}), **options}, model_cfg) for n in names}
    needs = frozenset().union(*(o.needs for o in objs.values()))
    return Pretrainer(ImageTextModel(model_cfg, Vocab(VOCAB, eot=EOT), needs), objs, {n: 1.0 for n in names})


def _captions(g: torch.Generator, n: int) -> torch.Tensor:
    text = torch.randint(5, VOCAB, (n, 24), generator=g)
    for row, length in zip(text, torch.randint(3, 20, (n,), generator=g)):
        row[length] = EOT
        row[length + 1 :] = 0
    return text


def global_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (GLOBAL_BATCH, 3, 32, 32), generator=g, dtype=torch.uint8)
    text = _captions(g, GLOBAL_BATCH)
    image_views = torch.randint(0, 256, (VIEWS, GLOBAL_BATCH, 3, 32, 32), generator=g, dtype=torch.uint8)
    text_views = _captions(g, VIEWS * GLOBAL_BATCH).unflatten(0, (VIEWS, GLOBAL_BATCH))
    return {"image": image, "text": text, "image_views": image_views, "text_views": text_views}


def grads(module: torch.nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def save_rank0_grads(out: str, objectives: str, local_loss: str) -> None:
    rank, world = distributed.rank(), distributed.world_size()
    options = {"local_loss": local_loss == "1"} if objectives == "contrastive" else {}
    module = distributed.convert_sync_batchnorm(make(objectives, options))
    ddp = DistributedDataParallel(module)
    b = GLOBAL_BATCH // world
    batch = {k: v.narrow(batch_dim(k), rank * b, b) for k, v in global_batch().items()}
    loss, metrics = ddp(batch)
    loss.backward()
    losses = {"loss": loss, **{k: v for k, v in metrics.items() if k.endswith("/loss")}}
    for k, v in losses.items():  # each rank's loss is its share of the global one: the mean over ranks is that
        losses[k] = v.detach().clone()
        torch.distributed.all_reduce(losses[k])
        losses[k] /= world
    if rank == 0:
        torch.save({**losses, "grads": grads(module)}, out)


def main(out: str, objectives: str, local_loss: str) -> None:
    distributed.setup()
    # DDP's reducer holds the process group: it must be freed (on return) before the group is destroyed, or
    # gloo's threads are torn down during interpreter exit and can abort the process.
    save_rank0_grads(out, objectives, local_loss)
    distributed.teardown()


def run_two_processes(out: Path, objectives: str, local_loss: str = "1") -> dict:
    """This file under `torchrun --nproc_per_node 2` (gloo, CPU): {"loss" and each "NAME/loss": means over
    ranks, "grads": rank 0's}."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, str(out), objectives, local_loss]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def one_process(objectives: str, options: dict | None = None) -> dict:
    """The same module on the global batch in one process: {"loss", each "NAME/loss", "grads"}."""
    module = make(objectives, options or {})
    loss, metrics = module(global_batch())
    loss.backward()
    return {"loss": loss.detach(), **{k: v for k, v in metrics.items() if k.endswith("/loss")}, "grads": grads(module)}


if __name__ == "__main__":
    main(*sys.argv[1:])
