"""End-to-end training on built-in scenes with the micro model: learning, run folder, resume, CLI."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vlpt import config, inference
from vlpt.cli import main as cli_main
from vlpt.train import checkpoint, loop

MICRO = ["model=micro", "train.batch_size=32", "train.warmup_steps=2", "train.log_every=1", "eval.tasks=[]"]


def params(run_dir):
    return load_file(str(checkpoint.latest(run_dir / "checkpoints") / "model.safetensors"))


def test_loss_falls_and_run_folder_is_complete(tmp_path):
    cfg = config.resolve("clip", MICRO + ["train.steps=40", "checkpoint.every_steps=10", "checkpoint.keep=2",
                                          "eval.tasks=[zeroshot:scenes:colour]", "eval.every_steps=20"])
    results = loop.train(cfg, tmp_path, progress=False)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    for f in ("config.yaml", "tokenizer.json", "metrics.jsonl", "results.json", "command.txt"):
        assert (tmp_path / f).exists(), f
    kept = [p.name for p in checkpoint.all_checkpoints(tmp_path / "checkpoints")]
    assert kept == ["step-00000030", "step-00000040"]  # keep the last 2
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert "zeroshot:scenes:colour/top1" in results
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [20, 40]  # periodic, then final
    # the checkpoint alone is a usable model: config and tokenizer travel inside it
    _, meta = checkpoint.load_weights(checkpoint.latest(tmp_path / "checkpoints"))
    assert json.loads(meta["config"])["model"]["preset"] == "micro" and "<eot>" in meta["tokenizer"]


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    args = MICRO + ["train.steps=8", "checkpoint.every_steps=3", "train.deterministic=true", "train.seed=3"]
    cfg = config.resolve("clip", args)
    loop.train(cfg, tmp_path / "straight", progress=False)
    loop.train(cfg, tmp_path / "broken", progress=False, stop_at=4)  # dies after step 4; last checkpoint at 3
    assert checkpoint.latest(tmp_path / "broken" / "checkpoints").name == "step-00000003"
    with pytest.raises(config.ConfigError, match="--resume"):
        loop.train(cfg, tmp_path / "broken", progress=False)
    loop.train(cfg, tmp_path / "broken", progress=False, resume=True)
    a, b = params(tmp_path / "straight"), params(tmp_path / "broken")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_train_eval_json_and_config_errors(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", "clip", *MICRO, "train.steps=3", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert cli_main(["eval", str(run), "--task", "zeroshot:scenes:colour", "--json"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out)  # exactly one JSON object on stdout
    assert set(metrics) == {"zeroshot:scenes:colour/top1", "zeroshot:scenes:colour/top5"}
    encoder = inference.load(run)  # a run folder is a usable model
    emb = encoder.encode_texts(["a red circle", "a blue square"])
    assert emb.shape == (2, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
    assert cli_main(["train", "clip", "train.stpes=3", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err


def test_help_of_every_command_shows_examples():
    for cmd in (["train"], ["eval"], ["data", "pack"]):
        out = subprocess.run([sys.executable, "-m", "vlpt", *cmd, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "example" in out.stdout, cmd


def test_siglip_recipe_learns(tmp_path):
    cfg = config.resolve("siglip", MICRO + ["train.steps=80", "eval.tasks=[zeroshot:scenes:colour]"])
    results = loop.train(cfg, tmp_path, progress=False)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert results["zeroshot:scenes:colour/top1"] > 30.0  # chance: 12.5%
    assert rows[-2]["sigmoid/bias"] != -10.0  # the bias is learned
