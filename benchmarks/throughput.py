"""Training throughput of a recipe on a model preset: samples/s, peak memory, and model FLOPs utilisation.

One step = `vlpt.train.step.train_step` (forward, the recipe's losses, backward, clipping, AdamW step, the
objectives' hooks) on a fixed random batch (no data loading), as ../shared/peers/open_clip/bench.py does for
open_clip, so the two can be run A/B on the same shapes.
MFU = (FLOPs of one step, counted by torch.utils.flop_counter) / step time / the machine's matmul peak,
measured here with square matmuls in the training dtype, best size (vlpt.bench.matmul_peak; not a datasheet
number). `vlpt bench` measures the same step and more; this script keeps the flags of earlier results
(--caption-tokens: padded captions) and can draw the captions' lengths as the peer's bench does
(--peer-captions). The batch is trimmed of all-padding text columns as the training loop trims it
(Pretrainer.trim_padding): full-length captions are never trimmed.

  python benchmarks/throughput.py --preset tiny-clip --batch 64 --precision bf16
  python benchmarks/throughput.py --preset tiny-clip --batch 64 --precision bf16 --peer-captions
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import vlpt.train.flops  # noqa: F401 - counts the CPU attention kernel too

from vlpt import config
from vlpt.bench import matmul_peak
from vlpt.data.tokenizer import Vocab
from vlpt.train.optim import build_optimizer
from vlpt.train.pretrainer import build
from vlpt.train.step import StepParts, autocast_dtype, train_step


def peer_caption_words(batch: int) -> list[int]:
    """Each caption's word count as the peer's bench draws them (random.seed(0), then per caption
    randint(4, 20) words by random.choices, one random() each); its words are one BPE token each."""
    rng, counts = random.Random(0), []
    for _ in range(batch):
        counts.append(rng.randint(4, 20))
        rng.choices(range(20), k=counts[-1])  # the words themselves: only their draws matter here
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="clip")
    p.add_argument("--preset", default="tiny-clip")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vocab", type=int, default=49408, help="vocabulary size (open_clip's is 49,408)")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16", "auto"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (train.accum_steps)")
    p.add_argument("--caption-tokens", type=int, default=0,
                   help="tokens before each caption's <eot>, then padding (0: no padding, every position real)")
    p.add_argument("--peer-captions", action="store_true",
                   help="captions as ../shared/peers/open_clip/bench.py draws them: 4-20 words of one token each "
                        "(its draws with seed 0), <sot> and <eot>, then padding")
    p.add_argument("--compile", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.decoder.depth=4")
    args = p.parse_intermixed_args()  # flags may follow the overrides

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = config.resolve(args.recipe, [f"model={args.preset}", "train.steps=1", f"train.precision={args.precision}",
                                       *args.overrides])
    module = build(cfg, Vocab(args.vocab))
    module.model.set_grad_checkpointing(args.grad_ckpt)
    module.to(device)
    optimizer = build_optimizer(module, cfg.train)
    amp = autocast_dtype(args.precision, device)
    parts = StepParts(module, optimizer, run=torch.compile(module) if args.compile else None, amp=amp,
                      accum_steps=args.accum, grad_clip=cfg.train.grad_clip)

    s = cfg.model.vision.image_size
    L = cfg.model.text.context_length
    text = torch.randint(5, args.vocab, (args.batch, L), device=device)
    if args.peer_captions:
        words = peer_caption_words(args.batch)
    elif args.caption_tokens:
        words = [min(args.caption_tokens, L - 2)] * args.batch
    else:  # no padding: random tokens around one <eot>
        words = []
        text[:, torch.randint(4, L, (1,)).item()] = 2
    for row, n in enumerate(words):
        text[row, 0], text[row, n + 1], text[row, n + 2 :] = 1, 2, 0  # <sot> words <eot> <pad>...
    image = torch.randint(0, 256, (args.batch, 3, s, s), dtype=torch.uint8, device=device)
    batch = module.trim_padding({"image": image, "text": text})  # as the training loop trims its batches

    def step():
        return train_step(parts, batch, 1, 1).loss

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = float(step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    peak = matmul_peak(amp or torch.float32, device)[0]
    mem_mb = (torch.cuda.max_memory_allocated() if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    res = {
        "recipe": args.recipe, "preset": args.preset, "batch": args.batch, "vocab": args.vocab,
        "caption_tokens": args.caption_tokens, "peer_captions": args.peer_captions,
        "text_length": batch["text"].shape[1], "accum": args.accum, "exact": parts.exact, "precision": args.precision,
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "params_M": round(sum(q.numel() for q in module.parameters()) / 1e6, 3),
        "median_step_s": round(med, 4), "samples_per_s": round(args.batch / med, 1),
        "peak_mem_MB": round(mem_mb, 1), "step_GFLOP": round(flops / 1e9, 2),
        "matmul_peak_GFLOPs": round(peak / 1e9, 1), "mfu_pct": round(100 * flops / med / peak, 1),
        "final_loss": round(loss, 4),
    }
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
