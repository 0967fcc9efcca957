"""The training loop: orchestration only, the same code on 2 CPU cores and under torchrun on many GPUs.

Build, resume, iterate steps (`step.train_step`), save, evaluate, stop. Nothing here knows a method: the
recipe's objectives are plug-ins of the Pretrainer. Crash safety: a checkpoint holds everything the next
step depends on (resume.RunState): views and batches of data in memory depend only on (seed, step, rank),
streamed shards save their position, so a run resumed from step k ends bit-equal to one that never stopped.
SIGTERM/SIGINT save the last finished step and stop.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from vlpt import config as config_lib
from vlpt.config import Config, ConfigError
from vlpt.data.views import ImageViews, TextViews
from vlpt.inference import Model
from vlpt.progress import TrainProgress
from vlpt.train import checkpoint, distributed, fsdp
from vlpt.train.data import make_tokenizer, training_source
from vlpt.train.evaluation import EvalPlan, EvaluationFailed
from vlpt.train.guards import BadImageBudget, NonFiniteStreak
from vlpt.train.logging import MetricsLog, StepLog
from vlpt.train.optim import build_optimizer, warmup_cosine
from vlpt.train.pretrainer import abilities, build
from vlpt.train.resume import RunState, resume_checkpoint, seed_everything, trim_metrics
from vlpt.train.signals import Interrupted, StopSignals
from vlpt.train.step import StepParts, autocast_dtype, sum_over_ranks, to_device, train_step
from vlpt.train.summary import RunSummary
from vlpt.train.towers import check_sources


def total_steps(cfg: Config, num_captions: int | None) -> int:
    """The run's steps from its budget; train.epochs needs the size of the data (`num_captions`)."""
    tr = cfg.train
    if tr.steps is not None:
        return tr.steps
    if tr.epochs is not None:
        return max(1, math.ceil(tr.epochs * num_captions / tr.batch_size))
    return max(1, math.ceil(tr.samples / tr.batch_size))


