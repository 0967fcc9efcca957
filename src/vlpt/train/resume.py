"""Everything a run continues from: the checkpoint to resume, and what a checkpoint holds beside the weights
(optimizer, schedule, GradScaler, every RNG stream, the run counters and the data position of every rank,
the step).

Views, and batches of data in memory, are pure functions of (seed, step, rank); streamed shards give their
position (`state_dict`). With these a run resumed from step k ends bit-equal to one that never stopped.
"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from vlpt import config as config_lib
from vlpt.config import Config, ConfigError
from vlpt.data.tokenizer import TextTokenizer
from vlpt.train import checkpoint, distributed, fsdp


def elastic_restart() -> int:
    """torchrun's restart count: above 0 this process replaces a failed worker group."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def resume_checkpoint(ckpt_dir: Path, resume: bool) -> Path | None:
    """The checkpoint a run continues from; None: start at step 0.

    `resume` (--resume) or a torchrun restart continues from the newest whole checkpoint, or starts fresh
    when there is none; otherwise a folder that holds checkpoints is an error, never overwritten.
    """
    restart = elastic_restart()
    if not (resume or restart):
        if checkpoint.all_checkpoints(ckpt_dir):
            raise ConfigError(f"{ckpt_dir.parent} already holds a run; continue it with --resume or pick another --out")
        return None
    last = checkpoint.latest(ckpt_dir)
    if distributed.is_main():
        why = f"torchrun restart {restart}: " if restart else ""
        if last is None:
            print(f"{why}no usable checkpoint in {ckpt_dir}; starting from step 0", file=sys.stderr)
        else:
            print(f"{why}resuming from {last}", file=sys.stderr)
    return last


def trim_metrics(path: Path, step: int) -> None:
    """Drop the rows a resumed run will write again (those after its checkpoint; a torn last line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row["step"] < step or (row["step"] == step and row["kind"] != "data"):
            kept.append(line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RunState:
    """Saves and restores a run: the module's weights (with config and tokenizer as metadata) and state.pt."""

    def __init__(self, cfg: Config, ckpt_dir: Path, tokenizer: TextTokenizer, module, optimizer, scheduler,
                 scaler, counters: dict, data, newest: Path | None, sharded: bool = False):
        """`sharded`: the module is sharded with FSDP (vlpt.train.fsdp); its weights were loaded before."""
        self.cfg, self.ckpt_dir, self.tokenizer, self.sharded = cfg, ckpt_dir, tokenizer, sharded
        self.module, self.optimizer, self.scheduler, self.scaler = module, optimizer, scheduler, scaler
        self.counters = counters  # this rank's run totals, kept across resumes
        self.data = data  # this rank's batches: state_dict() / load_state_dict() of its position
        self.newest = newest  # the newest whole checkpoint of the run

    def path(self, step: int) -> Path:
        return self.ckpt_dir / f"{checkpoint.PREFIX}{step:08d}"

    def save(self, step: int) -> None:
        """Every rank calls it: rank 0 writes the RNG streams, counters and data positions of all ranks."""
        mine = (rng_state(), dict(self.counters), self.data.state_dict())
        ranks = [mine]
        if distributed.is_distributed():
            ranks = [None] * distributed.world_size()
            torch.distributed.all_gather_object(ranks, mine)
        if self.sharded:  # every rank: the full weights to rank 0, its optimizer shards into the folder
            weights = fsdp.full_weights(self.module)
            if distributed.is_main():
                checkpoint.start(self.ckpt_dir, step)
            distributed.barrier()
            fsdp.save_optimizer(self.module, self.optimizer, checkpoint.tmp_path(self.ckpt_dir, step) / fsdp.OPTIM_DIR)
        if distributed.is_main():
            meta = {"config": json.dumps(config_lib.to_dict(self.cfg)), "tokenizer": self.tokenizer.to_str(),
                    "step": str(step)}
            if not self.sharded:
                weights = self.module.state_dict()
            optimizer = fsdp.OPTIM_DIR if self.sharded else self.optimizer.state_dict()  # a folder: its shards
            state = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                     "rng": [r for r, _, _ in ranks], "counters": [c for _, c, _ in ranks],
                     "data": [d for _, _, d in ranks], "step": step}
            checkpoint.save(self.ckpt_dir, step, weights, meta, state, self.cfg.checkpoint.keep, started=self.sharded)
        self.newest = self.path(step)
        distributed.barrier()

    def restore(self, ckpt: Path) -> int:
        """Load `ckpt` into the run; the step it was saved at. On another number of processes each rank
        takes the streams and data position of rank (its rank mod the saved count). The optimizer's state
        saved as shards (train.fsdp) loads on any number of processes, sharded or not."""
        if not self.sharded:
            weights, _ = checkpoint.load_weights(ckpt)
            self.module.load_state_dict(weights)
        state = checkpoint.load_state(ckpt)
        self._restore_optimizer(ckpt, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        saved_world, rank = len(state["rng"]), distributed.rank()
        set_rng_state(state["rng"][rank % saved_world])
        self.counters.update(state.get("counters", [{}] * saved_world)[rank % saved_world])
        self.data.load_state_dict(state.get("data", [{}] * saved_world)[rank % saved_world])
        return state["step"]

    def _restore_optimizer(self, ckpt: Path, saved) -> None:
        if isinstance(saved, str):  # the subfolder of its shards
            fsdp.load_optimizer(self.module, self.optimizer, ckpt / saved)
        elif self.sharded:  # saved whole, by a run without FSDP
            fsdp.load_whole_optimizer(self.module, self.optimizer, saved)
        else:
            self.optimizer.load_state_dict(saved)
