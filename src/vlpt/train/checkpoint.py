"""Run-folder checkpoints: `checkpoints/step-NNNNNNNN/` with model.safetensors (weights, plus the resolved
config and tokenizer as metadata, so one file is a usable model), state.pt (optimizer, schedule, scaler,
RNG streams, counters, step) and manifest.json (size and sha256 of each file). A sharded run (train.fsdp)
adds optim-dcp/, the optimizer's shards (vlpt.train.fsdp), and names that folder in state.pt instead.

A checkpoint is written to a temporary folder, fsynced (files, manifest last, folder), then renamed: it is
whole or absent. A file damaged later (a full disk, a bad copy, a killed rsync) no longer matches its
manifest; `latest` then warns and falls back to the previous checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlpt.errors import CheckpointError

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
FORMAT = 1  # written into every checkpoint's metadata; a reader refuses a newer one by name


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files do not match its manifest."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def tmp_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"{TMP_PREFIX}{PREFIX}{step:08d}"


def start(ckpt_dir: Path, step: int) -> Path:
    """An empty temporary folder for step `step`'s checkpoint (other ranks may write into it before `save`)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(ckpt_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def save(ckpt_dir: Path, step: int, weights: dict, metadata: dict, state: dict, keep: int,
         started: bool = False) -> Path:
    """`started`: `start` made the temporary folder, which already holds files (a sharded optimizer's)."""
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = tmp_path(ckpt_dir, step) if started else start(ckpt_dir, step)
    # safetensors refuses shared storage; contiguous copies of plain tensors are what we want anyway
    metadata = {"format": str(FORMAT), **metadata}
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors",
              metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    torch.save(state, tmp / "state.pt")
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):  # subfolders: a sharded optimizer (train.fsdp)
        _fsync(f)
        files[f.relative_to(tmp).as_posix()] = {"bytes": f.stat().st_size, "sha256": sha256(f)}
    for d in sorted(p for p in tmp.rglob("*") if p.is_dir()):
        _fsync(d)
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    if final.exists():  # only a damaged or re-done step is ever written twice
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(ckpt_dir)
    for old in all_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def tidy(ckpt_dir: Path, resume_from: Path | None) -> None:
    """Before a run (re)starts: remove the temporary folders of saves a crash interrupted, and set aside the
    checkpoints newer than the one it resumes from (damaged ones `latest` skipped) as `damaged-step-N`:
    kept for inspection, out of the way of `latest` and of pruning."""
    if not ckpt_dir.is_dir():
        return
    for p in ckpt_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
    for ckpt in all_checkpoints(ckpt_dir):
        if resume_from is None or ckpt.name > resume_from.name:
            aside = ckpt.with_name(f"damaged-{ckpt.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(ckpt, aside)


def all_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def problem(ckpt: Path, files: tuple[str, ...] | None = None) -> str | None:
    """Why `ckpt` cannot be used (a missing, short or changed file), or None when it is whole.

    `files` limits the check to those files (inference needs only the weights). Checkpoints written before
    manifests existed are taken as they are.
    """
    manifest = ckpt / MANIFEST
    if not manifest.exists():
        return None if (ckpt / "model.safetensors").is_file() else "no model.safetensors"
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, OSError) as e:
        return f"unreadable {MANIFEST} ({type(e).__name__}: {e})"
    for name in files or listed:
        f, want = ckpt / name, listed.get(name)
        if want is None:
            return f"{name} is not in {MANIFEST}"
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, {want['bytes']} were written"
        if sha256(f) != want["sha256"]:
            return f"{name} does not match its sha256 checksum"
    return None


def latest(ckpt_dir: Path, files: tuple[str, ...] | None = None) -> Path | None:
    """The newest whole checkpoint; damaged newer ones are skipped with a warning naming them."""
    for ckpt in reversed(all_checkpoints(ckpt_dir)):
        why = problem(ckpt, files)
        if why is None:
            return ckpt
        print(f"warning: checkpoint {ckpt} is damaged ({why}); using the one before it", file=sys.stderr)
    return None


def find(path: str | Path) -> Path:
    """A run folder, a checkpoint folder or a model.safetensors file -> the checkpoint folder (weights verified)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a run folder (e.g. runs/demo), a checkpoint folder "
                              f"or a model.safetensors file")
    if path.is_file() and path.name == "model.safetensors":
        path = path.parent
    if (path / "model.safetensors").is_file():
        why = problem(path, ("model.safetensors",))
        if why:
            raise CorruptCheckpointError(f"checkpoint {path} is damaged ({why}); use an earlier checkpoint of the run")
        return path
    ck = latest(path / "checkpoints", ("model.safetensors",))
    if ck is None:
        what = "a run whose checkpoints are all damaged" if all_checkpoints(path / "checkpoints") else "not a vlpt run"
        raise CheckpointError(f"{path} is {what}: no usable {path}/checkpoints/{PREFIX}*/model.safetensors; "
                              f"give a run folder that `vlpt train` wrote, or its checkpoint folder")
    return ck


def load_weights(ckpt: Path) -> tuple[dict, dict]:
    """(state dict, metadata) of a checkpoint folder."""
    f = ckpt / "model.safetensors"
    try:
        with safe_open(str(f), framework="pt") as sf:
            metadata = dict(sf.metadata() or {})
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for a file that is not one
        raise CheckpointError(f"{f} is not a readable safetensors file ({err})") from None
    fmt = int(metadata.get("format", 1))
    if fmt > FORMAT:
        raise CheckpointError(f"{f} was written by a newer vlpt (checkpoint format {fmt}; this vlpt reads up to "
                              f"{FORMAT}); upgrade vlpt (pip install -U vlpt) to read it")
    if "config" not in metadata or "tokenizer" not in metadata:
        raise CheckpointError(f"{f} is not a vlpt checkpoint (its metadata has no config and tokenizer); "
                              f"import foreign weights with `vlpt import-weights`")
    return load_file(str(f)), metadata


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
