"""`vlpt train|eval|caption|demo|data|export|import-weights|recipes`: the command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TRAIN_EXAMPLES = """examples:
  vlpt train clip --out runs/clip                          # CLIP on the built-in scenes
  vlpt train clip data=flickr8k:../shared/data/flickr8k model=tiny-clip train.epochs=5 --out runs/f8k
  vlpt train siglip data=my_captions.csv train.steps=2000 train.batch_size=256
  vlpt train clip --out runs/clip --resume                 # continue an interrupted run
  torchrun --nproc_per_node 8 -m vlpt train clip model=vit-b16 data=wds:'shards/{000000..000999}.tar'

Every key of the resolved config can be set as key=value (see a run's config.yaml);
`data=X` is short for data.source=X and `model=P` for model.preset=P."""

EVAL_EXAMPLES = """examples:
  vlpt eval runs/demo                                      # the recipe's evaluation suite
  vlpt eval runs/demo --task zeroshot:scenes:shape --json
  vlpt eval runs/f8k --task retrieval:flickr8k:../shared/data/flickr8k:test
  vlpt eval runs/f8k --task zeroshot:folder:../shared/data/cifar10/test
  vlpt eval runs/coca --task captioning:flickr8k:test --captions-out captions.json

tasks: zeroshot:DATA, retrieval:DATA, linear_probe:TRAIN_DATA|TEST_DATA, captioning:DATA,
zeroshot_captioner:DATA, caption_loss:DATA (DATA as in `vlpt data --help`), or an evaluator of your own
by import path: my_pkg.evals:MyEvaluator:DATA (see docs/guide.md, "Writing an evaluator")."""

CAPTION_EXAMPLES = """examples:
  vlpt caption runs/coca photo1.jpg photo2.jpg             # beam search, width 6, at most 30 tokens
  vlpt caption runs/cap photo.jpg --method nucleus --top-p 0.9 --seed 1"""

DATA_HELP = """data specs (data=SPEC in training, DATA in evaluation tasks):
  scenes[:SPLIT]            built-in compositional scenes; SPLIT: train, test, colour, shape, colour_shape
  flickr8k[:PATH][:SPLIT]   Flickr8k layout (captions.txt + split files); SPLIT: train, dev, test, all
  csv:PATH | tsv:PATH       a captions table (image path + caption columns)
  coco:JSON[:IMAGE_ROOT]    COCO captions JSON
  folder:PATH[:SPLIT]       class-per-folder images; labels become text with prompt templates
  cifar10:SPLIT             the CIFAR-10 folder of ../shared/data
  wds:PATTERN               WebDataset shards, e.g. wds:'shards/{000000..000009}.tar'
  A + B@0.3                 a weighted mixture of sources (weights default to 1)
  a bare path is recognised by its layout."""


EXPORT_HELP = """examples:
  vlpt export runs/clip hf/clip                            # transformers.CLIPModel.from_pretrained("hf/clip")

Maps a ViT with stem=patch and pool=cls and the CLIP text tower; other models are refused with the reason."""

IMPORT_HELP = """examples:
  vlpt import-weights hf/clip runs/from-hf --from hf
  vlpt import-weights ViT-B-32.safetensors runs/b32 --from open_clip --config ViT-B-32.json --tokenizer tokenizer.json
  vlpt eval runs/b32 --task zeroshot:cifar10:test

open_clip weights (CLIP, or CoCa: told by the tensors) carry no tokenizer: give the tokenizer.json of their vocabulary."""


def _train(args) -> int:
    import yaml

    from vlpt import config as config_lib
    from vlpt.data.sources import BadDataError
    from vlpt.train import loop
    from vlpt.train.evaluation import EvaluationFailed
    from vlpt.train.guards import TrainingStopped
    from vlpt.train.resume import elastic_restart
    from vlpt.train.signals import Interrupted

    out = Path(args.out or f"runs/{Path(args.recipe).stem}")
    resume = args.resume or elastic_restart() > 0  # a torchrun restart continues the run it replaces
    if resume and (out / "config.yaml").exists():
        saved = yaml.safe_load((out / "config.yaml").read_text())
        cfg = config_lib.from_dict(config_lib.deep_merge(saved, config_lib.parse_overrides(args.overrides)))
    else:
        cfg = config_lib.resolve(args.recipe, args.overrides)
    try:
        loop.train(cfg, out, resume=resume, progress=not args.quiet, report=print)  # the summary, also with --quiet
    except Interrupted as stop:  # a checkpoint of the last finished step is saved: exit 128 + signal
        print(f"vlpt: {stop}", file=sys.stderr)
        return stop.exit_code
    except (TrainingStopped, BadDataError, EvaluationFailed) as err:
        print(f"vlpt: error: {err}", file=sys.stderr)
        return 1
    finally:
        from vlpt.train.distributed import teardown

        teardown()
    return 0


def _eval(args) -> int:
    from vlpt.eval.defaults import resolve_tasks
    from vlpt.eval.registry import TaskError, run_suite, write_samples
    from vlpt.inference import Model, load_pretrainer

    cfg, tokenizer, module, ckpt = load_pretrainer(args.checkpoint)
    model = Model(module.model, tokenizer)
    tasks = args.task or resolve_tasks([t.task for t in cfg.eval.tasks], cfg.data.source, model.abilities)
    if not tasks:
        raise SystemExit(f"no evaluation tasks: the run's data ({cfg.data.source}) implies none; give --task")
    samples: dict = {}
    try:
        results = run_suite(tasks, model, templates=args.templates or cfg.eval.templates, progress=not args.json,
                            samples=samples)
    except TaskError as err:
        print(f"vlpt: error: {err}", file=sys.stderr)
        return 2
    if samples and args.captions_out:
        write_samples(samples, args.captions_out)
    if args.json:
        print(json.dumps(results))
    else:
        print(format_results(results, title=str(ckpt)))
    return 0


def _caption(args) -> int:
    import torch
    from PIL import Image

    from vlpt.inference import load

    model = load(args.checkpoint)
    if not model.has_decoder:
        print(f"error: {args.checkpoint} has no caption decoder (train cap, cappa or coca)", file=sys.stderr)
        return 2
    images = []
    for path in args.images:
        try:
            images.append(Image.open(path))
        except (OSError, ValueError) as err:
            print(f"error: cannot read image {path}: {err}", file=sys.stderr)
            return 2
    captions = model.generate(images, method=args.method, beam_width=args.beam_width, max_tokens=args.max_tokens,
                              length_penalty=args.length_penalty, top_p=args.top_p, temperature=args.temperature,
                              generator=torch.Generator().manual_seed(args.seed))
    for path, text in zip(args.images, captions):
        print(f"{path}\t{text}")
    return 0


def _demo(args) -> int:
    """CLIP on the built-in scenes, sized to finish in a few minutes on 2 CPU cores."""
    from vlpt import config as config_lib
    from vlpt.train import loop

    out = Path(args.out)
    if (out / "checkpoints").exists():
        import shutil

        shutil.rmtree(out)  # the demo always starts fresh
    cfg = config_lib.resolve("clip", args.overrides)
    print(f"vlpt demo: CLIP, model={cfg.model.preset}, {cfg.train.steps} steps of {cfg.train.batch_size} "
          f"on built-in scenes -> {out}", file=sys.stderr)
    loop.train(cfg, out, progress=True, report=print)
    print("chance: zero-shot colour 12.5%, shape 20%, colour+shape 2.5%; retrieval R@1 0.2% (500 images, 1,000 captions)")
    return 0


def _plot(args) -> int:
    from vlpt.plot import NothingToPlot, plot_run

    try:
        out = plot_run(args.run, args.out)
    except NothingToPlot as err:
        print(f"vlpt: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _data(args) -> int:
    if args.data_cmd == "pack":
        from vlpt.data.webdataset_io import pack

        shards = pack(args.spec, args.out, maxcount=args.maxcount, size=args.size)
        print(f"wrote {len(shards)} shard(s): {shards[0]} ... {shards[-1]}" if shards else "wrote nothing")
    elif args.data_cmd == "info":
        from vlpt.data.sources import open_data

        data, weights = open_data(args.spec)
        print(f"{data.name}: {data.num_images} images, {len(data)} captions"
              + (f", {len(data.classnames)} classes" if data.classnames else "")
              + (", weighted mixture" if weights is not None else ""))
        for t, i in list(zip(data.captions, data.caption_image))[: args.show]:
            print(f"  [{i}] {t}")
    return 0


def _recipes(args) -> int:
    from vlpt.config import RECIPES_DIR, available_recipes

    for name in available_recipes():
        first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:10s} {first}")
    return 0


def _export(args) -> int:
    from vlpt.interop import MappingError, export_hf

    try:
        out = export_hf(args.run, args.out)
    except MappingError as err:
        print(f"vlpt: cannot export to {args.format}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (transformers.CLIPModel.from_pretrained, AutoTokenizer, CLIPImageProcessor)")
    return 0


def _import_weights(args) -> int:
    from vlpt.interop import MappingError, import_hf, import_open_clip, save_run

    try:
        if args.source == "hf":
            imported = import_hf(args.src, tokenizer=args.tokenizer)
        else:
            imported = import_open_clip(args.src, config=args.config, tokenizer=args.tokenizer,
                                        vision_heads=args.vision_heads, text_heads=args.text_heads)
        ckpt = save_run(imported, args.out)
    except MappingError as err:
        print(f"vlpt: cannot import from {args.source}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {ckpt} (vlpt eval {args.out})")
    return 0


def format_results(results: dict, title: str = "") -> str:
    width = max((len(k) for k in results), default=10)
    lines = [title, "-" * (width + 12)] if title else []
    lines += [f"{k:<{width}}  {v:8.2f}" for k, v in results.items()]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlpt", description="Vision-language pre-training: every objective as a recipe.")
    sub = p.add_subparsers(dest="cmd", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser("train", help="pre-train a recipe", epilog=TRAIN_EXAMPLES, formatter_class=fmt)
    t.add_argument("recipe", help="recipe name (see `vlpt recipes`) or path to a recipe YAML")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    t.add_argument("--out", help="run folder (default runs/RECIPE)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="evaluate a run or checkpoint", epilog=EVAL_EXAMPLES, formatter_class=fmt)
    e.add_argument("checkpoint", help="run folder, checkpoint folder or model.safetensors")
    e.add_argument("--task", action="append", help="evaluation task (repeatable); default: the recipe's suite")
    e.add_argument("--templates", help="prompt templates: imagenet80 (default) or simple")
    e.add_argument("--json", action="store_true", help="print exactly one JSON object of metrics on stdout")
    e.add_argument("--captions-out", metavar="JSON", help="write the generated captions of captioning tasks here")
    e.set_defaults(fn=_eval)

    c = sub.add_parser("caption", help="print captions for images (Cap, CapPa, CoCa runs)", epilog=CAPTION_EXAMPLES,
                       formatter_class=fmt)
    c.add_argument("checkpoint", help="run folder, checkpoint folder or model.safetensors")
    c.add_argument("images", nargs="+", help="image files")
    c.add_argument("--method", choices=("beam", "greedy", "nucleus"), default="beam")
    c.add_argument("--beam-width", type=int, default=6)
    c.add_argument("--max-tokens", type=int, default=30, help="at most this many tokens before <eot>")
    c.add_argument("--length-penalty", type=float, default=0.0, help="beam score = log p / length**penalty")
    c.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    c.add_argument("--temperature", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=0, help="nucleus sampling seed")
    c.set_defaults(fn=_caption)

    d = sub.add_parser("demo", help="CLIP on built-in scenes in a few minutes, with results")
    d.add_argument("overrides", nargs="*", metavar="key=value")
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(fn=_demo)

    pl = sub.add_parser("plot", help="draw a run's training curves as a PNG", formatter_class=fmt,
                        description="Loss, learning rate, samples/s and evaluation metrics against the step, from "
                                    "RUN/metrics.jsonl (training draws RUN/curves.png at its end).",
                        epilog="examples:\n"
                               "  vlpt plot runs/demo                          # writes runs/demo/curves.png\n"
                               "  vlpt plot runs/clip --out clip-curves.png    # also while the run still trains")
    pl.add_argument("run", metavar="RUN", help="run folder (or its metrics.jsonl)")
    pl.add_argument("--out", metavar="FILE", help="PNG to write (default RUN/curves.png)")
    pl.set_defaults(fn=_plot)

    da = sub.add_parser("data", help="inspect data sources, write WebDataset shards", epilog=DATA_HELP, formatter_class=fmt)
    dsub = da.add_subparsers(dest="data_cmd", required=True)
    info = dsub.add_parser("info", help="count images and captions of a data spec", epilog=DATA_HELP, formatter_class=fmt)
    info.add_argument("spec")
    info.add_argument("--show", type=int, default=5, help="print the first N captions")
    pk = dsub.add_parser("pack", help="write any source as WebDataset shards", epilog=DATA_HELP + "\n\nexample:\n"
                         "  vlpt data pack flickr8k:../shared/data/flickr8k:train 'shards/f8k-%%06d.tar' --size 64",
                         formatter_class=fmt)
    pk.add_argument("spec")
    pk.add_argument("out", help="shard name pattern, e.g. shards/train-%%06d.tar")
    pk.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    pk.add_argument("--size", type=int, help="re-encode images at this size (default: keep the files)")
    da.set_defaults(fn=_data)

    x = sub.add_parser("export", help="write a run as another format's model folder", epilog=EXPORT_HELP, formatter_class=fmt)
    x.add_argument("run", help="run folder, checkpoint folder or model.safetensors")
    x.add_argument("out", help="output folder")
    x.add_argument("--format", choices=["hf"], default="hf", help="hf: a transformers CLIPModel folder")
    x.set_defaults(fn=_export)

    im = sub.add_parser("import-weights", help="make a vlpt run folder from HF or open_clip weights", epilog=IMPORT_HELP,
                        formatter_class=fmt)
    im.add_argument("src", help="hf: a CLIPModel folder; open_clip: a state dict file (.safetensors, .pt, .bin)")
    im.add_argument("out", help="the new run folder")
    im.add_argument("--from", dest="source", choices=["hf", "open_clip"], required=True)
    im.add_argument("--tokenizer", help="the weights' tokenizer.json (hf: default SRC/tokenizer.json)")
    im.add_argument("--config", help="open_clip: the model config JSON (head counts, activation check)")
    im.add_argument("--vision-heads", type=int, help="open_clip without --config: image tower heads (default width/64)")
    im.add_argument("--text-heads", type=int, help="open_clip without --config: text tower heads (default width/64)")
    im.set_defaults(fn=_import_weights)

    r = sub.add_parser("recipes", help="list the recipes")
    r.set_defaults(fn=_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    from vlpt.config import ConfigError

    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"vlpt: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
