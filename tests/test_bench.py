"""`vlpt bench`: every part runs and reports what it says, with FLOPs from the same counter as
`vlpt compare --flops` and MFU consistent with the step time and the measured peak."""
import json

import pytest
import torch

from vlpt import bench, config
from vlpt.cli import main as cli_main
from vlpt.train.flops import flops_per_sample, recipe_vocab


def test_bench_reports_every_part_consistently(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "coca", "model=micro", "train.batch_size=8", "train.threads=1", "train.precision=fp32", "--steps", "2", "--warmup", "1",
            "--json", str(out)]
    assert cli_main(argv) == 0
    r = json.loads(out.read_text())
    assert set(r) >= {"step", "data", "loop", "eval"} and r["device"] == "cpu" and r["batch"] == 8
    step = r["step"]
    assert step["samples_per_s"] == pytest.approx(8 / step["median_step_s"])
    cfg = config.resolve("coca", ["model=micro", "train.batch_size=8"])
    # the counter of `vlpt compare --flops` (fp32, a batch of flops.COUNT_BATCH = 8): the same count
    assert step["flops_per_sample"] == pytest.approx(flops_per_sample(cfg, recipe_vocab(cfg)), rel=1e-6)
    assert step["mfu_pct"] == pytest.approx(100 * step["flops_per_sample"] * step["samples_per_s"]
                                            / (step["matmul_peak_GFLOPs"] * 1e9))
    assert step["matmul_peak_size"] in bench.PEAK_SIZES["cpu"] and 0 < step["mfu_pct"] < 100
    assert r["data"]["samples_per_s"] > 0 and r["loop"]["samples_per_s"] > 0
    assert r["loop"]["share_of_step_pct"] == pytest.approx(100 * r["loop"]["samples_per_s"] / step["samples_per_s"])
    assert {"images_per_s", "captions_per_s_greedy", "captions_per_s_beam"} <= set(r["eval"])  # coca captions


def test_matmul_peak_is_the_best_size_and_bench_mistakes_are_one_line(capsys):
    peak, n = bench.matmul_peak(torch.float32, torch.device("cpu"), tries=2)
    assert n in bench.PEAK_SIZES["cpu"] and 1e8 < peak < 1e13  # somewhere between a slow and a huge CPU
    assert cli_main(["bench", "clip", "--parts", "step,disk"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --parts step,disk: unknown part 'disk'; parts: step, data, loop, eval"]
