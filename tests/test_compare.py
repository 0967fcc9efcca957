"""`vlpt compare` / `vlpt report`: the plan (one suite, one budget), the win/tie rule, scaling fits, and one
small end-to-end compare (clip and cap, micro model, 2 seeds, on scenes) that is interrupted and resumed."""
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from vlpt.cli import main as cli_main
from vlpt.compare import runs, scaling
from vlpt.compare.stats import LOSS, TIE, UNTESTED, WIN, summarize, verdict
from vlpt.compare.table import best_rows
from vlpt.errors import UsageError

SMALL = ["model=micro", "train.batch_size=16", "train.warmup_steps=0", "train.threads=1", "train.log_every=1",
         "data.cache_images=false", "eval.templates=simple"]
TASKS = "eval.tasks=[zeroshot:scenes:shape,zeroshot_captioner:scenes:shape]"  # clip runs one, cap the other


def test_plan_gives_every_recipe_one_budget_seeds_and_the_union_suite():
    planned = runs.plan(["clip", "cap"], SMALL, samples=64, seeds=2, multiples=[1.0], points=2)
    assert [r.name for r in planned] == ["clip-seed0", "clip-seed1", "cap-seed0", "cap-seed1"]
    assert {r.cfg.train.samples for r in planned} == {64} and {r.cfg.train.steps for r in planned} == {None}
    assert [r.cfg.train.seed for r in planned] == [0, 1, 0, 1]
    assert {r.cfg.eval.every_steps for r in planned} == {2}  # 64 / 16 = 4 steps, evaluated at 2 points
    clip, cap = planned[0], planned[2]
    clip_tasks, cap_tasks = [t.task for t in clip.cfg.eval.tasks], [t.task for t in cap.cfg.eval.tasks]
    assert "retrieval:scenes:test" in clip_tasks and all(t.startswith("zeroshot_captioner:") for t in cap_tasks)
    assert set(clip.skipped) == set(cap_tasks) and set(cap.skipped) == set(clip_tasks)  # the union, split
    assert "caption decoder" in clip.skipped[cap_tasks[0]]
    scaled = runs.plan(["clip"], SMALL, samples=64, seeds=1, multiples=[1, 2], points=2)
    assert [(r.name, r.cfg.train.samples) for r in scaled] == [("clip-seed0", 64), ("clip-x2-seed0", 128)]
    with pytest.raises(UsageError, match="train.steps"):
        runs.plan(["clip"], SMALL + ["train.steps=5"], samples=64, seeds=1, multiples=[1.0], points=2)


def test_a_run_folder_continues_only_with_its_own_config_and_keys_added_later_take_their_defaults(tmp_path):
    from vlpt import config

    run = runs.plan(["clip"], SMALL, samples=64, seeds=1, multiples=[1.0], points=2)[0]
    folder = tmp_path / run.name
    folder.mkdir()
    saved = config.to_dict(run.cfg)
    del saved["train"]["fsdp"]  # a run written before train.fsdp existed: the same run
    (folder / "config.yaml").write_text(config.dump(config.from_dict(saved)).replace("  fsdp: false\n", ""))
    assert "fsdp" not in (folder / "config.yaml").read_text()
    runs._check_same(run, folder)
    other = runs.plan(["clip"], SMALL, samples=128, seeds=1, multiples=[1.0], points=2)[0]
    with pytest.raises(UsageError, match="another train config"):
        runs._check_same(other, folder)


