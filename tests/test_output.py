"""What a person reads: plain progress lines when stderr is a file, the end-of-run summary (also with
--quiet), curves.png and `vlpt plot`, the TensorBoard note, skipped images on the console."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlpt import config
from vlpt.cli import main as cli_main
from vlpt.plot import curves_figure, read_rows
from vlpt.progress import TrainProgress
from vlpt.train import loop
from vlpt.train.logging import MetricsLog
from vlpt.train.summary import RunSummary

PNG = b"\x89PNG\r\n\x1a\n"
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "yellow": (200, 200, 30)}


def table(folder: Path, n: int = 16, corrupt: int = 0) -> Path:
    """A captions CSV of n small coloured pictures, the first `corrupt` of them unreadable."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,caption"]
    for k in range(n):
        colour = list(COLOURS)[k % 4]
        if k < corrupt:
            (folder / f"{k}.png").write_bytes(b"not a png")
        else:
            noise = np.random.default_rng(k).integers(0, 40, (12, 12, 3))
            Image.fromarray((np.array(COLOURS[colour]) + noise).astype(np.uint8)).save(folder / f"{k}.png")
        rows.append(f"{k}.png,a {colour} picture number {k}")
    (folder / "t.csv").write_text("\n".join(rows) + "\n")
    return folder / "t.csv"


def args(csv: Path, *extra: str) -> list[str]:
    return ["model=micro", f"data=csv:{csv}", "train.batch_size=8", "train.steps=6", "train.warmup_steps=2",
            "train.log_every=1", "eval.tasks=[]", "train.threads=1", *extra]


def summary_rows(text: str) -> dict:
    """'  key  value' lines of a summary as {key: value}."""
    out = {}
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("    "):
            key, _, value = line.strip().partition("  ")
            out[key] = value.strip()
    return out


def test_output_to_a_file_is_plain_lines_and_ends_with_the_summary(tmp_path):
    csv, run, log = table(tmp_path / "data"), tmp_path / "run", tmp_path / "out.log"
    cmd = [sys.executable, "-m", "vlpt", "train", "clip", *args(csv, "train.log_every_s=0",
                                                                 f"eval.tasks=[retrieval:csv:{csv}]"), "--out", str(run)]
    with open(log, "wb") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    raw = log.read_bytes()
    assert done.returncode == 0, raw.decode()
    assert b"\r" not in raw  # no progress bar redrawn in place
    text = raw.decode()
    progress = [line for line in text.splitlines() if line.startswith("train clip: step")]
    # train.log_every_s=0: the start, then one line per step, the last one with the total time
    assert progress[0] == "train clip: step 0/6, starting" and len(progress) == 7
    assert progress[3].startswith("train clip: step 3/6 (50%)  loss ") and " samples/s  ETA " in progress[3]
    assert progress[-1].startswith("train clip: step 6/6 (100%)") and "done in" in progress[-1]
    last = [r for r in read_rows(run / "metrics.jsonl") if r["kind"] == "train"][-1]
    summary = summary_rows(text)
    assert summary["final loss"] == f"{last['loss']:.4f}"
    assert summary["steps"].startswith("6 in ") and summary["run folder"] == str(run)
    assert summary["checkpoint"] == str(run / "checkpoints" / "step-00000006")
    assert summary["curves"] == str(run / "curves.png") and (run / "curves.png").read_bytes().startswith(PNG)
    assert summary["evaluation"] == "at step 6"
    results = json.loads((run / "results.json").read_text())
    r1 = f"retrieval:csv:{csv}/i2t_R@1"
    row = [line.split() for line in text.splitlines() if line.startswith(f"    {r1} ")]
    assert len(row) == 1 and float(row[0][1]) == pytest.approx(results[r1], abs=0.005)


FAILING = '''
from vlpt.eval.registry import Evaluator

class Failing(Evaluator):
    def __call__(self, model, data, options):
        raise RuntimeError("out of paper")
'''


