"""Crash safety and bad input: damaged checkpoints, kill -9, SIGTERM/SIGINT, torchrun restarts, non-finite
steps, unusable images/captions/shards, bad configs. Micro model on tiny generated data in tmp_path."""
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlpt import config
from vlpt.cli import main as cli_main
from vlpt.data.dataset import to_rgb, to_uint8
from vlpt.data.sources import load_captions_table, load_coco
from vlpt.data.tokenizer import TextTokenizer
from vlpt.data.webdataset_io import write_shards
from vlpt.train import checkpoint, loop
from vlpt.train.data import decode_training_data, open_training_data, tokenize
from vlpt.train.guards import TrainingStopped
from vlpt.train.resume import resume_checkpoint
from vlpt.train.pretrainer import Pretrainer

COLOURS = ["red", "green", "blue", "yellow"]
RGB = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
STEPS = 16


def picture(path: Path, k: int, size=(12, 12)) -> str:
    noise = np.random.default_rng(k).integers(0, 40, (size[1], size[0], 3))
    Image.fromarray((np.array(RGB[k % 4]) + noise).astype(np.uint8)).save(path)
    return path.name


def table(folder: Path, n: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,caption"] + [f"{picture(folder / f'{k}.png', k)},a {COLOURS[k % 4]} picture number {k}" for k in range(n)]
    (folder / "t.csv").write_text("\n".join(rows) + "\n")
    return folder / "t.csv"


def args(csv: Path, *extra: str) -> list[str]:
    return ["model=micro", f"data=csv:{csv}", "train.batch_size=8", f"train.steps={STEPS}", "train.warmup_steps=2",
            "train.log_every=1", "eval.tasks=[]", "train.deterministic=true", "train.seed=5",
            "train.threads=1", *extra]  # one thread: the tests share 2 cores with others


def rows(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def final_params(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return table(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight")
    loop.train(config.resolve("clip", args(data)), run, progress=False)
    return run


def steps_of(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoint.all_checkpoints(run / "checkpoints")]


def logged_step(run: Path) -> int:
    """The last step in metrics.jsonl while the run writes it (a torn last line is skipped)."""
    last = 0
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                last = max(last, json.loads(line)["step"])
            except ValueError:
                pass
    return last


def wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    """Polls the run folder (no timed assertions: the deadline only keeps a broken run from hanging)."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after 300 s"
        time.sleep(0.005)


def start_run(run: Path, csv: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vlpt", "train", "clip", *args(csv, *extra), "--out", str(run), "--quiet"]
    with open(f"{run}.log", "w") as log:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def resume_and_compare(run: Path, straight: Path) -> None:
    assert cli_main(["train", "clip", "--out", str(run), "--resume", "--quiet"]) == 0
    assert_same(final_params(run), final_params(straight))
    assert not list((run / "checkpoints").glob(".tmp-*"))
    # metrics rows after the checkpoint were dropped and written again: each step once, same losses
    assert [(r["step"], r["loss"]) for r in rows(run, "train")] == [(r["step"], r["loss"]) for r in rows(straight, "train")]


# ------------------------------------------------------------------------------------------- checkpoints
def test_damaged_checkpoint_is_detected_and_the_previous_one_used(data, tmp_path, capsys):
    cfg = config.resolve("clip", args(data, "train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep=3"))
    run = tmp_path / "run"
    loop.train(cfg, run, progress=False)
    ck2, ck4 = checkpoint.all_checkpoints(run / "checkpoints")
    assert json.loads((ck4 / "manifest.json").read_text())["files"]["state.pt"]["sha256"] == checkpoint.sha256(ck4 / "state.pt")
    before = {k: v.clone() for k, v in load_file(str(ck4 / "model.safetensors")).items()}  # not the mmap
    weights = ck4 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # a truncated copy
    capsys.readouterr()
    assert checkpoint.latest(run / "checkpoints") == ck2
    assert f"checkpoint {ck4} is damaged (model.safetensors has" in capsys.readouterr().err
    assert checkpoint.find(run) == ck2
    with pytest.raises(checkpoint.CorruptCheckpointError, match="step-00000004 is damaged"):
        checkpoint.find(ck4)
    (run / "checkpoints" / ".tmp-step-00000003").mkdir()  # a save that a crash interrupted
    loop.train(cfg, run, resume=True, progress=False)  # continues from step 2 and redoes step 4
    assert_same(load_file(str(ck4 / "model.safetensors")), before)
    assert [r["step"] for r in rows(run, "train")] == [1, 2, 3, 4]  # rows 3 and 4 were dropped and written again
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert checkpoint.problem(run / "checkpoints" / "damaged-step-00000004")  # set aside, not pruned as a newer one
    # a changed byte keeps the size but not the checksum; inference only needs the weights to be whole
    state = bytearray((ck4 / "state.pt").read_bytes())
    state[len(state) // 2] ^= 0xFF
    (ck4 / "state.pt").write_bytes(bytes(state))
    assert checkpoint.problem(ck4) == "state.pt does not match its sha256 checksum"
    assert checkpoint.latest(run / "checkpoints") == ck2
    assert checkpoint.latest(run / "checkpoints", ("model.safetensors",)) == ck4


# ------------------------------------------------------------------------------------- kill -9 / signals
def test_kill_9_at_a_random_step_then_resume_is_bit_equal(data, straight, tmp_path):
    target = random.randint(4, 8)
    run = tmp_path / "killed"
    proc = start_run(run, data, "checkpoint.every_steps=3")
    wait_for(proc, lambda: logged_step(run) >= target, f"step {target}")
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert 3 <= max(steps_of(run)) < STEPS, f"killed too late (target {target})"
    resume_and_compare(run, straight)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_current_step_and_exits_then_resume_is_bit_equal(data, straight, tmp_path, sig, code):
    target = random.randint(2, 6)
    run = tmp_path / "stopped"
    proc = start_run(run, data, "checkpoint.every_steps=5")
    wait_for(proc, lambda: logged_step(run) >= target, f"step {target}")
    proc.send_signal(sig)
    proc.wait(timeout=300)
    err = Path(f"{run}.log").read_text()
    assert proc.returncode == code, err
    last = rows(run, "train")[-1]["step"]
    assert last < STEPS and steps_of(run)[-1] == last, (target, steps_of(run), err)  # saved at the step it stopped
    assert f"stopped by {sig.name} after step {last}" in err and "--resume" in err
    resume_and_compare(run, straight)


def test_demo_stopped_by_sigterm_ends_in_one_line(data, tmp_path):
    run = tmp_path / "demo"
    cmd = [sys.executable, "-m", "vlpt", "demo", "--out", str(run), *args(data, "train.steps=500")]
    with open(f"{run}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    wait_for(proc, lambda: logged_step(run) >= 2, "step 2")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    out = Path(f"{run}.log").read_text()
    assert proc.returncode == 143 and "Traceback" not in out, out
    assert "stopped by SIGTERM" in out and checkpoint.find(run)


def test_fp16_resume_restores_the_grad_scaler(data, tmp_path):
    cfg = config.resolve("clip", args(data, "train.precision=fp16", "train.steps=6", "checkpoint.every_steps=3"))
    loop.train(cfg, tmp_path / "straight", progress=False)
    loop.train(cfg, tmp_path / "broken", progress=False, stop_at=4)
    loop.train(cfg, tmp_path / "broken", progress=False, resume=True)
    a, b = (checkpoint.load_state(tmp_path / r / "checkpoints" / "step-00000006") for r in ("straight", "broken"))
    assert a["scaler"]["_growth_tracker"] == 6 and a["scaler"] == b["scaler"]  # steps since the last overflow
    assert_same(*(load_file(str(tmp_path / r / "checkpoints" / "step-00000006" / "model.safetensors"))
                  for r in ("straight", "broken")))


# --------------------------------------------------------------------------------------- elastic restart
def test_resume_decision(tmp_path, monkeypatch, capsys):
    ckpts = tmp_path / "run" / "checkpoints"
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert resume_checkpoint(ckpts, resume=False) is None  # a new run
    assert resume_checkpoint(ckpts, resume=True) is None  # --resume with nothing to resume: fresh start
    assert "no usable checkpoint" in capsys.readouterr().err
    saved = checkpoint.save(ckpts, 3, {"w": torch.zeros(2)}, {}, {"step": 3}, keep=2)
    with pytest.raises(config.ConfigError, match="already holds a run; continue it with --resume"):
        resume_checkpoint(ckpts, resume=False)
    assert resume_checkpoint(ckpts, resume=True) == saved
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's first attempt
    with pytest.raises(config.ConfigError):
        resume_checkpoint(ckpts, resume=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")  # a restart after a failure resumes by itself
    assert resume_checkpoint(ckpts, resume=False) == saved
    assert f"torchrun restart 2: resuming from {saved}" in capsys.readouterr().err


def test_cli_resume_on_an_empty_folder_starts_fresh_and_torchrun_restarts_resume(data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    run = tmp_path / "run"
    assert cli_main(["train", "clip", *args(data, "train.steps=2"), "--out", str(run), "--resume", "--quiet"]) == 0
    assert "starting from step 0" in capsys.readouterr().err and steps_of(run) == [2]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert cli_main(["train", "clip", "train.steps=3", "--out", str(run), "--quiet"]) == 0  # the saved config + steps=3
    assert "torchrun restart 1: resuming from" in capsys.readouterr().err and steps_of(run) == [2, 3]


# ------------------------------------------------------------------------------------------- non-finite
def poison(monkeypatch, bad_calls) -> None:
    """The total loss of the listed forward calls (= steps, from 0) becomes NaN."""
    forward, calls = Pretrainer.forward, iter(range(10**6))

    def nan_forward(self, batch):
        loss, metrics = forward(self, batch)
        return (loss * float("nan") if next(calls) in bad_calls else loss), metrics

    monkeypatch.setattr(Pretrainer, "forward", nan_forward)


def test_nonfinite_streak_stops_with_the_checkpoint_from_before_it(data, tmp_path, monkeypatch):
    poison(monkeypatch, range(5, 100))  # steps 6, 7, 8, ... are non-finite
    cfg = config.resolve("clip", args(data, "train.steps=12", "checkpoint.every_steps=2", "checkpoint.keep=5",
                                      "train.max_nonfinite_steps=3"))
    with pytest.raises(TrainingStopped, match=r"3 non-finite losses or gradients in a row \(steps 6 to 8; "
                                                   r"train.max_nonfinite_steps=3\).*from before step 6: .*step-00000004"):
        loop.train(cfg, tmp_path, progress=False)
    assert steps_of(tmp_path) == [2, 4]  # nothing saved at step 6, inside the streak
    assert [(r["step"], r["nonfinite_steps"]) for r in rows(tmp_path, "train") if "loss" not in r] == [(6, 1), (7, 2), (8, 3)]


def test_nonfinite_steps_are_skipped_and_counted(data, tmp_path, monkeypatch):
    poison(monkeypatch, {3, 4})  # steps 4 and 5
    cfg = config.resolve("clip", args(data, "train.steps=8", "checkpoint.every_steps=2", "checkpoint.keep=5",
                                      "train.max_nonfinite_steps=3"))
    loop.train(cfg, tmp_path / "run", progress=False)
    assert steps_of(tmp_path / "run") == [2, 6, 8]  # step 4 fell in the streak
    train = rows(tmp_path / "run", "train")
    assert [r["step"] for r in train if "loss" in r] == [1, 2, 3, 6, 7, 8]
    assert train[-1]["nonfinite_steps"] == 2
    state = checkpoint.load_state(checkpoint.latest(tmp_path / "run" / "checkpoints"))
    assert state["counters"][0]["nonfinite_steps"] == 2


# ------------------------------------------------------------------------------------------ bad input
def test_image_modes_become_rgb():
    def rgb(img):
        return np.asarray(to_rgb(img)).reshape(-1, 3).tolist()

    assert rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))) == [[255, 0, 0]]
    sixteen = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert sixteen.mode == "I;16" and rgb(sixteen) == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]
    assert rgb(Image.fromarray(np.array([[70000 // 2, 65535]], dtype=np.int32))) == [[136] * 3, [255] * 3]  # "I", 16-bit data
    assert rgb(Image.fromarray(np.array([[7, 200]], dtype=np.int32))) == [[7] * 3, [200] * 3]  # "I", 8-bit data
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert rgb(pal) == [[0, 0, 0], [255, 0, 0]]
    pal.info["transparency"] = 0  # index 0 transparent: shows the white page behind it
    assert rgb(pal) == [[255, 255, 255], [255, 0, 0]]
    rgba = Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [255, 0, 0, 128]]], dtype=np.uint8))
    assert rgb(rgba) == [[255, 255, 255], [0, 0, 255], [255, 127, 127]]
    assert rgb(Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")) == [[255] * 3, [0] * 3]
    assert rgb(Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")) == [[0] * 3, [255] * 3]
    assert torch.equal(to_uint8(Image.new("RGB", (1, 1), (9, 8, 7)), 32), torch.tensor([9, 8, 7]).view(3, 1, 1).expand(3, 32, 32).to(torch.uint8))
    strip = Image.fromarray(np.linspace(0, 255, 20000).astype(np.uint8).reshape(20000, 1))  # 1 x 20000
    out = to_uint8(strip, 32)
    assert out.shape == (3, 32, 32) and abs(out.float().mean().item() - 127.5) < 2  # the middle of the strip


def test_tokenize_counts_cut_captions():
    captions = ["a b c", " ".join(["word"] * 40), "x y", "q " * 5]
    tok = TextTokenizer.train(captions, 100, 8)
    tokens, cut = tokenize(tok, captions)
    assert torch.equal(tokens, tok(captions))
    lengths = [len(tok.tok.encode(c, add_special_tokens=False).ids) for c in captions]
    assert cut.tolist() == [n > 8 - 2 for n in lengths] and 0 < cut.sum() < len(captions), lengths  # room for <sot>, <eot>


def test_odd_tables_and_annotations(tmp_path):
    (tmp_path / "u16.tsv").write_bytes("image\tcaption\na.png\tun caf\u00e9 \u2028 crème\n".encode("utf-16"))
    s = load_captions_table(tmp_path / "u16.tsv")  # a spreadsheet's "Unicode text"; U+2028 is no row break
    assert s.captions == ["un caf\u00e9 \u2028 crème"] and s.images == [str(tmp_path / "a.png")]
    assert not s.issues["non_utf8_rows"].names
    coco = {"images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"id": 7, "image_id": 1, "caption": "a cat"}, {"id": 8, "image_id": 1, "caption": " "},
                            {"id": 9, "image_id": 1, "caption": None}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    s = load_coco(tmp_path / "c.json")
    assert s.captions == ["a cat"]
    assert s.issues["empty_captions"].names == [f"{tmp_path / 'c.json'} annotation #1 (id 8)",
                                                f"{tmp_path / 'c.json'} annotation #2 (id 9)"]


def odd_table(folder: Path) -> Path:
    """16 good pictures, 9 in unusual modes, 3 unreadable, and one of each bad row."""
    folder.mkdir(parents=True)
    good = table(folder).read_bytes()
    arr = np.asarray(Image.open(folder / "0.png"))
    odd = {"cmyk.jpg": Image.fromarray(arr).convert("CMYK"),
           "i16.png": Image.fromarray((arr[..., 0].astype(np.uint16) * 257)),
           "p.png": Image.fromarray(arr).convert("P"),
           "ptrans.png": Image.fromarray(arr).convert("P"),
           "rgba.png": Image.fromarray(arr).convert("RGBA"),
           "la.png": Image.fromarray(arr).convert("LA"),
           "one.png": Image.fromarray(arr).convert("1"),
           "pixel.png": Image.new("RGB", (1, 1), (200, 30, 30)),
           "strip.png": Image.new("RGB", (1, 900), (30, 200, 30))}
    for name, img in odd.items():
        img.save(folder / name, **({"transparency": 0} if name == "ptrans.png" else {}))
    assert Image.open(folder / "i16.png").mode == "I;16"
    (folder / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (folder / "truncated.png").write_bytes((folder / "1.png").read_bytes()[:120])
    picture(folder / "long.png", 2)
    picture(folder / "latin.png", 3)
    lines = [f"{n},an odd {n.split('.')[0]} picture" for n in odd]
    lines += ["corrupt.jpg,a corrupt picture", "truncated.png,a truncated picture", "missing.png,a missing picture",
              "0.png,", ",a caption without a picture", "long.png," + " ".join(f"word{k}" for k in range(300))]
    body = good + ("\n".join(lines) + "\n").encode() + "latin.png,a caf\u00e9 in latin-1\n".encode("latin-1")
    (folder / "t.csv").write_bytes(body)
    return folder / "t.csv"


@pytest.mark.parametrize("cache", [True, False])
def test_bad_input_is_skipped_and_counted(tmp_path, cache):
    csv = odd_table(tmp_path / "odd")
    s = load_captions_table(csv)
    assert s.captions[-1] == "a caf\ufffd in latin-1"  # decoded with a replacement character, not dropped
    cfg = config.resolve("clip", args(csv, "train.steps=4", "data.max_bad_fraction=0.5", f"data.cache_images={str(cache).lower()}"))
    loop.train(cfg, tmp_path / "run", progress=False)
    assert steps_of(tmp_path / "run") == [4]
    counts = rows(tmp_path / "run", "data")[0]
    assert counts["empty_captions"] == 1 and counts["bad_rows"] == 1 and counts["non_utf8_rows"] == 1
    assert counts["long_captions"] == 1
    if cache:  # decoded once up front: 30 images, 3 unreadable
        assert counts["images"] == 27 and counts["captions"] == 27 and counts["bad_images"] == 3
    else:  # decoded per batch: 4 steps = one epoch of the 30 captions (28 used), bad slots redrawn
        assert counts["images"] == 30 and rows(tmp_path / "run", "data")[-1]["bad_images"] >= 2


def test_weighted_mixture_with_bad_images_trains(data, tmp_path):
    odd = odd_table(tmp_path / "odd")
    cfg = config.resolve("clip", args(data, f"data=csv:{odd}@1 + csv:{data}@3", "train.steps=2", "data.max_bad_fraction=0.5"))
    _, images, weights, bad = decode_training_data(cfg, *open_training_data(cfg), progress=False)
    assert len(bad) == 3 and images.shape[0] == 27 + 16 and weights.shape == (27 + 16,)
    assert weights[:27].sum() / weights.sum() == pytest.approx(27 / 30 * 1 / (27 / 30 * 1 + 3))  # 3 of odd's 30 gone
    loop.train(cfg, tmp_path / "run", progress=False)
    assert rows(tmp_path / "run", "data")[0]["empty_captions"] == 1


def test_shards_with_truncated_and_garbage_files_train(data, tmp_path):
    shards = write_shards(load_captions_table(data), str(tmp_path / "w" / "s-%02d.tar"), maxcount=8)
    raw = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(raw[: len(raw) // 2])  # truncated: the samples before the cut stay
    (tmp_path / "w" / "s-99.tar").write_bytes(b"not a tar file" * 100)
    cfg = config.resolve("clip", args(data, f"data=wds:{tmp_path / 'w'}", "train.steps=2", "data.max_bad_fraction=0.7"))
    loop.train(cfg, tmp_path / "run", progress=False)
    counts = rows(tmp_path / "run", "data")[0]
    assert counts["bad_shards"] == 2 and 8 < counts["images"] < 16


def all_bad(tmp_path: Path, kind: str) -> tuple[list[str], list[str]]:
    """A data set with nothing usable in it: (overrides, what the message must name)."""
    folder = tmp_path / kind
    folder.mkdir()
    if kind in ("images", "images-per-batch"):
        for k in range(10):
            (folder / f"bad{k}.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100))
        (folder / "t.csv").write_text("image,caption\n" + "".join(f"bad{k}.jpg,caption {k}\n" for k in range(10)))
        extra = ["data.cache_images=false"] if kind == "images-per-batch" else []
        named = [f"{folder}/bad", "unreadable"] if extra else [f"{folder}/bad0.jpg", "10 of 10 images"]
        return [f"data=csv:{folder / 't.csv'}", *extra], named
    if kind == "captions":
        picture(folder / "a.png", 0)
        (folder / "t.csv").write_text("image,caption\n" + "a.png,\n" * 10)
        return [f"data=csv:{folder / 't.csv'}"], ["10 of 10 empty captions", f"{folder / 't.csv'}:2"]
    (folder / "s-0.tar").write_bytes(b"garbage" * 100)
    return [f"data=wds:{folder / 's-0.tar'}"], ["1 of 1 unreadable shards", "s-0.tar"]


@pytest.mark.parametrize("kind", ["images", "images-per-batch", "captions", "shards"])
def test_all_bad_data_stops_with_a_message_naming_it(data, tmp_path, capsys, kind):
    overrides, named = all_bad(tmp_path, kind)
    assert cli_main(["train", "clip", *args(data, *overrides), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "data.max_bad_fraction" in err, err
    for text in named:
        assert text in err, (text, err)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------ bad configs
@pytest.mark.parametrize("override, expected", [
    ("train.stpes=3", ["unknown config key 'train.stpes'", "did you mean 'train.steps'"]),
    ("train.batch_size=abc", ["'train.batch_size' must be a number, got 'abc'"]),
    ("model.vision.image_size=30", ["model.vision.image_size=30 is not divisible by model.vision.patch_size=8",
                                    "pick e.g. image_size=24"]),
    ("model.vision.heads=3", ["model.vision.width=64 must be a multiple of model.vision.heads=3",
                              "pick e.g. model.vision.heads=2"]),
    ("objectives.contrastiv.weight=1", ["unknown objective 'objectives.contrastiv'", "did you mean 'contrastive'"]),
    ("train.steps=", ["give exactly one budget of train.steps, train.epochs, train.samples (got none)"]),
    ("train.precision=fp8", ["train.precision='fp8': choose auto, fp32, bf16 or fp16"]),
    ("train.max_nonfinite_steps=0", ["train.max_nonfinite_steps=0 must be at least 1"]),
    ("data.max_bad_fraction=2", ["data.max_bad_fraction=2.0 must be between 0 and 1"]),
])
def test_bad_config_fails_before_any_work(tmp_path, capsys, override, expected):
    out = tmp_path / "run"
    with pytest.raises(config.ConfigError) as err:
        config.resolve("clip", ["model=micro", "train.steps=2", override])
    for text in expected:
        assert text in str(err.value)
    assert cli_main(["train", "clip", "model=micro", "train.steps=2", override, "--out", str(out)]) == 2
    assert f"error: {err.value}\n" == capsys.readouterr().err
    assert not out.exists()