def test_with_blind_plans_each_captioners_twin_first_and_gives_it_to_the_compositional_tasks(tmp_path):
    tasks = "eval.tasks=[swaps:scenes,zeroshot:scenes:shape,linear_probe:scenes:shape:train]"
    planned = runs.plan(["clip", "coca"], SMALL + [tasks], samples=64, seeds=2, multiples=[1.0], points=2,
                        runs_dir=tmp_path, with_blind=True)
    assert [r.name for r in planned] == ["clip-seed0", "clip-seed1", "coca-blind-seed0", "coca-seed0",
                                         "coca-blind-seed1", "coca-seed1"]  # a twin trains before its recipe
    twin, coca, clip = planned[2], planned[3], planned[0]
    assert twin.cfg.recipe == "coca-blind" and twin.cfg.model.decoder.blind
    assert list(twin.cfg.objectives) == ["captioning"] and twin.cfg.eval.tasks == []  # CoCa's contrastive half goes
    assert (twin.cfg.train.samples, twin.cfg.train.seed) == (coca.cfg.train.samples, coca.cfg.train.seed) == (64, 0)
    by_kind = {t.task.partition(":")[0]: t for t in coca.cfg.eval.tasks}
    assert by_kind["swaps"].task == f"swaps:scenes:blind={tmp_path.resolve() / 'coca-blind-seed0'}"
    assert by_kind["zeroshot"].task == "zeroshot:scenes:shape"  # only likelihood-scored choices get the control
    assert by_kind["linear_probe"].every_steps == 0 and by_kind["swaps"].every_steps is None  # probes at the end
    assert "blind=" not in " ".join(t.task for t in clip.cfg.eval.tasks)  # clip has no twin


def test_flops_budget_gives_each_recipe_the_samples_its_counted_cost_allows():
    from vlpt import config
    from vlpt.data.tokenizer import Vocab
    from vlpt.train.flops import step_flops

    # one more ViT block costs 3x its forward (backward: 2x), attention's backward counted as flash
    # computes it (the scores recomputed: 2.5x): 24 W^2 N + 4 N^2 W forward per sample, N = 16 patches + [CLS]
    def per_sample(depth):
        cfg = config.resolve("clip", ["model=micro", "train.samples=8", f"model.vision.depth={depth}"])
        return step_flops(cfg, Vocab(100), batch=8) / 8

    w, n = 64, 17
    assert per_sample(3) - per_sample(2) == pytest.approx(3 * 24 * w * w * n + 3.5 * 4 * n * n * w, rel=1e-6)
    flops = 2e9
    planned = runs.plan(["clip", "bow-prediction"], SMALL, samples=None, flops=flops, seeds=1, multiples=[1, 2],
                        points=2)
    spent = {r.name: (r.cfg.train.samples, r.flops) for r in planned}
    for name, (samples, budget) in spent.items():
        assert budget["flops"] == flops * (2 if "-x2-" in name else 1)
        assert samples == round(budget["flops"] / budget["flops_per_sample"])
    # bag-of-words prediction has no text tower: it sees more samples for the same FLOPs
    assert spent["bow-prediction-seed0"][0] > spent["clip-seed0"][0]
    assert spent["clip-x2-seed0"][0] == pytest.approx(2 * spent["clip-seed0"][0], abs=1)


def test_a_win_needs_a_gap_larger_than_the_seeds_spread():
    a, b, c = summarize([1.0, 2.0, 3.0]), summarize([5.0, 6.0, 7.0]), summarize([3.0, 4.0, 5.0])
    assert (a.mean, a.std, a.n) == (2.0, 1.0, 3)
    assert verdict(b, a) == WIN and verdict(a, b) == LOSS  # gap 4 > 1 + 1
    assert verdict(c, a) == TIE  # gap 2 = 1 + 1: the intervals touch
    assert verdict(a, b, lower_better=True) == WIN  # a loss: lower wins
    assert verdict(summarize([9.0]), a) == UNTESTED  # one seed: no spread known
    assert best_rows([a, b, c], lower_better=False) == [1, 2]  # the best, and c ties with it
    assert best_rows([a, b, None], lower_better=True) == [0]


