"""Run-folder checkpoints: `checkpoints/step-NNNNNNNN/` with model.safetensors (weights, plus the resolved
config and tokenizer as metadata, so one file is a usable model) and state.pt (optimizer, schedule, RNG,
step). Written to a temporary folder, fsynced, then renamed: a checkpoint is whole or absent."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

PREFIX = "step-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(ckpt_dir: Path, step: int, weights: dict, metadata: dict, state: dict, keep: int) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # safetensors refuses shared storage; contiguous copies of plain tensors are what we want anyway
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors",
              metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    for old in all_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def all_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest(ckpt_dir: Path) -> Path | None:
    found = all_checkpoints(ckpt_dir)
    return found[-1] if found else None


def find(path: str | Path) -> Path:
    """A run folder, a checkpoint folder or a model.safetensors file -> the checkpoint folder."""
    path = Path(path)
    if path.is_file() and path.name == "model.safetensors":
        return path.parent
    if (path / "model.safetensors").is_file():
        return path
    ck = latest(path / "checkpoints")
    if ck is None:
        raise FileNotFoundError(f"no checkpoint in {path} (expected {path}/checkpoints/{PREFIX}*/model.safetensors)")
    return ck


def load_weights(ckpt: Path) -> tuple[dict, dict]:
    """(state dict, metadata) of a checkpoint folder."""
    f = ckpt / "model.safetensors"
    with safe_open(str(f), framework="pt") as sf:
        metadata = dict(sf.metadata() or {})
    return load_file(str(f)), metadata


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
