"""The core's contracts: the step, views, model outputs by (name, view), objectives that own heads and hooks,
plug-ins by import path, towers that start from weights or stay locked, evaluation checked before training."""
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlpt import config
from vlpt.cli import main as cli_main
from vlpt.data.tokenizer import Vocab
from vlpt.data.views import ImageViews, TextViews, random_deletion, random_swap
from vlpt.models.model import ImageTextModel
from vlpt.train import checkpoint, loop
from vlpt.train.evaluation import EvaluationFailed
from vlpt.train.optim import build_optimizer
from vlpt.train.pretrainer import build
from vlpt.train.step import StepParts, split, train_step

MICRO = ["model=micro", "train.batch_size=32", "train.warmup_steps=2", "train.log_every=1", "eval.tasks=[]"]
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"


def guide_example(heading: str, lang: str = "python") -> str:
    """The first ```LANG block after `heading` in docs/guide.md: the examples there run here."""
    text = GUIDE.read_text()
    return re.search(rf"```{lang}\n(.*?)```", text[text.index(heading):], re.S).group(1)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict:
    return load_file(str(checkpoint.latest(run / "checkpoints") / "model.safetensors"))


# ------------------------------------------------------------------------------------------ plug-ins
@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """The guide's objective and evaluator, as modules on the path."""
    (tmp_path / "my_objectives.py").write_text(guide_example("## Writing an objective"))
    (tmp_path / "my_evals.py").write_text(guide_example("## Writing an evaluator"))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_an_objective_outside_vlpt_trains_through_a_recipe(plugins, tmp_path):
    recipe = tmp_path / "predict.yaml"
    recipe.write_text(guide_example("## Writing an objective", "yaml"))
    cfg = config.resolve(str(recipe), MICRO + ["train.steps=12"])
    assert list(cfg.objectives) == ["contrastive", "my_objectives:PredictText"]
    run = tmp_path / "run"
    loop.train(cfg, run, progress=False)
    w = weights(run)
    head = [k for k in w if k.startswith("objectives.my_objectives:PredictText.head")]
    assert head, "the objective's own head is trained and saved with the model"
    assert int(w["objectives.my_objectives:PredictText.updates"]) == 12  # after_step ran after every step
    for k in head:
        if k.endswith("weight"):  # its hook's renorm holds after the last step
            assert w[k].norm(dim=1).max() <= 3.0 + 1e-5
    train_rows = [r for r in rows(run) if r["kind"] == "train"]
    assert train_rows[-1]["my_objectives:PredictText/cos"] > train_rows[0]["my_objectives:PredictText/cos"]
    import vlpt

    assert vlpt.load(run).encode_text(["a red circle"]).shape == (1, 64)  # the run loads with its plug-in