def test_scaling_fit_recovers_known_parameters_within_its_bootstrap_interval():
    rng = np.random.default_rng(3)
    truth = {"a": 2000.0, "b": 3000.0, "c": 0.6, "d": 8.0}
    budgets = np.repeat(1000 * 2.0 ** np.arange(8), 3)  # 8 budgets, 3 seeds each
    errors = scaling.saturating(budgets, *truth.values()) + rng.normal(0, 0.3, len(budgets))
    fit = scaling.fit(budgets, errors, n_boot=100)
    assert fit.kind == "saturating"
    for name, value in truth.items():
        lo, hi = fit.intervals[name]
        assert lo <= value <= hi, (name, value, lo, hi)
    assert fit.intervals["c"][1] - fit.intervals["c"][0] < 1.0  # informative, not anything goes
    # few budgets: a line in log-log space through the per-budget best
    few = np.repeat([1e3, 4e3, 16e3], 2)
    line = scaling.fit(few, 50 * few ** -0.3 * np.exp(rng.normal(0, 0.01, len(few))), n_boot=100)
    assert line.kind == "loglog" and abs(line.params["c"] - 0.3) < 0.02
    assert line.intervals["a"][0] <= 50 <= line.intervals["a"][1] * 1.05


def test_two_recipes_curves_cross_where_they_should():
    budgets = np.repeat(np.geomspace(1e3, 1e5, 6), 2)
    steep = scaling.fit(budgets, 100 * budgets ** -0.5, n_boot=20, kind="loglog")
    flat = scaling.fit(budgets, 10 * budgets ** -0.25, n_boot=20, kind="loglog")
    # 100 C^-0.5 = 10 C^-0.25  <=>  C = 10^4
    cross = scaling.crossing(steep, flat, 1e3, 1e5)
    assert cross.at == pytest.approx(1e4, rel=0.02) and cross.share == 1.0
    apart = scaling.crossing(steep, flat, 2e4, 1e5)
    assert apart.at is None and "do not cross" in scaling.describe("a", "b", apart, 2e4, 1e5)


def _checkpoints(run: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*") if p.is_file()}


def _results_section(report: Path) -> str:
    text = report.read_text()
    return text[text.index("## Results"):text.index("## Training curves")]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """clip alone first (as if the compare had been stopped after it), then clip and cap: 2 seeds each."""
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    args = ["--budget", "32", "--seeds", "2", "--points", "2", "--out", str(out), "--quiet", TASKS,
            "checkpoint.every_steps=1"] + SMALL
    assert cli_main(["compare", "clip"] + args) == 0
    before = {name: _checkpoints(out / "runs" / name) for name in ("clip-seed0", "clip-seed1")}
    assert cli_main(["compare", "clip", "cap"] + args) == 0
    return out, args, before


def test_compare_writes_table_plots_and_html_without_retraining(compared):
    out, args, before = compared
    for name, files in before.items():  # finished runs are not retrained: no checkpoint written again
        assert files and _checkpoints(out / "runs" / name) == files
    table = _results_section(out / "report.md")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"cap", "clip", "*chance*"} <= set(rows)
    assert "*20.00*" in rows["*chance*"]  # five shapes
    assert re.search(r"\| clip \| .*\d+\.\d\d ± \d+\.\d\d", table)  # mean ± std over 2 seeds
    # a task a model cannot run is no row of blanks but one line under its table
    captioner = table[table.index("#### zeroshot_captioner:scenes:shape"):]
    captioner = captioner[:captioner.find("####", 5)]
    assert "Not applicable (the model cannot run this task): clip." in captioner and "| clip |" not in captioner
    summary = json.loads((out / "summary.json").read_text())
    clip = summary["clip@32"]["zeroshot:scenes:shape/top1"]
    seeds = [json.loads((out / "runs" / f"clip-seed{s}" / "results.json").read_text()) for s in (0, 1)]
    values = [r["zeroshot:scenes:shape/top1"] for r in seeds]
    assert clip["n"] == 2 and clip["mean"] == pytest.approx(sum(values) / 2)
    assert clip["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    pngs = sorted((out / "plots").glob("*.png"))
    assert any(p.name.startswith("loss-") for p in pngs) and any(p.name.startswith("bars-") for p in pngs)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(re.findall(r"!\[", (out / "report.md").read_text()))
    assert 'src="plots/' not in page


def test_interrupted_compare_resumes_and_report_rebuilds_the_same_table(compared, tmp_path):
    from vlpt.train import checkpoint, loop

    out, args, _ = compared
    run = out / "runs" / "cap-seed1"
    expected = json.loads((run / "results.json").read_text())
    shutil.rmtree(run)  # as if the compare had been stopped after step 1 of 2 of this run
    planned = {r.name: r for r in runs.plan(["clip", "cap"], SMALL + [TASKS, "checkpoint.every_steps=1"], 32, 2,
                                             [1.0], 2)}
    loop.train(planned["cap-seed1"].cfg, run, stop_at=1, progress=False)
    assert not (run / "results.json").exists() and checkpoint.latest(run / "checkpoints") is not None
    assert cli_main(["compare", "clip", "cap"] + args) == 0
    assert len((run / "command.txt").read_text().splitlines()) == 2  # continued (a resume adds its command)
    assert json.loads((run / "results.json").read_text()) == expected  # resumed at step 1: the same model
    assert cli_main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert _results_section(tmp_path / "rep" / "report.md") == _results_section(out / "report.md")
    runs_given = [str(p) for p in sorted((out / "runs").iterdir(), reverse=True)]  # any order
    assert cli_main(["report", *runs_given, "--out", str(tmp_path / "rep2")]) == 0
    assert (tmp_path / "rep2" / "summary.json").read_text() == (out / "summary.json").read_text()


def test_compare_and_report_mistakes_are_one_line_errors(tmp_path, capsys):
    assert cli_main(["compare", "clip", "--out", str(tmp_path / "x")]) == 2
    assert cli_main(["compare", "clip", "--budget", "32", "--flops", "1e12", "--out", str(tmp_path / "x")]) == 2
    assert cli_main(["compare", "clip", "--budget", "32", "--budgets", "1,two", "--out", str(tmp_path / "x")]) == 2
    assert cli_main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err), err
    assert "--budget SAMPLES" in err[0] and "one budget" in err[1] and "neither a run folder" in err[3]
    assert not (tmp_path / "x").exists()  # nothing written