def test_quiet_prints_only_the_summary_which_says_why_there_is_no_evaluation(tmp_path, capsys, monkeypatch):
    csv = table(tmp_path / "data")
    assert cli_main(["train", "clip", *args(csv, "train.log_every_s=0"), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "train clip: step" not in err and "clip: run summary" in out
    assert summary_rows(out)["evaluation"] == "none: eval.tasks is empty"

    (tmp_path / "failing.py").write_text(FAILING)
    monkeypatch.syspath_prepend(str(tmp_path))
    tasks = f"eval.tasks=[failing:Failing:csv:{csv}, retrieval:csv:{csv}]"
    assert cli_main(["train", "clip", *args(csv, tasks), "--out", str(tmp_path / "b"), "--quiet"]) == 1
    out, err = capsys.readouterr()
    summary = summary_rows(out)  # the summary still comes, with the table of the task that ran
    assert summary["evaluation"] == (f"at step 6; failed: failing:Failing:csv:{csv}: RuntimeError: out of paper")
    assert f"retrieval:csv:{csv}/t2i_R@1" in out and "vlpt eval" in err  # how to run it again


def test_train_progress_lines_by_the_clock():
    clock = iter(range(0, 100, 2))  # each step takes 2 s
    stream = io.StringIO()
    watch = TrainProgress("train x", 0, 10, every_s=5, stream=stream, clock=lambda: next(clock))
    for step in range(1, 11):
        watch.update(step, float("nan") if step == 10 else 1.0 / step, samples=16)
    lines = stream.getvalue().splitlines()
    # 16 samples per 2 s = 8/s; a line once 5 s have passed: steps 3, 6, 9 (t = 6, 12, 18), then the last
    assert lines == ["train x: step 0/10, starting",
                     "train x: step 3/10 (30%)  loss 0.3333  8 samples/s  ETA 14.0s",
                     "train x: step 6/10 (60%)  loss 0.1667  8 samples/s  ETA 8.0s",
                     "train x: step 9/10 (90%)  loss 0.1111  8 samples/s  ETA 2.0s",
                     "train x: step 10/10 (100%)  loss nan  8 samples/s  done in 20.0s"]
    assert watch.seconds == 20 and watch.samples == 160 and watch.final_loss == pytest.approx(1 / 9)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_train_progress_on_a_terminal_is_a_bar():
    stream = Terminal()
    watch = TrainProgress("train x", 0, 3, every_s=5, stream=stream)
    for step in range(1, 4):
        watch.update(step, 0.5, samples=8)
    watch.close()
    out = stream.getvalue()
    assert "\r" in out and "3/3" in out and "loss=0.500" in out and "train x: step" not in out


def test_summary_of_a_resumed_run_with_skips():
    s = RunSummary("coca", Path("runs/c"), start=4, steps=16, train_seconds=6.0, samples=96, final_loss=1.23456,
                   checkpoint=Path("runs/c/checkpoints/step-00000016"), total_seconds=75, curves="not drawn: ValueError: x",
                   results={"a/top1": 12.5, "longer/top5": 50.0}, image_reads_skipped=3, nonfinite_steps=1)
    assert s.text().splitlines() == [
        "coca: run summary",
        "  steps       12 (resumed at step 4) in 6.0s, 16 samples/s",
        "  final loss  1.2346",
        "  time        1m15s in all (data, training, saving, evaluation)",
        "  run folder  runs/c",
        "  checkpoint  runs/c/checkpoints/step-00000016",
        "  curves      not drawn: ValueError: x",
        "  skipped     3 reads of unreadable images; 1 non-finite steps (see metrics.jsonl)",
        "  evaluation  at step 16",
        "    a/top1          12.50",
        "    longer/top5     50.00"]
    done = RunSummary("clip", Path("r"), 16, 16, 0.0, 0, None, None, eval_note="none: eval.tasks is empty")
    assert summary_rows(done.text())["steps"] == "none: the run was already at its last step, 16"
    assert summary_rows(done.text())["final loss"] == "n/a"


def test_skipped_images_read_per_batch_are_named_on_the_console(tmp_path, capsys):
    csv = table(tmp_path / "data", corrupt=1)
    said = []
    cfg = config.resolve("clip", args(csv, "data.cache_images=false", "data.max_bad_fraction=0.5"))
    loop.train(cfg, tmp_path / "run", progress=False, report=said.append)
    err = capsys.readouterr().err
    named = [line for line in err.splitlines() if line.startswith("warning: skipped an unreadable image")]
    assert len(named) == 1 and str(tmp_path / "data" / "0.png") in named[0]  # named once, however often drawn
    reads = [r for r in read_rows(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "data"][-1]["bad_images"]
    assert reads >= 3  # 6 steps of 8 = 3 epochs of the 16 captions: its caption was drawn at least 3 times
    assert summary_rows(said[0])["skipped"] == f"{reads:.0f} reads of unreadable images (see metrics.jsonl)"


def test_curves_and_vlpt_plot(tmp_path, capsys):
    rows = [{"step": 0, "kind": "data", "images": 16.0},
            *[{"step": s, "kind": "train", "loss": 4.0 / s, "lr": 0.1 * s, "samples_per_s": 100.0 + s,
               "contrastive/loss": 3.0 / s, "captioning/loss": 1.0 / s} for s in (2, 4, 6)],
            {"step": 5, "kind": "train", "nonfinite_steps": 1.0, "nonfinite_in_a_row": 1.0},
            {"step": 4, "kind": "eval", "zs/top1": 20.0}, {"step": 6, "kind": "eval", "zs/top1": 30.0, "ret/r1": 5.0}]
    fig = curves_figure(rows)
    loss, lr, speed, evals = fig.axes
    assert [list(line.get_ydata()) for line in loss.lines] == [[2.0, 1.0, 4 / 6], [1 / 2, 1 / 4, 1 / 6],
                                                               [3 / 2, 3 / 4, 3 / 6]]  # total, captioning, contrastive
    assert list(lr.lines[0].get_xdata()) == [2, 4, 6] and list(speed.lines[0].get_ydata()) == [102, 104, 106]
    assert {line.get_label(): list(line.get_xdata()) for line in evals.lines} == {"ret/r1": [6], "zs/top1": [4, 6]}

    final_only = [r for r in rows if r["kind"] != "eval" or r["step"] == 6]  # measured at one step: bars
    evals = curves_figure(final_only).axes[3]
    assert evals.get_title() == "evaluation at step 6" and [p.get_width() for p in evals.patches] == [5.0, 30.0]
    assert [t.get_text() for t in evals.texts] == [" ret/r1  5.00", " zs/top1  30.00"]

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "kind": "tr')
    assert cli_main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0  # the torn last line is passed over
    assert (tmp_path / "c.png").read_bytes().startswith(PNG) and "wrote" in capsys.readouterr().out
    assert cli_main(["plot", str(tmp_path)]) == 2
    assert f"{tmp_path / 'metrics.jsonl'} not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["plot", "--help"])
    assert "examples:\n  vlpt plot runs/demo" in capsys.readouterr().out


def test_missing_tensorboard_is_said_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it raises ImportError
    log = MetricsLog(tmp_path)
    log.write(1, "train", {"loss": 1.0})
    log.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "pip install tensorboard" in err[0]
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "metrics.jsonl").exists()


def test_log_every_s_is_checked():
    with pytest.raises(config.ConfigError, match="train.log_every_s=-1"):
        config.resolve("clip", ["train.log_every_s=-1"])