def check_batch_split(cfg: Config, world: int) -> None:
    """Each process takes batch_size / world examples and splits them into accum_steps equal micro-batches."""
    b, a = cfg.train.batch_size, cfg.train.accum_steps
    if b % world:
        raise ConfigError(f"train.batch_size={b} does not split over {world} processes; pick a multiple of {world}, "
                          f"e.g. train.batch_size={b + world - b % world}")
    if (b // world) % a:
        fit = world * a * max(1, round(b / (world * a)))
        raise ConfigError(f"train.batch_size={b} on {world} processes is {b // world} per process, which "
                          f"train.accum_steps={a} does not divide; pick e.g. train.batch_size={fit}")


def _prepare_run_dir(cfg: Config, run_dir: Path, last: Path | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.tidy(run_dir / "checkpoints", last)
    (run_dir / "config.yaml").write_text(config_lib.dump(cfg))
    with open(run_dir / "command.txt", "a" if last else "w") as f:  # a resume adds its own command
        f.write(" ".join(sys.argv) + "\n")


def _draw_curves(run_dir: Path) -> Path | str:
    """RUN/curves.png, or why it could not be drawn: a plot never costs a finished run."""
    from vlpt.plot import plot_run

    try:
        return plot_run(run_dir)
    except Exception as err:  # noqa: BLE001 - reported in the summary; the run itself is complete
        return f"not drawn: {type(err).__name__}: {err}"


def _finish(summary: RunSummary, run_dir: Path, began: float, report: Callable[[str], None] | None) -> None:
    """The main process's last words: curves.png, then the summary."""
    summary.curves = _draw_curves(run_dir)
    summary.total_seconds = time.perf_counter() - began
    if report is not None:
        report(summary.text())


def train(cfg: Config, run_dir: str | Path, resume: bool = False, stop_at: int | None = None, progress: bool = True,
          report: Callable[[str], None] | None = None) -> dict:
    """Trains `cfg` into `run_dir`; returns the final evaluation metrics (empty when stopped early).

    `progress`: progress bars on a terminal, else a line every train.log_every_s seconds. At the end the
    main process draws RUN/curves.png and hands the end-of-run summary (text) to `report`, also when the
    final evaluation fails. `stop_at` ends the run after that step, as an interruption would (tests use it
    for resume). Raises
    Interrupted on SIGTERM/SIGINT, TrainingStopped after train.max_nonfinite_steps non-finite steps in a
    row, BadDataError when more than data.max_bad_fraction of the input is unusable, ConfigError before
    any work for what the config alone cannot tell (e.g. an evaluation file that does not exist), and
    EvaluationFailed when the final evaluation fails after the final checkpoint was saved.
    """
    began = time.perf_counter()
    device = distributed.setup()
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    check_batch_split(cfg, world)
    text_views = TextViews(cfg.views, cfg.train.seed, rank)  # views that need WordNet where it is missing fail here
    run_dir = Path(run_dir)
    last = resume_checkpoint(run_dir / "checkpoints", resume)
    sharded = fsdp.active(cfg)
    distributed.barrier()  # every rank has chosen `last` before the main one tidies the folder
    evaluation = EvalPlan(cfg, abilities(cfg))  # a typo or a missing file fails in seconds
    if last is None:
        check_sources(cfg.model)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.train.seed)  # the same init on every rank
    source = training_source(cfg, world, progress and main)  # a bad spec or unusable data fails in seconds
    if main:  # the run folder is written once the data is known to be usable
        _prepare_run_dir(cfg, run_dir, last)
    distributed.barrier()

    tokenizer = make_tokenizer(cfg, source.captions, run_dir)
    module = build(cfg, tokenizer.vocab, init=last is None)
    module.to(device)
    if sharded:  # a resumed run's full weights go in before they are split; the optimizer takes the shards
        fsdp.shard(module, checkpoint.load_weights(last)[0] if last is not None else None)
    optimizer = build_optimizer(module, cfg.train)
    steps = total_steps(cfg, source.size)
    scheduler = warmup_cosine(optimizer, min(cfg.train.warmup_steps, max(steps - 1, 0)), steps, cfg.train.lr,
                              cfg.train.min_lr)
    amp = autocast_dtype(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    counters = {"nonfinite_steps": 0, "bad_images": 0, "images": 0}  # this rank's run totals, kept across resumes
    batches = source.batches(tokenizer, text_views, rank, world, counters, pin_memory=device.type == "cuda")
    state = RunState(cfg, run_dir / "checkpoints", tokenizer, module, optimizer, scheduler, scaler, counters, batches,
                     last, sharded)
    start = state.restore(last) if last is not None else 0

    ddp = None
    if distributed.is_distributed() and not sharded:
        distributed.convert_sync_batchnorm(module)  # heads' batch statistics over the global batch
        ddp = DistributedDataParallel(module)
    run = torch.compile(ddp or module) if cfg.train.compile else None
    parts = StepParts(module, optimizer, scheduler, run, ddp, scaler, amp, cfg.train.accum_steps, cfg.train.grad_clip,
                      sharded=sharded)
    image_views = ImageViews(cfg.views, cfg.train.seed, rank)
    if main:
        trim_metrics(run_dir / "metrics.jsonl", start)
    log = MetricsLog(run_dir, enabled=main)
    log.write(start, "data", source.summary())
    bad_images = BadImageBudget(counters, cfg.data.max_bad_fraction)
    streak = NonFiniteStreak(counters, cfg.train.max_nonfinite_steps, log)
    step_log = StepLog(log, cfg.train.log_every, steps, source.size, cfg.train.batch_size)
    eval_model = None if sharded else Model(module.model, tokenizer, device, module.objectives)

    def model_for_eval() -> Model | None:
        """Under FSDP every rank gathers the weights for an unsharded copy on rank 0, where evaluation runs."""
        if not sharded:
            return eval_model
        copy = fsdp.gathered(cfg, tokenizer.vocab, module, device)
        return Model(copy.model, tokenizer, device, copy.objectives) if copy is not None else None

    averaged = Model(module.ema.module, tokenizer, device, module.objectives) if module.ema is not None else None  # train.ema
    module.train()
    watch = TrainProgress(f"train {cfg.recipe}", start, steps, cfg.train.log_every_s, show=progress and main)
    try:
        with StopSignals() as signals:
            it = batches.iterate(start, steps)
            for step in range(start, steps):
                done = step + 1
                batch = next(it)
                bad_images.add(batch.pop("bad"), len(batch["text"]), done)
                batch = to_device(module.trim_padding(batch), device)
                batch.update(image_views(batch["image"], step))  # views on the device the batch trains on
                result = train_step(parts, batch, done, steps, flags=signals.flags)
                streak.add(result.updated, done, state.newest)  # no checkpoint is written during a streak
                step_log(done, result, len(batch["text"]) * world, scheduler.get_last_lr()[0], counters)
                watch.update(done, result.loss, len(batch["text"]) * world)
                if streak.length == 0 and cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0 \
                        and done != steps:
                    state.save(done)
                if evaluation.due(done, steps):
                    evaluation.periodic(model_for_eval(), done, steps, log)
                term, intr = result.flags
                if term or intr:
                    if streak.length == 0 and state.newest != state.path(done):
                        state.save(done)
                    raise Interrupted(signal.SIGTERM if term else signal.SIGINT, done, state.newest)
                if stop_at is not None and done >= stop_at:
                    return {}
        watch.close()
        if start < steps:  # a resumed finished run already has its final checkpoint
            state.save(steps)
        summary = RunSummary(
            cfg.recipe, run_dir, start, steps, train_seconds=watch.seconds, samples=watch.samples,
            final_loss=watch.final_loss, checkpoint=state.newest, images_left_out=len(source.bad),
            image_reads_skipped=sum_over_ranks(device, counters["bad_images"])[0],
            nonfinite_steps=counters["nonfinite_steps"])
        try:
            summary.results = evaluation.final(model_for_eval(), steps, log, progress, run_dir, averaged)
            summary.eval_note = evaluation.absent()
        except EvaluationFailed as err:  # raised on the main process only
            summary.results, summary.eval_note = err.results, f"failed: {err.detail}"
            _finish(summary, run_dir, began, report)
            raise
        if main:
            _finish(summary, run_dir, began, report)
        return summary.results
    finally:
        watch.close()
        log.close()
