"""Attention forward + backward on CPU: PyTorch's fused kernel (F.scaled_dot_product_attention) against
vlpt's `attention` (unfused matmuls and an fp32 softmax in bf16/fp16; the fused kernel otherwise), on one
process, interleaved, median of the timed repeats. Shapes are batch x heads x sequence x head width.

  python benchmarks/attention_cpu.py                       # the shapes of tiny-clip, tiny-coca and ViT-B/16
  python benchmarks/attention_cpu.py --shapes 64x4x65x64 --dtype fp32 --repeats 20
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from vlpt.models.layers import attention

SHAPES = ["64x4x65x64", "64x4x32x64:causal", "16x12x197x64", "16x8x77x64:causal", "8x8x577x64"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def seconds(fn, q, k, v, causal: bool) -> float:
    t = time.perf_counter()
    fn(q, k, v, causal).backward(torch.ones_like(q))
    return time.perf_counter() - t


def parse(spec: str) -> tuple[list[int], bool]:
    dims, _, flag = spec.partition(":")
    try:
        shape = [int(d) for d in dims.split("x")]
    except ValueError:
        shape = []
    if len(shape) != 4 or flag not in ("", "causal"):
        sys.exit(f"error: --shapes {spec!r} is not BxHxLxD[:causal], e.g. 64x4x65x64 or 64x4x32x64:causal")
    return shape, flag == "causal"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="BxHxLxD, ':causal' for a causal mask")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    fns = {"fused": lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c),
           "vlpt": lambda q, k, v, c: attention(q, k, v, causal=c)}
    specs = [(spec, *parse(spec)) for spec in args.shapes]
    print(f"| shape | fused ms | vlpt ms | vlpt / fused |  ({args.dtype}, {torch.get_num_threads()} threads)")
    print("|---|---|---|---|")
    for spec, shape, causal in specs:
        q, k, v = (torch.randn(shape, dtype=DTYPES[args.dtype], requires_grad=True) for _ in range(3))
        times = {name: [] for name in fns}
        for i in range(args.repeats + 2):
            for name, fn in fns.items():
                s = seconds(fn, q, k, v, causal)
                if i >= 2:  # two untimed rounds first
                    times[name].append(s)
        fused, ours = (1000 * statistics.median(times[n]) for n in fns)
        print(f"| {spec} | {fused:.2f} | {ours:.2f} | {ours / fused:.2f} |")


if __name__ == "__main__":
    main()
