"""`vlpt train|eval|compare|report|bench|caption|demo|data|export|import-weights|recipes`: the command line.

A user's mistake ends in one line, `error: ...`, exit status 2 (command line, config) or 1 (data,
checkpoint, run); `--debug` or VLPT_DEBUG=1 shows the traceback instead. Anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from vlpt.errors import UsageError, VlptError, one_line

TRAIN_EXAMPLES = """examples:
  vlpt train clip --out runs/clip                          # CLIP on the built-in scenes
  vlpt train clip data=flickr8k:../shared/data/flickr8k model=tiny-clip train.epochs=5 --out runs/f8k
  vlpt train siglip data=my_captions.csv train.steps=2000 train.batch_size=256
  vlpt train clip --out runs/clip --resume                 # continue an interrupted run
  torchrun --nproc_per_node 8 -m vlpt train clip model=vit-b16 data=wds:'shards/{000000..000999}.tar' data.cache_images=false

Every key of the resolved config can be set as key=value (see a run's config.yaml);
`data=X` is short for data.source=X and `model=P` for model.preset=P."""

EVAL_EXAMPLES = """examples:
  vlpt eval runs/demo                                      # the recipe's evaluation suite
  vlpt eval runs/demo --task zeroshot:scenes:shape --json
  vlpt eval runs/f8k --task retrieval:flickr8k:../shared/data/flickr8k:test
  vlpt eval runs/f8k --task zeroshot:folder:../shared/data/cifar10/test
  vlpt eval runs/coca --task captioning:flickr8k:test --captions-out captions.json

tasks: zeroshot:DATA, retrieval:DATA, linear_probe:TRAIN_DATA|TEST_DATA,
attentional_probe:TRAIN_DATA|TEST_DATA, captioning:DATA, zeroshot_captioner:DATA, caption_loss:DATA,
order:DATA[:seed=N], swaps:scenes, sugarcrepe:DIR (the last three take :blind=RUN; DATA as in
`vlpt data --help`), or an evaluator of your own by import path: my_pkg.evals:MyEvaluator:DATA (see
docs/guide.md, "Writing an evaluator")."""

CAPTION_EXAMPLES = """examples:
  vlpt caption runs/coca photo1.jpg photo2.jpg             # beam search, width 6, up to the model's context
  vlpt caption runs/cap photo.jpg --method nucleus --top-p 0.9 --seed 1"""

DATA_HELP = """data specs (data=SPEC in training, DATA in evaluation tasks):
  scenes[:SPLIT]            built-in compositional scenes; SPLIT: train, test, colour, shape, colour_shape,
                            relation; colour_shape:train/:test (likewise colour, shape): a probe's sets
  flickr8k[:PATH][:SPLIT]   Flickr8k layout (captions.txt + split files); SPLIT: train, dev, test, all
  csv:PATH | tsv:PATH       a captions table: a header line naming an image and a caption column
  coco:JSON[:IMAGE_ROOT]    COCO captions JSON
  folder:PATH[:SPLIT]       class-per-folder images; labels become text with prompt templates
  cifar10:SPLIT             the CIFAR-10 folder of ../shared/data
  wds:PATTERN               WebDataset shards, e.g. wds:'shards/{000000..000009}.tar'; training streams
                            them with data.cache_images=false (or data.streaming=true)
  sugarcrepe:DIR            a SugarCrepe folder: <category>.json files and images/
  A + B@0.3                 a weighted mixture of sources (weights default to 1)
  a bare path is recognised by its layout."""

INFO_HELP = """examples:
  vlpt data info my_captions.csv                           # counts, missing image files, skipped rows
  vlpt data info my_captions.csv data.max_bad_fraction=0.05 --check

--check decodes every image and tokenizes the captions as training would (the keys given, on --recipe):
it lists unreadable images, empty captions, captions longer than model.text.context_length tokens (cut in
training) and duplicate (image, caption) pairs. Exit status 0: training would accept the data; 1: it would
refuse it (the reason on one line)."""

DATA_PACK_EXAMPLES = """example:
  vlpt data pack flickr8k:../shared/data/flickr8k:train 'shards/f8k-%06d.tar' --size 64"""

EXPORT_HELP = """examples:
  vlpt export runs/clip hf/clip                            # transformers.CLIPModel.from_pretrained("hf/clip")

Maps a ViT with stem=patch and pool=cls and the CLIP text tower; other models are refused with the reason."""

IMPORT_HELP = """examples:
  vlpt import-weights hf/clip runs/from-hf --from hf
  vlpt import-weights ViT-B-32.safetensors runs/b32 --from open_clip --config ViT-B-32.json --tokenizer tokenizer.json
  vlpt eval runs/b32 --task zeroshot:cifar10:test

open_clip weights (CLIP, or CoCa: told by the tensors) carry no tokenizer: give the tokenizer.json of their vocabulary."""


def _train(args) -> int:
    from vlpt import config as config_lib
    from vlpt.train import loop
    from vlpt.train.resume import elastic_restart
    from vlpt.train.signals import Interrupted

    out = Path(args.out or f"runs/{Path(args.recipe).stem}")
    resume = args.resume or elastic_restart() > 0  # a torchrun restart continues the run it replaces
    if resume and (out / "config.yaml").exists():
        saved = config_lib.read_yaml(out / "config.yaml")
        given = Path(args.recipe).stem
        if saved.get("recipe") != given:
            raise UsageError(f"--resume: {out} is a run of recipe '{saved.get('recipe')}', not '{given}'; continue "
                             f"it with `vlpt train {saved.get('recipe')} --out {out} --resume` or pick another --out")
        cfg = config_lib.from_dict(config_lib.deep_merge(saved, config_lib.parse_overrides(args.overrides)))
    else:
        cfg = config_lib.resolve(args.recipe, args.overrides)
    try:
        loop.train(cfg, out, resume=resume, progress=not args.quiet, report=print)  # the summary, also with --quiet
    except Interrupted as stop:  # a checkpoint of the last finished step is saved: exit 128 + signal
        print(f"vlpt: {stop}", file=sys.stderr)
        return stop.exit_code
    finally:
        from vlpt.train.distributed import teardown

        teardown()
    return 0


EVAL_KEYS = ("data.max_bad_fraction", "eval.templates")  # the only config keys that change an evaluation


def _eval(args) -> int:
    from vlpt.config import parse_overrides
    from vlpt.eval.defaults import resolve_tasks
    from vlpt.eval.registry import run_suite, write_samples
    from vlpt.inference import Model, load_pretrainer
    from vlpt.typed import build

    top = parse_overrides(args.overrides)
    for section, keys in top.items():
        for key in keys if isinstance(keys, dict) else [None]:
            if f"{section}.{key}" not in EVAL_KEYS:
                raise UsageError(f"vlpt eval takes only {' and '.join(k + '=...' for k in EVAL_KEYS)}, not "
                                 f"'{section}{'.' + key if key else ''}'; training keys are set in `vlpt train`")
    cfg, tokenizer, module, ckpt = load_pretrainer(args.checkpoint)
    data = build(type(cfg.data), {**vars(cfg.data), **top.get("data", {})}, "data.")
    if not 0 <= data.max_bad_fraction <= 1:
        raise UsageError(f"data.max_bad_fraction={data.max_bad_fraction} must be between 0 and 1")
    if args.ema and module.ema is None:
        raise UsageError(f"{args.checkpoint} holds no average of weights: it was trained without train.ema; "
                         f"drop --ema")
    model = Model(module.ema.module if args.ema else module.model, tokenizer, objectives=module.objectives)
    tasks = args.task or resolve_tasks([t.task for t in cfg.eval.tasks], cfg.data.source, model.abilities)
    if not tasks:
        raise UsageError(f"no evaluation tasks: the run's data ({cfg.data.source}) implies none; "
                         f"give one with --task (see `vlpt eval --help`)")
    samples: dict = {}
    templates = args.templates or top.get("eval", {}).get("templates") or cfg.eval.templates
    results = run_suite(tasks, model, templates=templates, progress=not args.json, samples=samples,
                        max_bad_fraction=data.max_bad_fraction)
    if samples and args.captions_out:
        write_samples(samples, args.captions_out)
    if args.json:
        print(json.dumps(results))
    else:
        print(format_results(results, title=str(ckpt)))
    return 0


COMPARE_EXAMPLES = """examples:
  vlpt compare clip cap model=micro --budget 2048 --seeds 2 --out runs/cmp   # a table, plots, report.html
  vlpt compare clip siglip cap coca --budget 100000 --out runs/cmp4          # 3 seeds each (default)
  vlpt compare clip cap --budget 20000 --budgets 1,2,4,8,16 --out runs/scaling   # scaling fits
  vlpt compare clip cap bow-prediction model=micro --flops 2e11 --seeds 1 --out runs/cmp-flops  # equal FLOPs
  vlpt compare clip cap model=micro --budget 2048 --with-blind --seeds 1 'eval.tasks=[swaps:scenes]' --out runs/cmp-blind

Every recipe trains on the same data, model preset, seeds and budget (train.samples = --budget, or with
--flops each recipe's samples from its training FLOPs per sample, counted once; the recipes' own
steps/epochs are replaced) and is evaluated with one suite: the union of the recipes' `auto` tasks, or
eval.tasks=[...] as given (probes only at the end); a task a recipe cannot run is a blank cell with the
reason. Runs go to OUT/runs/RECIPE-seedS (blind twins: RECIPE-blind-seedS); finished runs are not
retrained and an interrupted compare resumes where it stopped. A difference is called a win only when the
seeds' intervals mean +- std do not overlap."""

REPORT_EXAMPLES = """examples:
  vlpt report runs/cmp --out runs/cmp-report               # rebuild the report of a compare
  vlpt report runs/clip runs/cap --out report              # any finished runs, any mix of recipes"""


def _compare(args) -> int:
    from vlpt.compare import report, runs
    from vlpt.train.signals import Interrupted

    recipes = [x for x in args.overrides if not OVERRIDE.match(x)]
    overrides = [x for x in args.overrides if OVERRIDE.match(x)]
    try:
        multiples = [float(m) for m in args.budgets.split(",")] if args.budgets else [1.0]
    except ValueError:
        raise UsageError(f"--budgets {args.budgets}: give multiples of --budget separated by commas, "
                         f"e.g. 1,2,4") from None
    out = Path(args.out)
    planned = runs.plan(recipes, overrides, args.budget, args.seeds, multiples, args.points, out / "runs",
                        args.with_blind, args.flops)
    try:
        failed = runs.train_all(planned, out / "runs", progress=not args.quiet)
    except Interrupted as stop:  # the run in progress saved its last step; finished runs stay finished
        print(f"vlpt: {stop}; run the same `vlpt compare` command to resume", file=sys.stderr)
        return stop.exit_code
    finally:
        from vlpt.train.distributed import teardown

        teardown()
    done = [out / "runs" / r.name for r in planned if r.name not in failed]
    if done:
        page = report.build(done, out, n_boot=args.bootstrap)
        print(f"wrote {out / 'report.md'} and {page}")
    for name, message in failed.items():
        print(f"error: {name}: {one_line(message)}", file=sys.stderr)
    return 1 if failed else 0


BENCH_EXAMPLES = """examples:
  vlpt bench clip model=micro --parts step                  # samples/s, peak memory, FLOPs, MFU of one step
  vlpt bench coca model=tiny-clip train.batch_size=64 train.precision=bf16 --vocab 49408 --json bench.json
  vlpt bench clip model=micro train.batch_size=32 --parts data,loop,eval

The step runs on a fixed random batch (as ../shared/peers/open_clip/bench.py does for open_clip); MFU is
against the best square matmul measured here in the training dtype. docs/results.md quotes these numbers."""


def _bench(args) -> int:
    from vlpt import bench
    from vlpt import config as config_lib

    parts = args.parts.split(",") if args.parts else list(bench.PARTS)
    unknown = [p for p in parts if p not in bench.PARTS]
    if unknown:
        raise UsageError(f"--parts {args.parts}: unknown part {unknown[0]!r}; parts: {', '.join(bench.PARTS)}")
    cfg = config_lib.resolve(args.recipe, args.overrides)
    results = bench.run(cfg, parts, args.vocab, args.warmup, args.steps,
                        report=(lambda text: print(text, file=sys.stderr)) if args.json == "-" else print)
    if args.json:
        text = json.dumps(results, indent=1)
        print(text) if args.json == "-" else Path(args.json).write_text(text + "\n")
    return 0


def _report(args) -> int:
    from vlpt.compare import report
    from vlpt.compare.table import find_runs

    page = report.build(find_runs(args.runs), Path(args.out), n_boot=args.bootstrap)
    print(f"wrote {Path(args.out) / 'report.md'} and {page}")
    return 0


def _caption(args) -> int:
    import torch
    from PIL import Image

    from vlpt.inference import load

    from vlpt.errors import DataError

    model = load(args.checkpoint)
    if not model.has_decoder:
        raise UsageError(f"{args.checkpoint} has no caption decoder; caption with a run of cap, cappa or coca")
    images = []
    for path in args.images:
        try:
            images.append(Image.open(path))
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read image {path}: {err}") from None
    length = {} if args.max_tokens is None else {"max_tokens": args.max_tokens}  # default: what the context allows
    captions = model.generate(images, method=args.method, beam_width=args.beam_width, **length,
                              length_penalty=args.length_penalty, top_p=args.top_p, temperature=args.temperature,
                              generator=torch.Generator().manual_seed(args.seed))
    for path, text in zip(args.images, captions):
        print(f"{path}\t{text}")
    return 0


DEMO_HELP = """CLIP on vlpt's built-in scenes (generated, nothing downloaded), sized to finish in a few minutes on
2 CPU cores; prints zero-shot accuracy and retrieval R@1/5/10 on held-out scenes. The run folder is replaced
on every call."""

DEMO_EXAMPLES = """examples:
  vlpt demo                                                 # runs/demo, ~6 minutes on 2 cores
  vlpt demo --out /tmp/demo train.steps=50                  # a shorter look"""


def _demo(args) -> int:
    """CLIP on the built-in scenes, sized to finish in a few minutes on 2 CPU cores."""
    from vlpt import config as config_lib
    from vlpt.train import loop
    from vlpt.train.signals import Interrupted

    out = Path(args.out)
    if (out / "checkpoints").exists():
        import shutil

        shutil.rmtree(out)  # the demo always starts fresh
    cfg = config_lib.resolve("clip", args.overrides)
    print(f"vlpt demo: CLIP, model={cfg.model.preset}, {cfg.train.steps} steps of {cfg.train.batch_size} "
          f"on built-in scenes -> {out}", file=sys.stderr)
    try:
        loop.train(cfg, out, progress=True, report=print)
    except Interrupted as stop:
        print(f"vlpt: {stop}", file=sys.stderr)
        return stop.exit_code
    print("chance: zero-shot colour 12.5%, shape 20%, colour+shape 2.5%; retrieval R@1 0.2% (500 images, 1,000 captions)")
    return 0


def _plot(args) -> int:
    from vlpt.plot import plot_run

    out = plot_run(args.run, args.out)
    print(f"wrote {out}")
    return 0


def _data(args) -> int:
    if args.data_cmd == "pack":
        from vlpt.data.webdataset_io import pack

        shards = pack(args.spec, args.out, maxcount=args.maxcount, size=args.size)
        print(f"wrote {len(shards)} shard(s): {shards[0]} ... {shards[-1]}" if shards else "wrote nothing")
    elif args.data_cmd == "info":
        from vlpt import config as config_lib
        from vlpt.data.check import check_data, format_report

        cfg = config_lib.resolve(args.recipe, args.overrides)  # the thresholds and tokenizer training would use
        report = check_data(args.spec, cfg, full=args.check, progress=args.check and sys.stderr.isatty())
        for line in format_report(report, show=args.show, full=args.check):
            print(line)
        if report.error is not None:
            print(f"error: {report.error}", file=sys.stderr)
            return 1
        data, batch = report.data, cfg.train.batch_size
        if data is not None and not report.weighted and len(data) < batch:
            print(f"note: {len(data)} captions are fewer than train.batch_size={batch} of recipe {cfg.recipe}; "
                  f"train with a smaller train.batch_size")
        limit = f"data.max_bad_fraction={cfg.data.max_bad_fraction}"
        print(f"ok: training would accept this data ({limit})" if args.check else
              f"ok so far ({limit}); `--check` decodes every image and tokenizes the captions")
    return 0


def _recipes(args) -> int:
    import textwrap

    from vlpt.config import RECIPES_DIR, available_recipes

    names = available_recipes()
    width = max(map(len, names))
    for name in names:
        print(textwrap.fill(recipe_description(RECIPES_DIR / f"{name}.yaml"), 100, initial_indent=f"{name:<{width}}  ",
                            subsequent_indent=" " * (width + 2)))
    return 0


def recipe_description(path: Path) -> str:
    """The first paragraph of a recipe file's leading comment, as one line."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or (lines and not line.strip("# ")):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(x for x in lines if x)


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
    from vlpt.train.summary import metric_lines

    width = max((len(k) for k in results), default=10)
    return "\n".join(([title, "-" * (width + 12)] if title else []) + metric_lines(results))


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error style: one line naming the command, the problem and where help is."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # key=value, e.g. train.steps=30 or data=my.csv


def parser() -> Parser:
    p = Parser(prog="vlpt", description="Vision-language pre-training: every objective as a recipe.",
               epilog="`vlpt COMMAND --help` shows each command's examples. A mistake prints one line `error: ...`; "
                      "--debug (or VLPT_DEBUG=1) shows the traceback instead.")
    p.add_argument("--version", action="version", version=f"vlpt {_version()}")
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    def command(name: str, help: str, description: str | None = None, epilog: str | None = None):
        return sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".",
                              epilog=epilog, formatter_class=fmt, parents=[common])

    t = command("train", "pre-train a recipe", epilog=TRAIN_EXAMPLES)
    t.add_argument("recipe", help="recipe name (see `vlpt recipes`) or path to a recipe YAML")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, before or after the options, e.g. train.steps=100")
    t.add_argument("--out", help="run folder (default runs/RECIPE)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(fn=_train)

    e = command("eval", "evaluate a run or checkpoint", epilog=EVAL_EXAMPLES)
    e.add_argument("checkpoint", help="run folder, checkpoint folder or model.safetensors")
    e.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"only {' and '.join(EVAL_KEYS)}, e.g. data.max_bad_fraction=0.05")
    e.add_argument("--task", action="append", help="evaluation task (repeatable); default: the recipe's suite")
    e.add_argument("--templates", help="prompt templates: imagenet80 (default) or simple")
    e.add_argument("--json", action="store_true", help="print exactly one JSON object of metrics on stdout")
    e.add_argument("--captions-out", metavar="JSON", help="write the generated captions of captioning tasks here")
    e.add_argument("--ema", action="store_true", help="evaluate the run's average of weights (train.ema) instead")
    e.set_defaults(fn=_eval)

    cm = command("compare", "train several recipes at one budget and report them side by side",
                 epilog=COMPARE_EXAMPLES)
    cm.add_argument("overrides", nargs="+", metavar="RECIPE|key=value",
                    help="recipes (names or YAML paths), then config overrides for all of them, e.g. model=micro")
    cm.add_argument("--budget", type=int, metavar="SAMPLES", help="samples seen by every recipe (train.samples)")
    cm.add_argument("--flops", type=float, metavar="F", help="or: training FLOPs of every recipe, e.g. 5e12 "
                    "(each recipe's samples from its FLOPs per sample, counted once)")
    cm.add_argument("--with-blind", action="store_true", help="also train each captioner's blind twin (no image "
                    "input): a control column of its order/swaps/sugarcrepe results")
    cm.add_argument("--budgets", metavar="M1,M2,...", help="a scaling study: multiples of --budget, e.g. 1,2,4")
    cm.add_argument("--seeds", type=int, default=3, help="seeds per recipe (default 3): train.seed, +1, ...")
    cm.add_argument("--points", type=int, default=4,
                    help="evaluations during training, evenly spaced (default 4; eval.every_steps=N overrides)")
    cm.add_argument("--bootstrap", type=int, default=200, help="bootstrap fits for scaling intervals (default 200)")
    cm.add_argument("--out", required=True, help="the compare folder: OUT/runs/*, OUT/report.md, OUT/report.html")
    cm.add_argument("--quiet", action="store_true", help="no progress bars")
    cm.set_defaults(fn=_compare)

    rp = command("report", "rebuild a comparison report from finished runs", epilog=REPORT_EXAMPLES)
    rp.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or compare folders (their runs/*)")
    rp.add_argument("--out", required=True, help="report folder: report.md, report.html, plots/, summary.json")
    rp.add_argument("--bootstrap", type=int, default=200, help="bootstrap fits for scaling intervals (default 200)")
    rp.set_defaults(fn=_report)

    b = command("bench", "measure a recipe's training and evaluation speed here", epilog=BENCH_EXAMPLES)
    b.add_argument("recipe", help="recipe name or YAML path")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model=tiny-clip "
                   "train.batch_size=64 train.precision=bf16 train.compile=true")
    b.add_argument("--parts", help=f"comma-separated, of {', '.join(('step', 'data', 'loop', 'eval'))} (default all)")
    b.add_argument("--vocab", type=int, help="vocabulary size (default: what the recipe's data gives its tokenizer)")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    b.add_argument("--steps", type=int, default=15, help="timed steps; the median is reported (default 15)")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON (- : stdout, tables to stderr)")
    b.set_defaults(fn=_bench)

    c = command("caption", "print captions for images (Cap, CapPa, CoCa runs)", epilog=CAPTION_EXAMPLES)
    c.add_argument("checkpoint", help="run folder, checkpoint folder or model.safetensors")
    c.add_argument("images", nargs="+", help="image files")
    c.add_argument("--method", choices=("beam", "greedy", "nucleus"), default="beam")
    c.add_argument("--beam-width", type=int, default=6)
    c.add_argument("--max-tokens", type=int, help="at most this many tokens before <eot> (default: 30, or what the "
                                                  "model's context allows)")
    c.add_argument("--length-penalty", type=float, default=0.0, help="beam score = log p / length**penalty")
    c.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    c.add_argument("--temperature", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=0, help="nucleus sampling seed")
    c.set_defaults(fn=_caption)

    d = command("demo", "CLIP on built-in scenes in a few minutes, with results", DEMO_HELP, DEMO_EXAMPLES)
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=50")
    d.add_argument("--out", default="runs/demo", help="run folder (default runs/demo; replaced)")
    d.set_defaults(fn=_demo)

    pl = command("plot", "draw a run's training curves as a PNG",
                 "Loss, learning rate, samples/s and evaluation metrics against the step, from RUN/metrics.jsonl "
                 "(training draws RUN/curves.png at its end).",
                 "examples:\n"
                 "  vlpt plot runs/demo                          # writes runs/demo/curves.png\n"
                 "  vlpt plot runs/clip --out clip-curves.png    # also while the run still trains")
    pl.add_argument("run", metavar="RUN", help="run folder (or its metrics.jsonl)")
    pl.add_argument("--out", metavar="FILE", help="PNG to write (default RUN/curves.png)")
    pl.set_defaults(fn=_plot)

    da = command("data", "inspect data sources, write WebDataset shards", epilog=DATA_HELP)
    dsub = da.add_subparsers(dest="data_cmd", required=True, parser_class=Parser)
    info = dsub.add_parser("info", help="count images and captions of a data spec; --check: would training take it",
                           description="Count the images and captions of a data spec, the image files missing and the "
                                       "rows skipped; with --check, decode and tokenize everything as training would.",
                           epilog=INFO_HELP + "\n\n" + DATA_HELP, formatter_class=fmt, parents=[common])
    info.add_argument("spec")
    info.add_argument("overrides", nargs="*", metavar="key=value",
                      help="training config keys the check applies, e.g. "
                           "data.max_bad_fraction=0.05 model=micro")
    info.add_argument("--check", action="store_true",
                      help="decode every image; list unreadable images, captions cut to the context, duplicate pairs")
    info.add_argument("--recipe", default="clip", help="the recipe whose config the check applies (default clip)")
    info.add_argument("--show", type=int, default=5, help="print the first N captions")
    pk = dsub.add_parser("pack", help="write any source as WebDataset shards",
                         description="Write any data source as WebDataset shards (tar files of image + caption).",
                         epilog=DATA_PACK_EXAMPLES + "\n\n" + DATA_HELP, formatter_class=fmt, parents=[common])
    pk.add_argument("spec")
    pk.add_argument("out", help="shard name pattern with a %%d field, e.g. shards/train-%%06d.tar")
    pk.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    pk.add_argument("--size", type=int, help="re-encode larger images with their shorter side at this size "
                                             "(default: keep the files)")
    da.set_defaults(fn=_data)

    x = command("export", "write a run as another format's model folder", epilog=EXPORT_HELP)
    x.add_argument("run", help="run folder, checkpoint folder or model.safetensors")
    x.add_argument("out", help="output folder")
    x.add_argument("--format", choices=["hf"], default="hf", help="hf: a transformers CLIPModel folder")
    x.set_defaults(fn=_export)

    im = command("import-weights", "make a vlpt run folder from HF or open_clip weights", epilog=IMPORT_HELP)
    im.add_argument("src", help="hf: a CLIPModel folder; open_clip: a state dict file (.safetensors, .pt, .bin)")
    im.add_argument("out", help="the new run folder")
    im.add_argument("--from", dest="source", choices=["hf", "open_clip"], required=True)
    im.add_argument("--tokenizer", help="the weights' tokenizer.json (hf: default SRC/tokenizer.json)")
    im.add_argument("--config", help="open_clip: the model config JSON (head counts, activation check)")
    im.add_argument("--vision-heads", type=int, help="open_clip without --config: image tower heads (default width/64)")
    im.add_argument("--text-heads", type=int, help="open_clip without --config: text tower heads (default width/64)")
    im.set_defaults(fn=_import_weights)

    r = command("recipes", "list the recipes", "List the installed recipes with their descriptions.",
                "example:\n  vlpt recipes")
    r.set_defaults(fn=_recipes)
    return p


def _version() -> str:
    from vlpt import __version__

    return __version__


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Options and key=value overrides in any order: argparse stops collecting a positional list at the first
    option, so overrides that follow an option arrive as extras and join the list here."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all(OVERRIDE.match(x) for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    debug = args.debug or os.environ.get("VLPT_DEBUG", "") not in ("", "0")
    try:
        return args.fn(args)
    except VlptError as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # the machine, not vlpt: a read-only or full disk, a file that vanished
        if debug:
            raise
        where = f" {err.filename}" if err.filename else ""
        print(f"error: cannot read or write{where}: {err.strerror or err} (--debug shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vlpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
