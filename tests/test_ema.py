"""Averages of weights (vlpt.train.ema): the update formula and its schedules, frozen copies outside the
optimiser, `train.ema` saved, resumed bit-exactly and evaluated as ema/..."""
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vlpt import config
from vlpt.cli import main as cli_main
from vlpt.data.tokenizer import Vocab
from vlpt.train import checkpoint, loop
from vlpt.train.ema import EMA, decay_at
from vlpt.train.optim import build_optimizer
from vlpt.train.pretrainer import build
from vlpt.train.step import StepParts, train_step

# scenes:test: 500 images, quick to decode
MICRO = ["model=micro", "data=scenes:test", "train.batch_size=8", "train.warmup_steps=1", "train.threads=1",
         "train.deterministic=true", "eval.tasks=[]"]
# byolip with small heads: the average of the model (train.ema) and the objective's target network at once
BYOLIP = MICRO + ["objectives.byol.hidden=16", "objectives.byol.dim=8", "train.ema=0.9"]


def toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_update_is_target_times_m_plus_online_times_one_minus_m():
    online = toy()
    ema = EMA(online, 0.9, "constant")
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), online.parameters()))  # starts as a copy
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        online[0].weight.add_(1.0)
        online[2].bias.mul_(-3.0)
        online(torch.randn(5, 3))  # moves the batch-norm statistics
    assert ema.update(1, 10) == 0.9
    for t, t0, o in zip(ema.module.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * o, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ema.module[0].weight, online[0].weight)
    assert torch.equal(ema.module[0].bias, online[0].bias)  # a weight that did not move: its average stays exact
    assert torch.equal(ema.module[1].running_mean, online[1].running_mean)  # buffers follow the online module
    assert int(ema.module[1].num_batches_tracked) == 1


def test_schedules():
    assert decay_at(0.99, "constant", 7, 10) == 0.99
    assert decay_at(0.99, "cosine", 0, 10) == pytest.approx(0.99)  # BYOL: from the base value ...
    assert decay_at(0.99, "cosine", 5, 10) == pytest.approx(1 - 0.01 * 0.5)
    assert decay_at(0.99, "cosine", 10, 10) == pytest.approx(1.0)  # ... up to 1 at the end
    assert decay_at(0.999, "warmup", 1, 100) == pytest.approx(2 / 11)  # (1 + k) / (10 + k) while below the decay
    assert decay_at(0.9, "warmup", 1000, 2000) == 0.9
    with pytest.raises(ValueError, match="choose constant, cosine, warmup"):
        EMA(toy(), 0.9, "linear")


def test_averages_get_no_gradient_no_optimizer_state_and_are_saved():
    cfg = config.resolve("byolip", BYOLIP + ["train.steps=3"])
    module = build(cfg, Vocab(64))
    frozen = {n: p for n, p in module.named_parameters() if n.startswith(("ema.", "objectives.byol.target."))}
    model = dict(module.model.named_parameters())
    # the whole model twice (train.ema and the target network), and the target's two projectors
    assert len(frozen) == 2 * len(model) + sum(1 for _ in module.objectives["byol"].image_head.parameters()) * 2
    assert not any(p.requires_grad for p in frozen.values())
    optimizer = build_optimizer(module, cfg.train)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held.isdisjoint(map(id, frozen.values())) and held >= set(map(id, model.values()))
    state = module.state_dict()
    assert "ema.module.visual.patch_embed.weight" in state
    assert "objectives.byol.target.module.model.visual.patch_embed.weight" in state
    assert "objectives.byol.target.module.image_head.0.weight" in state

    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
             "text": torch.randint(1, 60, (8, 24), generator=g),
             "image_views": torch.randint(0, 256, (2, 8, 3, 32, 32), dtype=torch.uint8, generator=g),
             "text_views": torch.randint(1, 60, (2, 8, 24), generator=g)}
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    averages = {n: p.detach().clone() for n, p in module.ema.module.named_parameters()}
    result = train_step(StepParts(module, optimizer), batch, step=1, total=3)
    assert result.updated and math.isfinite(result.loss)
    assert all(p.grad is None for p in frozen.values())
    assert not any(id(p) in optimizer.state for p in frozen.values())
    m = decay_at(0.9, "warmup", 1, 3)  # train.ema_schedule's default
    online = dict(module.model.named_parameters())
    for n, p in module.ema.module.named_parameters():
        torch.testing.assert_close(p, m * averages[n] + (1 - m) * online[n], rtol=1e-6, atol=1e-7)
    moved = [n for n in before if not torch.equal(before[n], online[n])]
    assert moved and not all(torch.equal(module.ema.module.get_parameter(n), online[n]) for n in moved)


