"""Are two runs' final weights the same? Tensor by tensor: bit-identical, or the largest difference.

  python benchmarks/compare_runs.py RUN_A RUN_B   # exit 0 when every tensor is bit-identical

Used to check that a restructuring of the core keeps behaviour (docs/results.md, "Bit-identical
restructuring"): train the same recipe with the same seed on the commit before and after, then compare.
"""
from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file

from vlpt.train import checkpoint


def main(a: str, b: str) -> int:
    wa = load_file(str(checkpoint.find(a) / "model.safetensors"))
    wb = load_file(str(checkpoint.find(b) / "model.safetensors"))
    if wa.keys() != wb.keys():
        print(f"different tensors: only in A {sorted(wa.keys() - wb.keys())}, only in B {sorted(wb.keys() - wa.keys())}")
        return 1
    differ = {k: (wa[k].float() - wb[k].float()).abs().max().item() for k in wa if not torch.equal(wa[k], wb[k])}
    for k, d in sorted(differ.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {k}: max |A - B| = {d:.3g}")
    n = sum(t.numel() for t in wa.values())
    print(f"{len(wa) - len(differ)} of {len(wa)} tensors ({n:,} values) bit-identical" if differ
          else f"bit-identical: all {len(wa)} tensors, {n:,} values")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
