"""Beam search alone, on open_clip's tiny-coca shapes with random weights (the model benchmarks/generation.py
builds): 32 random 64px images, beam 6, 20 tokens. Prints the seconds of `generate` and writes the token
ids to OUT, so that two versions of vlpt can be timed against each other and their captions compared.

  python benchmarks/beam_search.py /tmp/captions.json
"""
import json
import sys
import time

import torch

from generation import vlpt_tiny_coca  # benchmarks/generation.py, beside this script
from vlpt.models.captioner import generate


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("error: give the output file, e.g. python benchmarks/beam_search.py /tmp/captions.json")
    model = vlpt_tiny_coca()
    images = torch.randint(0, 256, (32, 3, 64, 64), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    start = time.perf_counter()
    ids = generate(model, images, beam_width=6, max_tokens=20)
    print(f"generate: {time.perf_counter() - start:.2f} s")
    with open(sys.argv[1], "w") as f:
        json.dump(ids, f)


if __name__ == "__main__":
    main()
