"""The training loop: the same code on 2 CPU cores and under torchrun on many GPUs.

Nothing here knows a method: the recipe's objectives are plug-ins of the Pretrainer.
Crash safety: a checkpoint holds everything the next step depends on (weights, optimizer, schedule,
GradScaler, every RNG stream, run counters), and batches depend only on (seed, step), so a run resumed from
step k ends bit-equal to one that never stopped. SIGTERM/SIGINT save the last finished step and stop.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vlpt import config as config_lib
from vlpt.config import Config, ConfigError
from vlpt.data.loader import StepBatches, batch_iterator
from vlpt.data.sources import BadDataError
from vlpt.data.tokenizer import TextTokenizer
from vlpt.data.views import random_resized_crop
from vlpt.train import checkpoint, distributed
from vlpt.train.logging import MetricsLog
from vlpt.train.optim import build_optimizer, warmup_cosine
from vlpt.train.pretrainer import Pretrainer, build


class TrainingStopped(RuntimeError):
    """The run stopped itself (a non-finite streak); the message says why and what to resume from."""


class Interrupted(Exception):
    """SIGTERM/SIGINT: the last finished step was saved (outside a non-finite streak) and the run stopped."""

    def __init__(self, signum: int, step: int, ckpt: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, ckpt
        saved = f"newest checkpoint {ckpt}" if ckpt else "no checkpoint yet"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {saved}; continue with --resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


class StopSignals:
    """Turns the first SIGTERM/SIGINT into a request the loop honours at the next step boundary; a second
    signal acts as it would without us (SIGINT raises KeyboardInterrupt, SIGTERM ends the process)."""

    def __init__(self):
        self.signum, self._previous = 0, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


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


def total_steps(cfg: Config, num_captions: int) -> int:
    tr = cfg.train
    if tr.steps is not None:
        return tr.steps
    if tr.epochs is not None:
        return max(1, math.ceil(tr.epochs * num_captions / tr.batch_size))
    return max(1, math.ceil(tr.samples / tr.batch_size))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(aug: torch.Generator) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None, "aug": aug.get_state()}


def set_rng_state(state: dict, aug: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    aug.set_state(state["aug"])


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


def load_training_data(cfg: Config, progress: bool):
    """(set, decoded images or None, sampling weights or None, bad image names); too much bad input raises."""
    from vlpt.data.sources import check_issues, decode_all, open_data

    data, weights = open_data(cfg.data.source)
    check_issues(data, cfg.data.max_bad_fraction)
    images, bad = None, []
    if cfg.data.cache_images:
        images, kept, bad = decode_all(data, cfg.model.vision.image_size, cfg.data.max_bad_fraction, progress=progress)
        if weights is not None and bad:  # keep the weights of the captions whose images survived
            good = {id(ref) for ref in kept.images}
            weights = weights[torch.tensor([id(data.images[i]) in good for i in data.caption_image])]
        data = kept
    return data, images, weights, bad


def tokenize(tokenizer: TextTokenizer, captions: list[str]) -> tuple[torch.Tensor, int]:
    """Token ids [N, L] as `tokenizer(captions)` gives them, and how many captions were cut to fit L."""
    n = tokenizer.context_length
    longer = TextTokenizer(tokenizer.tok, n + 1)(captions)
    cut = longer[:, n] == tokenizer.eot_id  # with one more position, a caption that did not fit ends there
    tokens = longer[:, :n].clone()
    tokens[cut, n - 1] = tokenizer.eot_id
    return tokens, int(cut.sum())


def make_tokenizer(cfg: Config, captions: list[str], run_dir: Path) -> TextTokenizer:
    """The run's tokenizer.json (a resumed run reuses it), made by the main process; every rank waits for it
    (deciding by the file's existence on each rank would let a late rank skip the barrier)."""
    path = run_dir / "tokenizer.json"
    ctx = cfg.model.text.context_length
    if distributed.is_main() and not path.exists():
        if cfg.tokenizer.path:
            tok = TextTokenizer.from_file(cfg.tokenizer.path, ctx)
        else:
            tok = TextTokenizer.train(captions, cfg.tokenizer.vocab_size, ctx)
        tmp = path.with_suffix(".tmp")
        tok.save(tmp)
        os.replace(tmp, path)  # whole or absent, like a checkpoint
    distributed.barrier()
    return TextTokenizer.from_file(path, ctx)


def _sum_over_ranks(device: torch.device, *values: int) -> list[int]:
    """Per-step decisions (skip, stop, save) must be the same on every rank: one small all-reduce."""
    if not distributed.is_distributed():
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], device=device, dtype=torch.int64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def train(cfg: Config, run_dir: str | Path, resume: bool = False, stop_at: int | None = None, progress: bool = True) -> dict:
    """Trains `cfg` into `run_dir`; returns the final evaluation metrics (empty when stopped early).

    `stop_at` ends the run after that step, as an interruption would (tests use it for resume). Raises
    Interrupted on SIGTERM/SIGINT, TrainingStopped after train.max_nonfinite_steps non-finite steps in a
    row, BadDataError when more than data.max_bad_fraction of the input is unusable.
    """
    device = distributed.setup()
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    last = resume_checkpoint(ckpt_dir, resume)
    distributed.barrier()  # every rank has chosen `last` before the main one tidies the folder
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.train.seed)  # same init on every rank; per-rank randomness comes from `aug`
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.tidy(ckpt_dir, last)
        (run_dir / "config.yaml").write_text(config_lib.dump(cfg))
        with open(run_dir / "command.txt", "a" if last else "w") as f:  # a resume adds its own command
            f.write(" ".join(sys.argv) + "\n")
    distributed.barrier()

    data, images, weights, bad = load_training_data(cfg, progress and main)
    tokenizer = make_tokenizer(cfg, data.captions, run_dir)
    tokens, long_captions = tokenize(tokenizer, data.captions)
    module = build(cfg, tokenizer).to(device)
    optimizer = build_optimizer(module, cfg.train)
    steps = total_steps(cfg, len(data))
    warmup = min(cfg.train.warmup_steps, max(steps - 1, 0))
    scheduler = warmup_cosine(optimizer, warmup, steps, cfg.train.lr, cfg.train.min_lr)
    aug = torch.Generator().manual_seed(cfg.train.seed * 7919 + rank)
    amp = autocast_dtype(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    counters = {"nonfinite_steps": 0, "bad_images": 0, "images": 0}  # this rank's run totals, kept across resumes

    start = 0
    if last is not None:
        weights_sd, _ = checkpoint.load_weights(last)
        module.load_state_dict(weights_sd)
        state = checkpoint.load_state(last)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        saved_world = len(state["rng"])
        set_rng_state(state["rng"][rank % saved_world], aug)
        counters.update(state.get("counters", [{}] * saved_world)[rank % saved_world])
        if saved_world != world:  # another number of processes: fresh per-rank streams, no longer the same run
            aug.manual_seed(cfg.train.seed * 7919 + rank + 104729 * state["step"])
        start = state["step"]

    ddp = DistributedDataParallel(module) if distributed.is_distributed() else module
    step_module = torch.compile(ddp) if cfg.train.compile else ddp
    batches = StepBatches(data, tokens, cfg.train.batch_size, cfg.train.seed, cfg.model.vision.image_size,
                          images=images, weights=weights, rank=rank, world=world)
    if main:
        trim_metrics(run_dir / "metrics.jsonl", start)
    log = MetricsLog(run_dir, enabled=main)
    log.write(start, "data", {"images": data.num_images, "captions": len(data), "bad_images": len(bad),
                              "long_captions": long_captions, **{k: len(i.names) for k, i in data.issues.items()}})
    newest = last

    def save(step: int) -> None:
        nonlocal newest
        ranks = [None] * world
        mine = (rng_state(aug), dict(counters))
        if distributed.is_distributed():
            torch.distributed.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if main:
            meta = {"config": json.dumps(config_lib.to_dict(cfg)), "tokenizer": tokenizer.to_str(), "step": str(step)}
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "rng": [r for r, _ in ranks], "counters": [c for _, c in ranks], "step": step}
            checkpoint.save(ckpt_dir, step, module.state_dict(), meta, state, cfg.checkpoint.keep)
        newest = ckpt_dir / f"{checkpoint.PREFIX}{step:08d}"
        distributed.barrier()

    bar = tqdm(total=steps, initial=start, disable=not (progress and main), desc=f"train {cfg.recipe}", unit="step", dynamic_ncols=True)
    micro = cfg.train.accum_steps
    window_t, window_n, streak, bad_names = time.perf_counter(), 0, 0, []
    module.train()
    try:
        with StopSignals() as signals:
            it = batch_iterator(batches, start, steps, cfg.data.num_workers)
            for step in range(start, steps):
                done = step + 1
                batch = next(it)
                # unreadable images (decoded per batch when data.cache_images=false): this rank's own count; a rank
                # that stops here ends the whole torchrun group
                counters["bad_images"] += len(batch["bad"])
                counters["images"] += len(batch["text"]) + len(batch["bad"])
                bad_names += batch["bad"][: 10 - len(bad_names)]
                if not len(batch["text"]) or (counters["bad_images"] > 1 and
                                              counters["bad_images"] / counters["images"] > cfg.data.max_bad_fraction):
                    shown = "\n  ".join(bad_names)
                    raise BadDataError(f"{counters['bad_images']} of {counters['images']} images read by step {done} were "
                                       f"unreadable, more than data.max_bad_fraction={cfg.data.max_bad_fraction}:\n  "
                                       f"{shown}\nFix or remove these files, or raise data.max_bad_fraction to skip them.")
                # crop on the device the batch trains on; only the crop parameters come from the CPU generator
                image = random_resized_crop(batch["image"].to(device, non_blocking=True), tuple(cfg.data.crop_scale), aug)
                text = batch["text"].to(device, non_blocking=True)
                total_loss, metrics = torch.zeros((), device=device), {}
                chunks = list(zip(image.chunk(micro), text.chunk(micro)))
                for k, (im, tx) in enumerate(chunks):
                    sync = nullcontext() if k == len(chunks) - 1 or ddp is module else ddp.no_sync()
                    with sync, torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        loss, metrics = step_module({"image": im, "text": tx})
                        scaled = loss / len(chunks)
                    (scaler.scale(scaled) if scaler else scaled).backward()
                    total_loss += loss.detach().float() / len(chunks)
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf"))
                loss_value, norm_value = torch.stack([total_loss, grad_norm.detach().float()]).tolist()  # the step's host sync
                nonfinite, term, intr = _sum_over_ranks(
                    device, not (math.isfinite(loss_value) and math.isfinite(norm_value)),
                    signals.signum == signal.SIGTERM, signals.signum == signal.SIGINT)
                if nonfinite:  # skip the update; no checkpoint is written until a finite step
                    optimizer.zero_grad(set_to_none=True)
                    if scaler:
                        scaler.update()
                    streak += 1
                    counters["nonfinite_steps"] += 1
                    log.write(done, "train", {"nonfinite_steps": counters["nonfinite_steps"], "nonfinite_in_a_row": streak})
                    if streak >= cfg.train.max_nonfinite_steps:
                        first = done - streak + 1
                        raise TrainingStopped(
                            f"{streak} non-finite losses or gradients in a row (steps {first} to {done}; "
                            f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}): the run stopped. Newest "
                            f"checkpoint, from before step {first}: {newest or 'none'}. Continue with --resume and e.g. "
                            f"a lower train.lr, more train.warmup_steps or train.precision=fp32")
                else:
                    streak = 0
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                window_n += len(text) * world
                if not nonfinite and (done % cfg.train.log_every == 0 or done == steps):
                    dt = time.perf_counter() - window_t
                    rate = window_n / dt
                    row = {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": norm_value, "samples_per_s": rate,
                           "epoch": done * cfg.train.batch_size / len(data), "nonfinite_steps": counters["nonfinite_steps"],
                           **{k: float(v) for k, v in metrics.items()}}
                    log.write(done, "train", row)
                    if counters["bad_images"]:
                        log.write(done, "data", {"bad_images": counters["bad_images"], "images_seen": counters["images"]})
                    bar.set_postfix(loss=f"{loss_value:.3f}", samples_s=f"{rate:.0f}")
                    window_t, window_n = time.perf_counter(), 0
                bar.update(1)
                if streak == 0 and cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0 and done != steps:
                    save(done)
                if cfg.eval.every_steps and done % cfg.eval.every_steps == 0 and done != steps:
                    evaluate(cfg, module, tokenizer, device, log, done, progress=False)
                if term or intr:
                    if streak == 0 and newest != ckpt_dir / f"{checkpoint.PREFIX}{done:08d}":
                        save(done)
                    raise Interrupted(signal.SIGTERM if term else signal.SIGINT, done, newest)
                if stop_at is not None and done >= stop_at:
                    return {}
        bar.close()
        if start < steps:  # a resumed finished run already has its final checkpoint
            save(steps)
        results = evaluate(cfg, module, tokenizer, device, log, steps, progress, run_dir / "captions.json")
        if main:
            (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return results
    finally:
        bar.close()
        log.close()


def evaluate(cfg: Config, module: Pretrainer, tokenizer: TextTokenizer, device, log: MetricsLog, step: int, progress: bool,
             captions_path: Path | None = None) -> dict:
    """The recipe's evaluation suite, on the main process (others wait); generated captions go to `captions_path`."""
    from vlpt.eval.defaults import resolve_tasks
    from vlpt.eval.tasks import run_suite, write_samples
    from vlpt.inference import Model

    results = {}
    model = Model(module.model, tokenizer, device)
    tasks = resolve_tasks(cfg.eval.tasks, cfg.data.source, model.has_text_embed, model.has_decoder)
    if distributed.is_main() and tasks:
        samples: dict = {}
        results = run_suite(tasks, model, templates=cfg.eval.templates, progress=progress, samples=samples)
        log.write(step, "eval", results)
        if samples and captions_path is not None:
            write_samples(samples, captions_path)
    distributed.barrier()
    return results