def test_interrupted_and_resumed_run_ends_bit_equal(tmp_path):
    """train.ema and BYOLIP's target network continue exactly from a checkpoint."""
    cfg = config.resolve("byolip", BYOLIP + ["train.steps=4", "checkpoint.every_steps=2"])
    loop.train(cfg, tmp_path / "straight", progress=False)
    loop.train(cfg, tmp_path / "broken", progress=False, stop_at=3)  # its last checkpoint is step 2
    loop.train(cfg, tmp_path / "broken", progress=False, resume=True)
    a, b = (load_file(str(tmp_path / r / "checkpoints" / "step-00000004" / "model.safetensors"))
            for r in ("straight", "broken"))
    assert a.keys() == b.keys()
    assert any(k.startswith("ema.") for k in a) and any(k.startswith("objectives.byol.target.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    start = load_file(str(tmp_path / "broken" / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert not torch.equal(start["ema.module.visual.patch_embed.weight"], a["ema.module.visual.patch_embed.weight"])


def test_final_evaluation_reports_the_average_and_vlpt_eval_ema_repeats_it(tmp_path, capsys):
    cfg = config.resolve("clip", MICRO + ["train.steps=3", "train.ema=0.5", "eval.tasks=[zeroshot:scenes:colour]"])
    results = loop.train(cfg, tmp_path, progress=False)
    assert set(results) == {f"{p}zeroshot:scenes:colour/{m}" for p in ("", "ema/") for m in ("top1", "top5")}
    capsys.readouterr()
    assert cli_main(["eval", str(tmp_path), "--ema", "--task", "zeroshot:scenes:colour", "--json"]) == 0

    again = json.loads(capsys.readouterr().out)
    assert again == {k[len("ema/"):]: v for k, v in results.items() if k.startswith("ema/")}
    weights = load_file(str(checkpoint.latest(tmp_path / "checkpoints") / "model.safetensors"))
    assert not torch.equal(weights["ema.module.image_proj.weight"], weights["model.image_proj.weight"])


def test_eval_ema_of_a_run_without_it_and_bad_values_are_one_line_errors(tmp_path, capsys):
    cfg = config.resolve("clip", MICRO + ["train.steps=1"])
    loop.train(cfg, tmp_path, progress=False)
    assert cli_main(["eval", str(tmp_path), "--ema", "--task", "zeroshot:scenes:colour"]) == 2
    assert "trained without train.ema; drop --ema" in capsys.readouterr().err
    for override, message in (("train.ema=1", "train.ema=1.0 must be in [0, 1)"),
                              ("train.ema_schedule=linear", "train.ema_schedule='linear': choose constant"),
                              ("objectives.byol.momentum=1.5", "objectives.byol.momentum=1.5 must be in [0, 1]"),
                              ("objectives.byol.momentum_schedule=cos", "momentum_schedule='cos': choose")):
        with pytest.raises(config.ConfigError, match=re.escape(message)):
            config.resolve("byolip", MICRO + ["train.steps=1", override])


def test_the_guides_objective_with_a_target_network_trains_and_saves_its_target(tmp_path, monkeypatch):
    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    heading = guide.index("### An objective with a target network")
    (tmp_path / "my_target.py").write_text(re.search(r"```python\n(.*?)```", guide[heading:], re.S).group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config.resolve("clip", MICRO + ["train.steps=3", "train.log_every=1"] +
                         ['objectives={"contrastive": {}, "my_target:MomentumText": {"momentum": 0.5}}'])
    loop.train(cfg, tmp_path / "run", progress=False)
    w = load_file(str(checkpoint.latest(tmp_path / "run" / "checkpoints") / "model.safetensors"))
    online = {k[len("model.text."):]: v for k, v in w.items() if k.startswith("model.text.")}
    prefix = "objectives.my_target:MomentumText.target.module."
    target = {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
    assert target.keys() == online.keys()
    assert not all(torch.equal(target[k], online[k]) for k in online)  # an average, not a copy
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [math.isfinite(r["my_target:MomentumText/cos"]) for r in rows if r["kind"] == "train"] == [True] * 3


def test_a_failed_final_evaluation_says_how_to_rerun_the_model_and_the_average(tmp_path, monkeypatch):
    from vlpt.train import evaluation

    def explode(task, model, **options):
        raise RuntimeError("out of paper")

    monkeypatch.setattr(evaluation, "run_task", explode)
    run = tmp_path / "run"
    cfg = config.resolve("clip", MICRO + ["train.steps=1", "train.ema=0.5", "eval.tasks=[zeroshot:scenes:colour]"])
    again = f"vlpt eval {run} --task 'zeroshot:scenes:colour' and vlpt eval {run} --ema --task 'zeroshot:scenes:colour'"
    with pytest.raises(evaluation.EvaluationFailed, match=re.escape(again)):
        loop.train(cfg, run, progress=False)
