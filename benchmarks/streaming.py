"""Start-up time and peak memory of streamed shards against the number of shards, beside the shards read whole.

Writes synthetic shards (PER_SHARD samples of a small JPEG, a caption and its .json) for each count to a
temporary folder (removed at the end), then for each count, in a fresh process:
- stream: `training_source` with data.streaming=true (shard names listed, the first sample probed), the
  first batch (the shuffle buffer filled), then `--batches` more batches;
- whole: `training_source` with data.streaming=false, data.cache_images=false (today's `read_shards`:
  every sample's bytes in memory, decoded per batch), then the same batches.
Peak memory is the process's maximum resident set (ru_maxrss) plus its data workers' (children). The
tokenizer is trained beforehand on a fixed list, so its caption sample is not timed.

  python benchmarks/streaming.py --shards 10 100 1000 --workers 0
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_shards(folder: Path, count: int, per_shard: int, side: int) -> None:
    import webdataset as wds

    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(16):  # a few distinct pictures, reused: the sizes matter here, not the pixels
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    folder.mkdir(parents=True)
    for s in range(count):
        with wds.TarWriter(str(folder / f"{s:06d}.tar")) as tar:
            for k in range(per_shard):
                i = s * per_shard + k
                caption = f"a synthetic picture number {i}"
                tar.write({"__key__": f"{i:09d}", "jpg": jpegs[i % 16], "txt": caption,
                           "json": json.dumps({"captions": [caption]}).encode()})


def measure(folder: str, mode: str, batches: int, batch: int, workers: int, buffer: int) -> dict:
    """One configuration, in this process: seconds to open, to the first batch, per batch after; peak MB."""
    from vlpt import config
    from vlpt.data.tokenizer import TextTokenizer
    from vlpt.data.views import TextViews
    from vlpt.train.data import training_source

    tokenizer = TextTokenizer.train([f"a synthetic picture number {i}" for i in range(100)], 300, 24)
    streaming = ["data.streaming=true"] if mode == "stream" else ["data.streaming=false", "data.cache_images=false"]
    cfg = config.resolve("clip", ["model=micro", f"data=wds:{folder}", f"train.batch_size={batch}", "train.steps=1",
                                  f"data.num_workers={workers}", f"data.shuffle_buffer={buffer}", *streaming])
    t0 = time.perf_counter()
    source = training_source(cfg, 1, False)
    t1 = time.perf_counter()
    it = source.batches(tokenizer, TextViews(cfg.views, 0), 0, 1, {}).iterate(0, batches + 1)
    next(it)
    t2 = time.perf_counter()
    for _ in range(batches):
        next(it)
    t3 = time.perf_counter()
    del it
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"open_s": t1 - t0, "first_batch_s": t2 - t1, "per_batch_s": (t3 - t2) / batches,
            "peak_mb": own, "worker_peak_mb": children}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--per-shard", type=int, default=50)
    p.add_argument("--side", type=int, default=96, help="stored JPEG side (decoded to model=micro's 32)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--buffer", type=int, default=256, help="data.shuffle_buffer (< 10 x --per-shard: the first "
                                                          "batch then waits for the same samples at every size)")
    p.add_argument("--modes", nargs="+", default=["stream", "whole"])
    p.add_argument("--measure", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure[0], a.measure[1], a.batches, a.batch, a.workers, a.buffer)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlpt-bench-shards-") as tmp:
        for count in a.shards:
            t = time.perf_counter()
            write_shards(Path(tmp) / str(count), count, a.per_shard, a.side)
            print(f"wrote {count} shards x {a.per_shard} samples in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            for mode in a.modes:
                cmd = [sys.executable, __file__, "--measure", str(Path(tmp) / str(count)), mode, "--batches",
                       str(a.batches), "--batch", str(a.batch), "--workers", str(a.workers), "--buffer", str(a.buffer)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append({"shards": count, "samples": count * a.per_shard, "mode": mode, **json.loads(out)})
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"{'shards':>7} {'samples':>8} {'mode':>6} {'open s':>8} {'1st batch s':>11} {'per batch s':>11} "
          f"{'peak MB':>8} {'workers MB':>10}")
    for r in rows:
        print(f"{r['shards']:>7} {r['samples']:>8} {r['mode']:>6} {r['open_s']:>8.3f} {r['first_batch_s']:>11.3f} "
              f"{r['per_batch_s']:>11.4f} {r['peak_mb']:>8.0f} {r['worker_peak_mb']:>10.0f}")


if __name__ == "__main__":
    main()