def test_an_evaluator_outside_vlpt_runs_by_import_path(plugins, tmp_path, capsys):
    task = "my_evals:ClassTightness:scenes:colour"
    run = tmp_path / "run"
    cfg = config.resolve("clip", MICRO + ["train.steps=4", f"eval.tasks=[{task}]"])
    results = loop.train(cfg, run, progress=False)
    assert 0 < results[f"{task}/tightness"] <= 1
    capsys.readouterr()
    assert cli_main(["eval", str(run), "--task", task, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(results)


def test_objective_options_are_typed_and_unknown_names_are_errors():
    with pytest.raises(config.ConfigError, match="'objectives.contrastive.local_loss' must be true or false"):
        config.resolve("clip", ["objectives.contrastive.local_loss=often"])
    with pytest.raises(config.ConfigError, match="did you mean 'objectives.contrastive.label_smoothing'"):
        config.resolve("clip", ["objectives.contrastive.label_smothing=0.1"])
    with pytest.raises(config.ConfigError, match="cannot import module 'no_such_pkg.losses'"):
        config.resolve("clip", {"objectives": {"no_such_pkg.losses:Align": {"weight": 1}}})


# ------------------------------------------------------------------------------------------ the step
def micro_clip(**options):
    cfg = config.resolve("clip", ["model=micro", "train.steps=1"] + [f"{k}={v}" for k, v in options.items()])
    torch.manual_seed(0)
    return cfg, build(cfg, Vocab(50))


def random_batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(5, 50, (b, 24), generator=g)
    text[:, 0], text[:, 10], text[:, 11:] = 1, 2, 0
    return {"image": torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8), "text": text}


def test_the_temperature_comes_back_from_above_the_clamp():
    """Clamped inside the forward pass, log_scale above ln 100 had a zero gradient and stayed there for good."""
    cfg, module = micro_clip(**{"train.lr": 0.05})
    objective = module.objectives["contrastive"]
    with torch.no_grad():
        objective.log_scale.fill_(5.0)  # exp(5) = 148 > 100
    parts = StepParts(module, build_optimizer(module, cfg.train), grad_clip=0)
    train_step(parts, random_batch(), 1, 20)
    assert objective.log_scale.item() == pytest.approx(math.log(100))  # clamped after the step
    for step in range(2, 21):  # random pairs: the loss wants a lower scale, and now it can follow
        train_step(parts, random_batch(seed=step), step, 20)
    assert objective.log_scale.item() < math.log(100) - 0.1


def test_micro_batches_split_every_key_on_its_batch_dimension():
    batch = {"image": torch.arange(6), "text": torch.arange(12).view(6, 2),
             "image_views": torch.arange(12).view(2, 6), "text_views": torch.arange(24).view(2, 6, 2)}
    parts = split(batch, 3)
    assert [p["image"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert parts[1]["image_views"].tolist() == [[2, 3], [8, 9]]
    assert parts[2]["text_views"].shape == (2, 2, 2) and parts[2]["text"].tolist() == [[8, 9], [10, 11]]


def test_every_output_is_computed_once_per_batch():
    cfg = config.resolve("coca", ["model=micro", "train.steps=1", "model.poolers.generative_queries=4"])
    module = build(cfg, Vocab(50))
    calls = []
    module.model.visual.register_forward_hook(lambda *a: calls.append("visual"))
    module.model.decoder.register_forward_hook(lambda *a: calls.append("decoder"))
    loss, metrics = module(random_batch())
    assert calls == ["visual", "decoder"]  # contrastive and captioning share one pass of each tower
    assert {"contrastive/loss", "captioning/loss"} <= set(metrics)


def test_masked_image_tokens_encode_only_the_kept_patches():
    cfg = config.resolve("clip", ["model=micro", "train.steps=1", "model.vision.pool=gap"])
    model = ImageTextModel(cfg.model, Vocab(50), frozenset({"image_tokens@masked", "image_pooled"}))
    lengths = []
    model.visual.transformer.blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    batch = random_batch(b=3)
    keep = torch.tensor([[0, 5, 9, 15], [1, 2, 3, 4], [15, 14, 13, 12]])  # 4 of the 16 patches
    out = model({**batch, "image_keep": keep}, frozenset({"image_tokens@masked", "image_pooled"}))
    assert out["image_tokens@masked"].shape == (3, 4, 64) and out["image_pooled"].shape == (3, 64)
    assert lengths == [16, 4]  # the full pass saw 16 tokens, the masked one 4
    # the kept patches keep their own positions: the same as encoding a batch where they are all there
    one = model({**batch, "image_keep": torch.arange(16).expand(3, 16)}, frozenset({"image_tokens@masked"}))
    full = model(batch, frozenset({"image_tokens"}))
    torch.testing.assert_close(one["image_tokens@masked"], full["image_tokens"])


def test_views_are_pure_functions_of_seed_step_and_rank():
    cfg = config.resolve("clip", ["train.steps=1", "views.image_views.count=2", "views.image_views.flip=0.5",
                                  "views.text_views.count=2", "views.text_views.random_deletion=0.3"]).views
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    a = ImageViews(cfg, seed=1)(images, step=5)
    assert a["image"].shape == (4, 3, 16, 16) and a["image_views"].shape == (2, 4, 3, 16, 16)
    assert torch.equal(a["image_views"], ImageViews(cfg, seed=1)(images, step=5)["image_views"])
    assert not torch.equal(a["image_views"], ImageViews(cfg, seed=1)(images, step=6)["image_views"])
    assert not torch.equal(a["image_views"], ImageViews(cfg, seed=1, rank=1)(images, step=5)["image_views"])
    assert not torch.equal(a["image_views"][0], a["image_views"][1])  # two different views
    captions = ["a red circle left of a blue square", "two green triangles"]
    main, extra = TextViews(cfg, seed=1)(captions, step=5)
    assert main is None and len(extra) == 2  # views.text changes nothing: batch["text"] is the caption
    assert extra == TextViews(cfg, seed=1)(captions, step=5)[1]
    assert extra != TextViews(cfg, seed=1)(captions, step=9)[1]


def test_flip_mirrors_and_eda_operations_keep_words():
    cfg = config.resolve("clip", ["train.steps=1", "views.image.crop_scale=[1,1]", "views.image.flip=1"]).views
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(ImageViews(cfg, 0)(images, 0)["image"], images.flip(-1).float())
    words = "a small red circle left of a blue square".split()
    g = torch.Generator().manual_seed(0)
    assert sorted(random_swap(words, 0.2, g)) == sorted(words)
    assert random_deletion(words, 1.0, g) != [] and len(random_deletion(words, 1.0, g)) == 1
    kept = random_deletion(words, 0.5, g)
    assert all(w in words for w in kept)


def test_a_run_with_views_resumes_bit_exactly(tmp_path):
    args = MICRO + ["train.steps=6", "checkpoint.every_steps=3", "train.deterministic=true",
                    "views.image.flip=0.5", "views.text.random_swap=0.3", "data.cache_images=false"]
    cfg = config.resolve("clip", args)
    loop.train(cfg, tmp_path / "straight", progress=False)
    loop.train(cfg, tmp_path / "broken", progress=False, stop_at=4)
    loop.train(cfg, tmp_path / "broken", progress=False, resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "broken")
    assert all(torch.equal(a[k], b[k]) for k in a)


VIEW_OBJECTIVE = '''
from vlpt.objectives import Objective

class ViewAgreement(Objective):
    needs = frozenset({"image_embed@image_views", "text_embed@text_views"})

    def forward(self, outputs, batch):
        img, txt = outputs["image_embed@image_views"], outputs["text_embed@text_views"]  # [V,B,D]
        return (2 - (img[0] * img[1]).sum(-1) - (txt[0] * txt[1]).sum(-1)).mean(), {}
'''


def test_objectives_read_extra_views_of_images_and_texts(tmp_path, monkeypatch):
    (tmp_path / "view_objective.py").write_text(VIEW_OBJECTIVE)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = {"objectives": {"contrastive": {"weight": 1}, "view_objective:ViewAgreement": {"weight": 1}}}
    with pytest.raises(config.ConfigError, match="set e.g. views.image_views.count=2"):
        config.resolve("clip", recipe | {"train": {"steps": 1}})
    views = ["views.image_views.count=2", "views.image_views.crop_scale=[0.3,1]", "views.text_views.count=2",
             "views.text_views.random_deletion=0.3", "train.accum_steps=2"]
    cfg = config.resolve("clip", recipe | config.parse_overrides(MICRO + views + ["train.steps=3"]))
    loop.train(cfg, tmp_path / "run", progress=False)
    assert [r for r in rows(tmp_path / "run") if r["kind"] == "train"][-1]["view_objective:ViewAgreement/loss"] > 0


# ------------------------------------------------------------------------------------ init and lock
def test_a_locked_text_tower_started_from_a_run_stays_bit_identical(tmp_path):
    source = tmp_path / "source"
    loop.train(config.resolve("clip", MICRO + ["train.steps=5"]), source, progress=False)
    lit = tmp_path / "lit"
    cfg = config.resolve("clip", MICRO + ["train.steps=50", f"model.init.text={source}", "model.lock=[text]"])
    loop.train(cfg, lit, progress=False)
    before, after = weights(source), weights(lit)
    text = [k for k in before if k.startswith("model.text.")]
    assert text and all(torch.equal(before[k], after[k]) for k in text)
    assert not torch.equal(before["model.visual.pos_embed"], after["model.visual.pos_embed"])  # the rest trained
    assert (lit / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()  # its vocabulary too
    state = checkpoint.load_state(checkpoint.latest(lit / "checkpoints"))
    in_optimizer = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    trainable = [k for k in after if not k.startswith("model.text.")]
    assert in_optimizer == len(trainable) and len(state["optimizer"]["state"]) == len(trainable)
    shutil.rmtree(source)  # a trained run no longer needs the weights it started from
    import vlpt

    assert vlpt.load(lit).encode_text(["a red circle"]).shape == (1, 64)


def test_tower_init_checks_names_and_shapes(tmp_path):
    source = tmp_path / "source"
    loop.train(config.resolve("clip", MICRO + ["train.steps=1"]), source, progress=False)
    wide = config.resolve("clip", MICRO + ["train.steps=1", f"model.init.vision={source}", "model.vision.width=32",
                                           "model.vision.heads=2"])
    with pytest.raises(config.ConfigError, match=r"tensor visual\.\S+ has shape \[.*64.*\], this model's has"):
        loop.train(wide, tmp_path / "x", progress=False)
    with pytest.raises(config.ConfigError, match="model.lock names the text tower, which this recipe does not have"):
        config.resolve("cap", MICRO + ["train.steps=1", "model.lock=[text]"])
    with pytest.raises(config.ConfigError, match="no such run folder"):
        loop.train(config.resolve("clip", MICRO + ["train.steps=1", "model.init.vision=/no/such/run"]),
                   tmp_path / "y", progress=False)
    assert not (tmp_path / "y").exists()  # before any work


# ------------------------------------------------------------------------------- evaluation during runs
EXPLODING = '''
from vlpt.eval.registry import Evaluator

class Exploding(Evaluator):
    def __call__(self, model, data, options):
        raise RuntimeError("out of paper")
'''


def test_a_failing_evaluation_does_not_stop_training(tmp_path, monkeypatch, capsys):
    (tmp_path / "exploding.py").write_text(EXPLODING)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    cfg = config.resolve("clip", MICRO + ["train.steps=6", "eval.tasks=[{task: 'exploding:Exploding:scenes:colour', "
                                          "every_steps: 2}, zeroshot:scenes:colour]"])
    with pytest.raises(EvaluationFailed, match=f"vlpt eval {run} --task 'exploding:Exploding:scenes:colour'"):
        loop.train(cfg, run, progress=False)
    assert checkpoint.latest(run / "checkpoints").name == "step-00000006"  # the final checkpoint is safe
    errors = [r for r in rows(run) if r["kind"] == "eval_error"]
    assert [r["step"] for r in errors] == [2, 4, 6] and "out of paper" in errors[0]["message"]
    assert "zeroshot:scenes:colour/top1" in json.loads((run / "results.json").read_text())  # the others ran
    assert "training goes on" in capsys.readouterr().err


def test_evaluation_tasks_are_checked_before_the_first_step(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", "clip", *MICRO, "train.steps=50", "eval.tasks=[retrievl:scenes:test]",
                     "--out", str(run), "--quiet"]) == 2
    assert "did you mean 'retrieval'" in capsys.readouterr().err.lower()
    assert cli_main(["train", "clip", *MICRO, "train.steps=50", f"eval.tasks=[retrieval:csv:{tmp_path}/none.csv]",
                     "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot open its data" in err and "none.csv" in err and len(err.strip().splitlines()) == 1
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()  # no work was done
    with pytest.raises(config.ConfigError, match="needs a caption decoder"):
        loop.train(config.resolve("clip", MICRO + ["train.steps=5", "eval.tasks=[captioning:scenes:test]"]),
                   tmp_path / "other", progress=False)
