"""Caption generation speed: vlpt vs open_clip on the Flickr8k test images, same CoCa shapes.

Both captioners caption the first N Flickr8k test images (64x64) with beam search, width 6, at most 30
tokens, in batches, fp32, on the tiny-coca shapes of ../shared/peers/open_clip/configs/tiny-coca.json:
ViT 64px / patch 8 / width 256 / 4 layers / 4 heads / class token, a 256-query generative pooler and a
1-query contrastive pooler (cascade), 4 unimodal + 4 multimodal text layers of width 256, 4 heads,
vocabulary 49,408.

Both models are randomly initialised with a fixed seed: speed does not depend on what the weights
learned, except through caption length. Random weights rarely pick <eot>, so both write captions to the
length limit (the mean number of tokens is reported for each); a trained captioner stops at ~12 tokens.
vlpt zero-initialises its output layer (Cap paper), which would make every token equally likely and end
every caption at once, so here it gets random weights like open_clip's (normal, std width**-0.5).
open_clip's "beam_search" is its default diverse beam search (6 beams in 3 groups, at least 5 tokens);
it runs the whole decoder over the whole prefix at every step, vlpt steps a key/value cache. open_clip's
multimodal layers also have a second MLP after their cross-attention (38.5M vs 36.7M parameters).

Each side runs in its own fresh process (open_clip in its venv, /tmp/peer-openclip; installed with
../shared/peers/open_clip/setup.sh when missing) after an untimed warm-up on two images. open_clip
takes ~2 s per image on 2 cores: `--openclip-images M` times it on the first M images only and scales
the time to N (reported as "extrapolated").

  python benchmarks/generation.py                       # 1,000 images each
  python benchmarks/generation.py --openclip-images 100 # open_clip on 100, extrapolated to 1,000
  python benchmarks/generation.py --images 5 --batch 5  # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER_DIR = HERE.parents[1] / "shared" / "peers" / "open_clip"
PEER_VENV = Path(os.environ.get("PEER_OPENCLIP_VENV", "/tmp/peer-openclip"))
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true"
VOCAB = 49408
SEED = 0


# ------------------------------------------------------------------------------------------ the workers
def _time_batches(images, batch: int, caption_batch) -> tuple[float, list[int]]:
    """Warm up on two images, then time captioning all `images`; (seconds, tokens per caption)."""
    import torch

    with torch.no_grad():
        caption_batch(images[:2])
        lengths: list[int] = []
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            lengths += caption_batch(images[i : i + batch])
        return time.perf_counter() - start, lengths


def vlpt_tiny_coca():
    """vlpt's coca on the tiny-coca shapes, random weights (seed SEED), in eval mode."""
    import torch

    from vlpt import config
    from vlpt.data.tokenizer import Vocab
    from vlpt.models.model import ImageTextModel

    torch.manual_seed(SEED)
    cfg = config.resolve("coca", [
        "model.preset=tiny-clip", "model.vision.pool=cls", "model.decoder.unimodal_depth=4", "model.decoder.depth=4",
        "model.poolers.generative_queries=256", "model.poolers.contrastive=cascade",
    ])
    needs = frozenset({"image_embed", "text_embed", "caption_logits"})
    model = ImageTextModel(cfg.model, Vocab(VOCAB, pad=0, sot=1, eot=2, mask=3), needs).eval()
    torch.nn.init.normal_(model.decoder.head.weight, std=cfg.model.text.width**-0.5)  # see the module doc
    return model


def vlpt_worker(args) -> dict:
    import torch

    from vlpt.models.captioner import generate

    model = vlpt_tiny_coca()
    images = torch.load(args.images_file)

    def caption_batch(x):
        ids = generate(model, x, method="beam", beam_width=args.beam_width, max_tokens=args.max_tokens)
        return [len(t) for t in ids]

    seconds, lengths = _time_batches(images, args.batch, caption_batch)
    return {"seconds": seconds, "lengths": lengths, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}


def openclip_worker(args) -> dict:
    """Runs with the peer venv's python: imports open_clip only."""
    sys.path.insert(0, str(PEER_DIR))
    try:
        import tv_shim  # noqa: F401  (torchvision import without CUDA ops; setup.sh also installs it as a .pth)
    except ImportError:
        pass
    import open_clip
    import torch

    torch.manual_seed(SEED)
    open_clip.add_model_config(str(PEER_DIR / "configs"))
    model = open_clip.create_model("tiny-coca", pretrained=None, precision="fp32", device="cpu").eval()
    # open_clip leaves the decoder's output projection as torch.empty (see the peer README)
    torch.nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width**-0.5)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    images = torch.load(args.images_file)
    special = {0, 49406, 49407}  # pad, <start_of_text>, <end_of_text>

    def caption_batch(x):
        x = (x.float() / 255 - mean) / std
        # seq_len counts <start_of_text>: max_tokens + 1 leaves room for max_tokens generated tokens
        out = model.generate(x, seq_len=args.max_tokens + 1, generation_type="beam_search", num_beams=args.beam_width)
        return [sum(int(t) not in special for t in row) for row in out]

    seconds, lengths = _time_batches(images, args.batch, caption_batch)
    return {"seconds": seconds, "lengths": lengths, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}


