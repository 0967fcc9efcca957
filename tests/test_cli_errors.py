"""Every user mistake ends in one line `error: ...` with the right exit status, no traceback, and nothing
written before it is changed (a table of bad inputs, each run through the real command line in-process)."""
import errno
import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlpt
from vlpt.cli import main as cli_main
from vlpt.train import checkpoint

MICRO = ["model=micro", "train.batch_size=4", "train.steps=2", "train.warmup_steps=0", "eval.tasks=[]",
         "train.threads=1"]


def picture(path: Path, k: int) -> str:
    rgb = np.random.default_rng(k).integers(0, 255, (12, 12, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path.name


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: caption tables good and bad, a trained CLIP run and a trained Cap run (micro)."""
    root = tmp_path_factory.mktemp("ws")
    names = [picture(root / f"{k}.png", k) for k in range(8)]
    (root / "good.csv").write_text("image,caption\n" + "".join(f"{n},a picture number {k}\n" for k, n in enumerate(names)))
    (root / "noheader.csv").write_text("".join(f"{n},a picture number {k}\n" for k, n in enumerate(names)))
    (root / "empty.csv").write_text("")
    (root / "missing.csv").write_text("image,caption\n" + "".join(f"gone{k}.png,a caption {k}\n" for k in range(8)))
    (root / "broken.yaml").write_text("objectives:\n  contrastive: {weight: 1\n")
    (root / "noclasses").mkdir()
    (root / "noann.json").write_text(json.dumps({"images": [{"id": 1, "file_name": names[0]}]}))
    (root / "notrun").mkdir()
    (root / "a.txt").write_text("not an image\n")
    for recipe, run in (("clip", "clip-run"), ("cap", "cap-run")):
        assert cli_main(["train", recipe, *MICRO, f"data=csv:{root / 'good.csv'}", "--out", str(root / run),
                         "--quiet"]) == 0
    newer = root / "newer-run"  # the CLIP run as a future vlpt would write it
    shutil.copytree(root / "clip-run", newer)
    rewrite_metadata(checkpoint.find(newer) / "model.safetensors", format="99")
    damaged = root / "damaged-run"
    shutil.copytree(root / "clip-run", damaged)
    weights = checkpoint.find(root / "clip-run").relative_to(root / "clip-run") / "model.safetensors"
    (damaged / weights).write_bytes((damaged / weights).read_bytes()[:-100])
    return root


def rewrite_metadata(path: Path, **changes: str) -> None:
    """Edit a safetensors file's metadata in place (8-byte header length, JSON header, tensor bytes)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(changes)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
    manifest = path.parent / checkpoint.MANIFEST  # keep the checkpoint whole: only its format differs
    listed = json.loads(manifest.read_text())
    listed["files"][path.name] = {"bytes": path.stat().st_size, "sha256": checkpoint.sha256(path)}
    manifest.write_text(json.dumps(listed))


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = cli_main(argv)
    except SystemExit as stop:  # argparse's own exits
        code = stop.code
    return code, capsys.readouterr().err


# (id, argv with {ws} for the workspace, exit status, text the error line must hold)
CASES = [
    # the command line and the config: exit 2
    ("option-before-override-typo", ["train", "clip", "--out", "{ws}/r", "--bogus"], 2, "unrecognized arguments: --bogus"),
    ("not-key-value", ["train", "clip", "steps", "--out", "{ws}/r"], 2, "override 'steps' is not of the form key=value"),
    ("unknown-recipe", ["train", "clpi", "--out", "{ws}/r"], 2, "did you mean 'clip'"),
    ("recipe-file-missing", ["train", "{ws}/nothere.yaml", "--out", "{ws}/r"], 2, "nothere.yaml does not exist"),
    ("broken-yaml", ["train", "{ws}/broken.yaml", "--out", "{ws}/r"], 2, "broken.yaml:3: not valid YAML"),
    ("unknown-key", ["train", "clip", *MICRO, "train.stepz=3", "--out", "{ws}/r"], 2, "did you mean 'train.steps'"),
    ("wrong-type", ["train", "clip", *MICRO, "train.lr=fast", "--out", "{ws}/r"], 2, "'train.lr' must be a number"),
    ("negative-lr", ["train", "clip", *MICRO, "train.lr=-0.001", "--out", "{ws}/r"], 2, "train.lr=-0.001 must be positive"),
    ("zero-lr", ["train", "clip", *MICRO, "train.lr=0", "--out", "{ws}/r"], 2, "train.lr=0.0 must be positive"),
    ("zero-batch", ["train", "clip", *MICRO, "train.batch_size=0", "--out", "{ws}/r"], 2, "train.batch_size=0 must be at least 1"),
    ("zero-steps", ["train", "clip", *MICRO, "train.steps=0", "--out", "{ws}/r"], 2, "train.steps=0 must be positive"),
    ("negative-epochs", ["train", "clip", "model=micro", "train.epochs=-1", "--out", "{ws}/r"], 2, "train.epochs=-1.0 must be positive"),
    ("unknown-objective", ["train", "clip", *MICRO, "objectives.foo=true", "--out", "{ws}/r"], 2, "unknown objective 'objectives.foo'"),
    ("objective-not-mapping", ["train", "clip", *MICRO, "objectives.contrastive=3", "--out", "{ws}/r"], 2,
     "objectives.contrastive=3: give its options as a mapping"),
    ("unknown-preset", ["train", "clip", "model=mikro", "--out", "{ws}/r"], 2, "did you mean 'micro'"),
    ("batch-over-data", ["train", "clip", *MICRO, "data=csv:{ws}/good.csv", "train.batch_size=64", "--out", "{ws}/r"], 2,
     "train.batch_size=64 is larger than the data (8 captions"),
    ("eval-task-typo", ["train", "clip", *MICRO, "eval.tasks=[retrival:scenes:test]", "--out", "{ws}/r"], 2,
     "did you mean 'retrieval'"),
    ("eval-data-missing", ["train", "clip", *MICRO, "eval.tasks=[retrieval:csv:{ws}/nope.csv]", "--out", "{ws}/r"], 2,
     "cannot open its data"),
    ("init-missing", ["train", "clip", *MICRO, "model.init.vision={ws}/nowhere", "--out", "{ws}/r"], 2,
     "cannot read weights from"),
    ("resume-other-recipe", ["train", "siglip", "--out", "{ws}/clip-run", "--resume"], 2,
     "is a run of recipe 'clip', not 'siglip'"),
    ("overwrite-run", ["train", "clip", *MICRO, "--out", "{ws}/clip-run"], 2, "already holds a run; continue it with --resume"),
    ("eval-task-kind", ["eval", "{ws}/clip-run", "--task", "retrival:scenes:test"], 2, "did you mean 'retrieval'"),
    ("eval-task-ability", ["eval", "{ws}/clip-run", "--task", "captioning:scenes:test"], 2, "needs a caption decoder"),
    ("eval-training-key", ["eval", "{ws}/clip-run", "train.lr=3"], 2, "vlpt eval takes only data.max_bad_fraction"),
    ("eval-no-labels", ["eval", "{ws}/clip-run", "--task", "zeroshot:csv:{ws}/good.csv"], 2, "has no class labels"),
    ("caption-no-decoder", ["caption", "{ws}/clip-run", "{ws}/0.png"], 2, "has no caption decoder"),
    ("caption-too-long", ["caption", "{ws}/cap-run", "{ws}/0.png", "--max-tokens", "99"], 2, "max_tokens=99 must be in 1..22"),
    # data: exit 1
    ("data-nowhere", ["train", "clip", *MICRO, "data={ws}/nowhere.csv", "--out", "{ws}/r"], 1, "nowhere.csv"),
    ("csv-no-header", ["train", "clip", *MICRO, "data=csv:{ws}/noheader.csv", "--out", "{ws}/r"], 1, "header"),
    ("csv-empty", ["train", "clip", *MICRO, "data=csv:{ws}/empty.csv", "--out", "{ws}/r"], 1, "empty.csv"),
    ("images-missing", ["train", "clip", *MICRO, "data=csv:{ws}/missing.csv", "--out", "{ws}/r"], 1, "data.max_bad_fraction"),
    ("folder-no-classes", ["train", "clip", *MICRO, "data=folder:{ws}/noclasses", "--out", "{ws}/r"], 1, "noclasses"),
    ("coco-no-annotations", ["train", "clip", *MICRO, "data=coco:{ws}/noann.json:{ws}", "--out", "{ws}/r"], 1, "annotations"),
    ("eval-data-missing-images", ["eval", "{ws}/clip-run", "--task", "retrieval:csv:{ws}/missing.csv"], 1,
     "data.max_bad_fraction"),
    ("caption-not-an-image", ["caption", "{ws}/cap-run", "{ws}/a.txt"], 1, "cannot read image"),
    # run folders and checkpoints: exit 1
    ("eval-no-such-path", ["eval", "{ws}/nothere"], 1, "nothere does not exist"),
    ("eval-not-a-run", ["eval", "{ws}/notrun"], 1, "notrun is not a vlpt run"),
    ("eval-damaged", ["eval", "{ws}/damaged-run/checkpoints/step-00000002"], 1, "is damaged"),
    ("eval-newer-format", ["eval", "{ws}/newer-run"], 1, "written by a newer vlpt (checkpoint format 99"),
    ("caption-no-such-run", ["caption", "{ws}/nothere", "{ws}/0.png"], 1, "nothere does not exist"),
]


@pytest.mark.parametrize("argv, status, text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(ws, capsys, argv, status, text):
    before = snapshot(ws)
    code, err = run_cli([a.replace("{ws}", str(ws)) for a in argv], capsys)
    lines = err.strip().splitlines()
    assert code == status, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("error: ") and sum(x.startswith("error:") for x in lines) == 1, err
    assert text in lines[-1], err
    assert snapshot(ws) == before  # no file written, none changed: not even a run folder for the failed run
    assert not (ws / "r").exists()


def test_there_are_at_least_30_bad_inputs():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


def test_debug_shows_the_traceback(ws, capsys, monkeypatch):
    with pytest.raises(vlpt.CheckpointError):
        cli_main(["eval", str(ws / "notrun"), "--debug"])
    monkeypatch.setenv("VLPT_DEBUG", "1")
    with pytest.raises(vlpt.UsageError):
        cli_main(["train", "clip", "train.lr=0"])


def test_the_api_raises_typed_errors_with_the_same_message(ws, capsys):
    with pytest.raises(vlpt.CheckpointError, match="notrun is not a vlpt run") as err:
        vlpt.load(ws / "notrun")
    code, cli_err = run_cli(["eval", str(ws / "notrun")], capsys)
    assert cli_err == f"error: {err.value}\n" and code == err.value.exit_code == 1
    with pytest.raises(vlpt.UsageError, match="cannot give captions"):
        vlpt.load(ws / "clip-run").generate([str(ws / "0.png")])


def test_read_only_out_is_one_line(ws, capsys, monkeypatch, tmp_path):
    """A folder the process may not write (simulated: the tests may run as root, which ignores modes)."""
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, err = run_cli(["train", "clip", *MICRO, f"data=csv:{ws / 'good.csv'}", "--out", str(tmp_path / "ro" / "run")],
                        capsys)
    assert code == 1 and err.strip().splitlines()[-1] == f"error: cannot read or write {tmp_path / 'ro' / 'run'}: " \
                                                         "Permission denied (--debug shows the traceback)", err
    assert "Traceback" not in err


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(ws, capsys, monkeypatch, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ws / "clip-run", run)
    kept = snapshot(run / "checkpoints")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(a[1]))

    monkeypatch.setattr(checkpoint, "save_file", full)
    code, err = run_cli(["train", "clip", "train.steps=3", "--out", str(run), "--resume"], capsys)
    assert code == 1 and "No space left on device" in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert snapshot(run / "checkpoints") == kept  # the step-2 checkpoint is whole; no half-written step 3
    monkeypatch.undo()
    assert cli_main(["train", "clip", "train.steps=3", "--out", str(run), "--resume", "--quiet"]) == 0  # space again
    assert checkpoint.find(run).name == "step-00000003"


def test_overrides_after_options_and_version(ws, capsys):
    out = ws.parent / "after"
    assert cli_main(["train", "clip", "--out", str(out), "--quiet", *MICRO, f"data=csv:{ws / 'good.csv'}"]) == 0
    assert checkpoint.find(out).name == "step-00000002"
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli_main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"vlpt {vlpt.__version__}"
