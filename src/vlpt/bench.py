"""`vlpt bench RECIPE`: how fast a recipe trains and evaluates here, measured, with the device's real peak.

Parts (`--parts`, default all that apply):
  step      one training step as the loop runs it (views, forward, losses, backward, clipping, AdamW, the
            objectives' hooks) on a fixed random batch: median samples/s after warm-up, peak memory, model
            FLOPs per sample (counted, vlpt.train.flops) and MFU against the peak measured below
  data      the data pipeline alone (decode, resize, tokenize, batch): samples/s
  loop      `vlpt train` end to end on the recipe's data (no evaluation, one checkpoint at the end):
            the loop's own samples/s after the warm-up, and its share of the step's
  eval      image embedding or feature throughput (images/s), and caption generation (captions/s, greedy
            and beam 6) for captioners
The peak: square matmuls in the training dtype at several sizes, each warmed up, the best of several tries
at the best size (a small matmul understates a GPU's peak by 2x). Results: a table, and JSON with --json.
"""
from __future__ import annotations

import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vlpt.config import Config
from vlpt.data.tokenizer import Vocab

PARTS = ("step", "data", "loop", "eval")
PEAK_SIZES = {"cpu": (512, 1024, 2048), "cuda": (4096, 8192)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def matmul_peak(dtype: torch.dtype, device: torch.device, tries: int = 5) -> tuple[float, int]:
    """(best FLOP/s of an n x n x n matmul over the sizes tried, that n): warmed up, best of `tries`."""
    best, best_n = 0.0, 0
    for n in PEAK_SIZES.get(device.type, PEAK_SIZES["cuda"]):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        a @ b  # warm-up: kernels chosen, caches filled
        seconds = min(timed(lambda: a @ b, device) for _ in range(tries))
        if 2 * n**3 / seconds > best:
            best, best_n = 2 * n**3 / seconds, n
    return best, best_n


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


def bench_step(cfg: Config, vocab: Vocab, device: torch.device, warmup: int = 5, steps: int = 15) -> dict:
    from vlpt.train.flops import random_batch
    from vlpt.train.optim import build_optimizer
    from vlpt.train.pretrainer import build
    from vlpt.train.step import StepParts, autocast_dtype, train_step

    torch.manual_seed(0)
    module = build(cfg, vocab).to(device).train()
    amp = autocast_dtype(cfg.train.precision, device)
    parts = StepParts(module, build_optimizer(module, cfg.train), run=torch.compile(module) if cfg.train.compile else None,
                      amp=amp, accum_steps=cfg.train.accum_steps, grad_clip=cfg.train.grad_clip)
    batch = random_batch(cfg, vocab, cfg.train.batch_size, device)
    step = iter(range(1, 10**9))
    with FlopCounterMode(display=False) as counter:
        train_step(parts, batch, next(step), 10**9)
    flops = counter.get_total_flops()
    times = [timed(lambda: train_step(parts, batch, next(step), 10**9), device) for _ in range(warmup + steps)][warmup:]
    median = statistics.median(times)
    peak, n = matmul_peak(amp or torch.float32, device)
    return {"samples_per_s": cfg.train.batch_size / median, "median_step_s": median,
            "peak_memory_MB": peak_memory_mb(device), "flops_per_sample": flops / cfg.train.batch_size,
            "matmul_peak_GFLOPs": peak / 1e9, "matmul_peak_size": n, "mfu_pct": 100 * flops / median / peak,
            "params_M": sum(p.numel() for p in module.parameters()) / 1e6}


def bench_data(cfg: Config, batches: int = 30) -> dict:
    """The training data pipeline alone: batches as the loop takes them, tokenized, nothing trained."""
    from vlpt.data.views import TextViews
    from vlpt.train.data import make_tokenizer, training_source

    source = training_source(cfg, 1, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(cfg, source.captions, Path(tmp))
    it = iter(source.batches(tokenizer, TextViews(cfg.views, cfg.train.seed, 0), 0, 1, {}))
    next(it)  # workers started, first batch decoded
    t = time.perf_counter()
    n = sum(len(next(it)["image"]) for _ in range(batches))
    return {"samples_per_s": n / (time.perf_counter() - t)}


def bench_loop(cfg: Config, warmup: int = 5, steps: int = 15) -> dict:
    """`vlpt train` for warmup + steps steps (no evaluation): the median of the loop's own samples/s (logged
    every step) after the warm-up."""
    from vlpt import config as config_lib
    from vlpt.train import loop

    cfg = config_lib.from_dict({**config_lib.to_dict(cfg), "eval": {"tasks": []}})
    cfg.train.steps, cfg.train.epochs, cfg.train.samples, cfg.train.log_every = warmup + steps, None, None, 1
    cfg.checkpoint.every_steps = 0
    with tempfile.TemporaryDirectory() as tmp:
        loop.train(cfg, Path(tmp) / "run", progress=False, report=lambda text: None)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if r["kind"] == "train" and r["step"] > warmup]
    return {"samples_per_s": statistics.median(rates)}


def bench_eval(cfg: Config, vocab: Vocab, device: torch.device, images: int = 256) -> dict:
    from vlpt.inference import Model
    from vlpt.models import captioner
    from vlpt.train.flops import random_batch
    from vlpt.train.pretrainer import build

    module = build(cfg, vocab).to(device).eval()
    model = Model(module.model, None, device, module.objectives)
    x = random_batch(cfg, vocab, images)["image"]
    out = {}
    encode = model.encode_images if {"image_embed"} <= model.abilities else model.image_features
    with torch.no_grad():
        encode(x[:8])
        out["images_per_s"] = images / timed(lambda: encode(x), device)
        if "caption" in model.abilities:
            few = x[:32]
            for method in ("greedy", "beam"):
                seconds = timed(lambda: captioner.generate(module.model, few.to(device), method=method, max_tokens=20,
                                                           batch=len(few)), device)
                out[f"captions_per_s_{method}"] = len(few) / seconds
    return out


def run(cfg: Config, parts: list[str], vocab_size: int | None = None, warmup: int = 5, steps: int = 15,
        report=print) -> dict:
    """Every part asked for, on the first GPU if there is one; the vocabulary: `vocab_size` or the one the
    recipe's data gives its tokenizer."""
    from vlpt.train.flops import recipe_vocab

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    vocab = Vocab(vocab_size) if vocab_size else recipe_vocab(cfg)
    results = {"recipe": cfg.recipe, "preset": cfg.model.preset, "batch": cfg.train.batch_size,
               "precision": cfg.train.precision, "vocab": vocab.size, "device": str(device),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    for part in parts:
        if part == "step":
            results["step"] = bench_step(cfg, vocab, device, warmup, steps)
        elif part == "data":
            results["data"] = bench_data(cfg)
        elif part == "loop":
            results["loop"] = bench_loop(cfg, warmup, steps)
            if "step" in results:
                results["loop"]["share_of_step_pct"] = 100 * results["loop"]["samples_per_s"] / \
                    results["step"]["samples_per_s"]
        elif part == "eval":
            results["eval"] = bench_eval(cfg, vocab, device)
        report(table({part: results[part]} | {k: v for k, v in results.items() if k not in PARTS}, part))
    return results


def table(results: dict, part: str) -> str:
    head = (f"{part}: {results['recipe']} model={results['preset']} batch {results['batch']} "
            f"{results['precision']} vocab {results['vocab']:,} on {results['device']} ({results['threads']} threads)")
    rows = [f"  {k:<22} {v:,.4g}" if isinstance(v, float) else f"  {k:<22} {v}" for k, v in results[part].items()]
    return "\n".join([head, *rows])