# ---------------------------------------------------------------------------------------------- harness
def flickr8k_test_images(n: int):
    from vlpt.data.sources import decode_all, load_flickr8k, shared_data_dir

    root = shared_data_dir()
    if root is None or not (root / "flickr8k").is_dir():
        raise SystemExit("no ../shared/data/flickr8k (or $VLPT_SHARED_DATA/flickr8k): this benchmark needs it")
    ds = load_flickr8k(root / "flickr8k", "test")
    ds = ds.subset_images(list(range(min(n, ds.num_images))))
    images, _, bad = decode_all(ds, 64, progress=False)
    if bad:
        print(f"warning: {len(bad)} test images could not be read", file=sys.stderr)
    return images


def ensure_peer() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"installing open_clip into {PEER_VENV} ({PEER_DIR / 'setup.sh'}) ...", file=sys.stderr)
        subprocess.run(["bash", str(PEER_DIR / "setup.sh"), str(PEER_VENV)], check=True)
    return python


def run_worker(python: Path, side: str, images_file: str, args, env: dict) -> dict:
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", side, "--images-file", images_file,
           "--batch", str(args.batch), "--threads", str(args.threads), "--beam-width", str(args.beam_width),
           "--max-tokens", str(args.max_tokens)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {side} worker failed (exit {proc.returncode}); command: {' '.join(cmd)}")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("WORKER "))
    return json.loads(line[len("WORKER "):])


def summarise(r: dict, n_timed: int, n_total: int) -> dict:
    seconds = r["seconds"] * n_total / n_timed
    return {
        "seconds": round(seconds, 2), "images_per_s": round(n_total / seconds, 3),
        "timed_images": n_timed, "extrapolated": n_timed != n_total,
        "mean_tokens": round(sum(r["lengths"]) / len(r["lengths"]), 2), "params_M": round(r["params_M"], 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="Flickr8k test images to caption (max 1,000)")
    p.add_argument("--openclip-images", type=int, default=None,
                   help="time open_clip on only the first M images and extrapolate to --images (labelled)")
    p.add_argument("--batch", type=int, default=50, help="images per generation call (both sides)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--beam-width", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=30)
    p.add_argument("--only", choices=["vlpt", "open_clip"], help="time one side only")
    p.add_argument("--malloc", choices=["auto", "jemalloc", "system"], default="auto",
                   help="auto: preload jemalloc when installed (glibc malloc makes open_clip's CoCa ~1.5x slower)")
    p.add_argument("--worker", choices=["vlpt", "open_clip"], help=argparse.SUPPRESS)
    p.add_argument("--images-file", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = (vlpt_worker if args.worker == "vlpt" else openclip_worker)(args)
        print("WORKER " + json.dumps({**result, "threads": torch.get_num_threads(), "torch": torch.__version__}))
        return

    env = dict(os.environ)
    use_jemalloc = args.malloc == "jemalloc" or (args.malloc == "auto" and Path(JEMALLOC).exists())
    if use_jemalloc:
        if not Path(JEMALLOC).exists():
            raise SystemExit(f"{JEMALLOC} not found: apt-get install -y libjemalloc2, or use --malloc system")
        env.update(LD_PRELOAD=JEMALLOC, MALLOC_CONF=JEMALLOC_CONF)
    else:
        print("hint: glibc malloc; `apt-get install -y libjemalloc2` and --malloc jemalloc (as in the peer "
              "README) makes open_clip's CoCa ~1.5x faster and less noisy", file=sys.stderr)

    images = flickr8k_test_images(args.images)
    n = len(images)
    n_peer = min(args.openclip_images or n, n)
    if n_peer < n and n_peer % args.batch:
        print(f"warning: --openclip-images {n_peer} is not a multiple of --batch {args.batch}: its last batch is "
              "smaller than vlpt's, which skews the extrapolation", file=sys.stderr)
    result = {"images": n, "batch": args.batch, "beam_width": args.beam_width, "max_tokens": args.max_tokens,
              "malloc": "jemalloc" if use_jemalloc else "system", "weights": f"random init, seed {SEED}"}
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for side, count in (("vlpt", n), ("open_clip", n_peer)):
            files[side] = os.path.join(tmp, f"{side}.pt")
            torch.save(images[:count].clone(), files[side])
        if args.only != "open_clip":
            r = run_worker(Path(sys.executable), "vlpt", files["vlpt"], args, env)
            result["threads"] = r["threads"]
            result["vlpt"] = summarise(r, n, n)
            print(f"vlpt: {result['vlpt']}", file=sys.stderr)
        if args.only != "vlpt":
            r = run_worker(ensure_peer(), "open_clip", files["open_clip"], args, env)
            result["threads"] = r["threads"]
            result["open_clip"] = summarise(r, n_peer, n)
            print(f"open_clip: {result['open_clip']}", file=sys.stderr)
    if "vlpt" in result and "open_clip" in result:
        result["speedup"] = round(result["open_clip"]["seconds"] / result["vlpt"]["seconds"], 2)
        if result["open_clip"]["extrapolated"]:
            result["speedup_note"] = f"open_clip timed on {n_peer} of {n} images and scaled linearly"
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