def _chromium():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("no Chromium and chromedriver (CI installs them: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(driver), options=options)


def test_html_report_opens_in_headless_chromium_with_every_image(compared):
    out, _, _ = compared
    browser = _chromium()
    try:
        browser.get((out / "report.html").resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt]);")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        browser.quit()
    assert images and all(done and width > 0 for done, width, _ in images), images
    assert len(images) == len(list((out / "plots").glob("*.png")))
    assert errors == []


def _fake_run(folder: Path, recipe: str, samples: int, seed: int, top1: float | None,
              metric: dict | None = None, tasks: str = "zeroshot:scenes:shape", name: str | None = None) -> Path:
    """A finished run folder as `vlpt train` leaves it, with made-up results (no training)."""
    from vlpt import config

    cfg = config.resolve(recipe, ["model=micro", f"train.samples={samples}", f"train.seed={seed}",
                                  "train.batch_size=16", f"eval.tasks=[{tasks}]"])
    cfg.recipe = name or cfg.recipe
    run = folder / f"{cfg.recipe}-{samples}-seed{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config.dump(cfg))
    metric = metric if metric is not None else {"zeroshot:scenes:shape/top1": top1}
    (run / "results.json").write_text(json.dumps(metric))
    steps = samples // 16
    (run / "metrics.jsonl").write_text(json.dumps({"step": steps, "kind": "train", "loss": 1.0}) + "\n" +
                                       json.dumps({"step": steps, "kind": "eval", **metric}) + "\n")
    return run


