"""The training loop: the same code on 2 CPU cores and under torchrun on many GPUs.

Nothing here knows a method: the recipe's objectives are plug-ins of the Pretrainer.
"""
from __future__ import annotations

import json
import math
import random
import sys
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
from vlpt.data.tokenizer import TextTokenizer
from vlpt.data.views import random_resized_crop
from vlpt.train import checkpoint, distributed
from vlpt.train.logging import MetricsLog
from vlpt.train.optim import build_optimizer, warmup_cosine
from vlpt.train.pretrainer import Pretrainer, build

MAX_NONFINITE_IN_A_ROW = 10


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
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "aug": aug.get_state()}


def set_rng_state(state: dict, aug: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    aug.set_state(state["aug"])


def load_training_data(cfg: Config, progress: bool):
    """(set, decoded images or None, sampling weights or None, bad image refs)."""
    from vlpt.data.sources import open_data
    from vlpt.data.sources import decode_all

    data, weights = open_data(cfg.data.source)
    images, bad = None, []
    if cfg.data.cache_images:
        images, data, bad = decode_all(data, cfg.model.vision.image_size, cfg.data.max_bad_fraction, progress=progress)
        if weights is not None and bad:
            raise ConfigError("bad images in a weighted mixture: clean the sources or set data.cache_images=false")
    return data, images, weights, bad


def make_tokenizer(cfg: Config, captions: list[str], run_dir: Path) -> TextTokenizer:
    path = run_dir / "tokenizer.json"
    ctx = cfg.model.text.context_length
    if path.exists():
        return TextTokenizer.from_file(path, ctx)
    if distributed.is_main():
        if cfg.tokenizer.path:
            tok = TextTokenizer.from_file(cfg.tokenizer.path, ctx)
        else:
            tok = TextTokenizer.train(captions, cfg.tokenizer.vocab_size, ctx)
        tok.save(path)
    distributed.barrier()
    return TextTokenizer.from_file(path, ctx)


def train(cfg: Config, run_dir: str | Path, resume: bool = False, stop_at: int | None = None, progress: bool = True) -> dict:
    """Trains `cfg` into `run_dir`; returns the final evaluation metrics (empty when stopped early).

    `stop_at` ends the run after that step, as an interruption would (tests use it for resume).
    """
    device = distributed.setup()
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    last = checkpoint.latest(ckpt_dir)
    if last is not None and not resume:
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume or pick another --out")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.train.seed)  # same init on every rank; per-rank randomness comes from `aug`
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_lib.dump(cfg))
        (run_dir / "command.txt").write_text(" ".join(sys.argv) + "\n")
    distributed.barrier()

    data, images, weights, bad = load_training_data(cfg, progress and main)
    tokenizer = make_tokenizer(cfg, data.captions, run_dir)
    tokens = tokenizer(data.captions)
    module = build(cfg, tokenizer).to(device)
    optimizer = build_optimizer(module, cfg.train)
    steps = total_steps(cfg, len(data))
    warmup = min(cfg.train.warmup_steps, max(steps - 1, 0))
    scheduler = warmup_cosine(optimizer, warmup, steps, cfg.train.lr, cfg.train.min_lr)
    aug = torch.Generator().manual_seed(cfg.train.seed * 7919 + rank)

    start = 0
    if resume and last is not None:
        weights_sd, _ = checkpoint.load_weights(last)
        module.load_state_dict(weights_sd)
        state = checkpoint.load_state(last)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][rank], aug)
        start = state["step"]
        if main:
            print(f"resuming {run_dir} from step {start}", file=sys.stderr)

    ddp = DistributedDataParallel(module) if distributed.is_distributed() else module
    step_module = torch.compile(ddp) if cfg.train.compile else ddp
    amp = autocast_dtype(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    batches = StepBatches(data, tokens, cfg.train.batch_size, cfg.train.seed, cfg.model.vision.image_size,
                          images=images, weights=weights, rank=rank, world=world)
    log = MetricsLog(run_dir, enabled=main)
    if main and bad:
        log.write(start, "data", {"bad_images": len(bad), "images": data.num_images})

    def save(step: int) -> None:
        states = [None] * world
        mine = rng_state(aug)
        if distributed.is_distributed():
            torch.distributed.all_gather_object(states, mine)
        else:
            states = [mine]
        if main:
            meta = {"config": json.dumps(config_lib.to_dict(cfg)), "tokenizer": tokenizer.to_str(), "step": str(step)}
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": states, "step": step}
            checkpoint.save(ckpt_dir, step, module.state_dict(), meta, state, cfg.checkpoint.keep)
        distributed.barrier()

    bar = tqdm(total=steps, initial=start, disable=not (progress and main), desc=f"train {cfg.recipe}", unit="step", dynamic_ncols=True)
    it = batch_iterator(batches, start, steps, cfg.data.num_workers)
    micro = cfg.train.accum_steps
    window_t, window_n, nonfinite, bad_seen, seen = time.perf_counter(), 0, 0, 0, 0
    module.train()
    for step in range(start, steps):
        batch = next(it)
        bad_seen, seen = bad_seen + batch["bad"], seen + len(batch["text"]) + batch["bad"]
        if seen and bad_seen / seen > cfg.data.max_bad_fraction and bad_seen > 1:
            raise RuntimeError(f"{bad_seen} of {seen} images seen so far were unreadable (over data.max_bad_fraction="
                               f"{cfg.data.max_bad_fraction}); check the data or raise the threshold")
        # crop on the device the batch trains on; only the crop parameters come from the CPU generator
        image = random_resized_crop(batch["image"].to(device, non_blocking=True), tuple(cfg.data.crop_scale), aug)
        text = batch["text"].to(device, non_blocking=True)
        total_loss, metrics = torch.zeros((), device=device), {}
        for k, (im, tx) in enumerate(zip(image.chunk(micro), text.chunk(micro))):
            sync = nullcontext() if k == micro - 1 or ddp is module else ddp.no_sync()
            with sync, torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, metrics = step_module({"image": im, "text": tx})
                scaled = loss / micro
            (scaler.scale(scaled) if scaler else scaled).backward()
            total_loss += loss.detach().float() / micro
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf"))
        total_loss = float(total_loss)  # the step's one host sync
        if not (math.isfinite(total_loss) and torch.isfinite(grad_norm)):
            nonfinite += 1
            optimizer.zero_grad(set_to_none=True)
            if scaler:
                scaler.update()
            log.write(step + 1, "train", {"nonfinite_skipped": nonfinite})
            if nonfinite >= MAX_NONFINITE_IN_A_ROW:
                raise RuntimeError(f"{nonfinite} non-finite losses in a row at step {step + 1}; last checkpoint: "
                                   f"{checkpoint.latest(ckpt_dir)}. Lower train.lr or use train.precision=fp32")
        else:
            nonfinite = 0
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        window_n += len(text) * world
        done = step + 1
        if done % cfg.train.log_every == 0 or done == steps:
            dt = time.perf_counter() - window_t
            rate = window_n / dt
            row = {"loss": total_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "samples_per_s": rate,
                   "epoch": done * cfg.train.batch_size / len(data), **{k: float(v) for k, v in metrics.items()}}
            log.write(done, "train", row)
            bar.set_postfix(loss=f"{total_loss:.3f}", samples_s=f"{rate:.0f}")
            window_t, window_n = time.perf_counter(), 0
        bar.update(1)
        if cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0 and done != steps:
            save(done)
        if cfg.eval.every_steps and done % cfg.eval.every_steps == 0 and done != steps:
            evaluate(cfg, module, tokenizer, device, log, done, progress=False)
        if stop_at is not None and done >= stop_at:
            bar.close()
            log.close()
            return {}
    bar.close()
    save(steps)
    results = evaluate(cfg, module, tokenizer, device, log, steps, progress)
    log.close()
    if main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def evaluate(cfg: Config, module: Pretrainer, tokenizer: TextTokenizer, device, log: MetricsLog, step: int, progress: bool) -> dict:
    """The recipe's evaluation suite, on the main process (others wait)."""
    from vlpt.eval.defaults import resolve_tasks
    from vlpt.eval.tasks import run_suite
    from vlpt.inference import Encoder

    results = {}
    tasks = resolve_tasks(cfg.eval.tasks, cfg.data.source)
    if distributed.is_main() and tasks:
        results = run_suite(tasks, Encoder(module.model, tokenizer, device), templates=cfg.eval.templates, progress=progress)
        log.write(step, "eval", results)
    distributed.barrier()
    return results