def test_report_of_a_scaling_study_states_where_the_curves_cross(tmp_path):
    # errors 100 C^-0.5 (steep) and 10 C^-0.25 (flat) cross at C = 10^4; seeds differ by +-0.1%
    folder = tmp_path / "runs"
    for c in (1000, 4000, 16000, 64000):
        for seed, wiggle in ((0, 0.999), (1, 1.001)):
            _fake_run(folder, "clip", c, seed, 100 - 100 * c ** -0.5 * wiggle)
            _fake_run(folder, "siglip", c, seed, 100 - 10 * c ** -0.25 * wiggle)
    assert cli_main(["report", str(folder.parent), "--out", str(tmp_path / "rep"), "--bootstrap", "50"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    scaling_part = text[text.index("## Scaling"):]
    assert "clip (loglog): a = " in scaling_part and "siglip (loglog)" in scaling_part
    found = re.search(r"clip and siglip cross at about ([\d,]+) samples", scaling_part)
    assert found and float(found.group(1).replace(",", "")) == pytest.approx(1e4, rel=0.05)
    assert (tmp_path / "rep" / "plots" / "scaling-zeroshot-scenes-shape-top1.png").exists()
    assert "### 64,000 samples seen" in text  # one table per budget


def test_report_sets_controls_beside_the_score_they_qualify_and_ranks_only_the_models_own(tmp_path):
    folder = tmp_path / "runs"
    twin = "swaps:scenes:blind=/elsewhere/cap-blind-seed0"  # the twin's path is no part of the metrics' names
    for seed in (0, 1):
        _fake_run(folder, "cap", 64, seed, None, {
            "swaps:scenes/objects/macro/likelihood": 80.0 + seed, "swaps:scenes/objects/macro/blank_image": 90.0,
            "swaps:scenes/objects/macro/blind": 95.0, "swaps:scenes/objects/macro/length_baseline": 50.0,
            "zeroshot_captioner:scenes:shape/top1": 30.0 + seed}, tasks=f"{twin},zeroshot_captioner:scenes:shape")
        _fake_run(folder, "clip", 64, seed, None, {"swaps:scenes/objects/macro/cosine": 60.0 + seed,
                                                   "zeroshot:scenes:shape/top1": 40.0 + seed},
                  tasks="swaps:scenes,zeroshot:scenes:shape")
        _fake_run(folder, "cap", 64, seed, None, {}, tasks="", name="cap-blind")  # a twin: no results
    assert cli_main(["report", str(folder.parent), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "trained as controls and not evaluated themselves" in text and "cap-blind." in text
    swaps = text[text.index("#### swaps:scenes"):]
    swaps = swaps[:swaps.index("####", 5)]
    rows = [line for line in swaps.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1:3] for r in rows[1:]] == [
        [" cap ", " likelihood "], [" cap ", " *blank image (control)* "], [" cap ", " *blind twin (control)* "],
        [" cap ", " *shorter text (control)* "], [" clip ", " cosine "]]
    # the blank image (90) and the blind twin (95) beat the likelihood (80): shown in italics, never bold
    assert "**80.50 ± 0.71**" in rows[1] and "*95.00 ± 0.00*" in rows[3] and "**95" not in swaps
    assert "objects/macro: cap (likelihood) wins over clip (cosine)." in swaps
    figure = text[text.index("## Zero-shot against samples seen"):]
    assert "plots/zero-shot.png" in figure and (tmp_path / "rep" / "plots" / "zero-shot.png").exists()


def test_report_of_a_flops_budget_names_the_flops_and_each_recipes_samples(tmp_path):
    folder = tmp_path / "runs"
    for recipe, samples in (("clip", 64), ("bow-prediction", 128)):
        for seed in (0, 1):
            run = _fake_run(folder, recipe, samples, seed, 50.0 + seed)
            (run / "budget.json").write_text(json.dumps({"flops": 1e9, "flops_per_sample": 1e9 / samples}))
    assert cli_main(["report", str(folder.parent), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "### 1e+09 training FLOPs (2 seed(s) per recipe)" in text
    assert "Samples seen at this budget: bow-prediction 128, clip 64" in text
    (folder / "clip-64-seed0" / "budget.json").unlink()
    assert cli_main(["report", str(folder.parent), "--out", str(tmp_path / "rep2")]) == 2  # mixed budgets
