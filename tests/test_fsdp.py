"""train.fsdp: 2 processes sharded with FSDP2 (gloo, CPU) train like one process on the global batch, their
checkpoints resume on another number of processes, and what FSDP does not support is refused in one line."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlpt import config
from vlpt.config import ConfigError

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:  # pragma: no cover - torch before 2.6
    fully_shard = None

needs_fsdp = pytest.mark.skipif(fully_shard is None, reason="torch.distributed.fsdp.fully_shard is unavailable")

# as tests/test_distributed.py: views that depend on neither the rank nor the number of processes
COMMON = ["model=micro", "train.warmup_steps=1", "views.image.crop_scale=[1,1]", "train.precision=fp32",
          "train.log_every=1", "eval.tasks=[]", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out: Path, args: list[str], processes: int = 1) -> None:
    launch = [sys.executable, "-m", "vlpt"]
    if processes > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
                  "127.0.0.1", "--master_port", str(_free_port()), "-m", "vlpt"]
    proc = subprocess.run([*launch, "train", *args, "--out", str(out)], env=ENV, capture_output=True, text=True,
                          timeout=400)
    if processes > 1 and "fully_shard" in proc.stderr and "gloo" in proc.stderr.lower() and proc.returncode:
        pytest.skip(f"gloo lacks a collective FSDP2 needs on CPU: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]


def _weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


# SLIP: batch norms in a head, synchronised before sharding; eps=1 as in tests/test_distributed.py's SLIP
SLIP = ["slip", "train.batch_size=16", "views.image_views.preset=null", "views.image_views.crop_scale=[1,1]",
        "objectives.simclr.hidden=32", "train.eps=1.0", "train.lr=0.1"]


@pytest.mark.parametrize("recipe", [["clip", "train.batch_size=16"], ["cap", "train.batch_size=8", "train.accum_steps=2"],
                                    SLIP], ids=["clip", "cap-accum", "slip"])
@needs_fsdp
def test_fsdp_matches_ddp(tmp_path, recipe):
    """Sharded over 2 processes: the losses (rank 0's, as logged) and parameters of DDP on 2 processes (which
    tests/test_distributed.py holds to 1 process); model.safetensors holds the full weights under the usual
    names; with accum_steps the gradients sync in the last backward only."""
    from vlpt.train import checkpoint

    args = [*recipe, "train.steps=3", *COMMON]
    _train(tmp_path / "fsdp", [*args, "train.fsdp=true"], processes=2)
    _train(tmp_path / "ddp", args, processes=2)
    ddp, two = (checkpoint.latest(tmp_path / r / "checkpoints") for r in ("ddp", "fsdp"))
    _assert_close(_weights(ddp), _weights(two))
    torch.testing.assert_close(_losses(tmp_path / "fsdp"), _losses(tmp_path / "ddp"), atol=1e-5, rtol=1e-5)
    assert (two / "optim-dcp" / ".metadata").is_file() and checkpoint.problem(two) is None  # in the manifest


@needs_fsdp
def test_fsdp_checkpoint_resumes_on_one_process(tmp_path):
    """A 2-process FSDP run's step-2 checkpoint, resumed on 1 process (train.fsdp still true: no sharding in one
    process), reaches the uninterrupted run's step-4 parameters; the restored Adam moments are the saved ones."""
    from vlpt.train import checkpoint

    args = ["clip", "train.batch_size=16", "train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep=5", *COMMON]
    _train(tmp_path / "fsdp", [*args, "train.fsdp=true"], processes=2)
    shutil.copytree(tmp_path / "fsdp", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000004")
    _train(tmp_path / "resumed", ["clip", "--quiet", "--resume"])
    done = [checkpoint.latest(tmp_path / r / "checkpoints") for r in ("fsdp", "resumed")]
    assert [c.name for c in done] == ["step-00000004"] * 2
    _assert_close(*(_weights(c) for c in done))
    assert isinstance(checkpoint.load_state(done[1])["optimizer"], dict)  # one process saves it whole again
    _check_moments(tmp_path / "fsdp" / "checkpoints" / "step-00000002")


@needs_fsdp
def test_a_checkpoint_saved_without_fsdp_resumes_sharded(tmp_path):
    """A 1-process checkpoint (the optimizer whole in state.pt) resumed on 2 FSDP processes reaches the
    uninterrupted 1-process run's parameters: the whole state is split like the parameters."""
    from vlpt.train import checkpoint

    args = ["clip", "train.batch_size=16", "train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep=5", *COMMON]
    _train(tmp_path / "one", args)
    shutil.copytree(tmp_path / "one", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000004")
    _train(tmp_path / "resumed", ["clip", "--quiet", "--resume", "train.fsdp=true"], processes=2)
    done = [checkpoint.latest(tmp_path / r / "checkpoints") for r in ("one", "resumed")]
    assert [c.name for c in done] == ["step-00000004"] * 2 and (done[1] / "optim-dcp").is_dir()
    _assert_close(*(_weights(c) for c in done))


def _check_moments(ckpt: Path) -> None:
    """The sharded optimizer state loaded into one unsharded process equals the saved shards, read whole."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from vlpt.data.tokenizer import TextTokenizer
    from vlpt.train import checkpoint, fsdp
    from vlpt.train.optim import build_optimizer
    from vlpt.train.pretrainer import build

    weights, meta = checkpoint.load_weights(ckpt)
    cfg = config.from_dict(json.loads(meta["config"]))
    module = build(cfg, TextTokenizer.from_str(meta["tokenizer"], cfg.model.text.context_length).vocab)
    module.load_state_dict(weights)
    optimizer = build_optimizer(module, cfg.train)
    fsdp.load_optimizer(module, optimizer, ckpt / fsdp.OPTIM_DIR)
    whole = ckpt.parent / "whole.pt"
    dcp_to_torch_save(str(ckpt / fsdp.OPTIM_DIR), str(whole))
    saved = torch.load(whole, weights_only=False)["state"]
    names = {p: n for n, p in module.named_parameters()}
    restored = {names[p]: s for p, s in optimizer.state.items()}
    assert restored.keys() == saved.keys() and len(saved) > 20
    for name, s in saved.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(restored[name][key], s[key]), (name, key)


@pytest.mark.parametrize("recipe,overrides,named", [
    ("clip", ["train.ema=0.5"], "train.ema"),
    ("byolip", [], "objectives.byol"),
    ("clip", ["train.compile=true"], "train.compile"),
    ("clip", ["train.accum_steps=2"], "train.accum_steps=2"),
    ("clip", ["train.precision=fp16"], "train.precision=fp16"),
])
def test_fsdp_refuses_what_it_does_not_support(recipe, overrides, named):
    with pytest.raises(ConfigError) as err:
        config.resolve(recipe, ["model=micro", "train.steps=1", "train.fsdp=true", *overrides])
    message = str(err.value)
    assert "\n" not in message and message.startswith("train.fsdp=true:") and named in message, message
    config.resolve(recipe, ["model=micro", "train.steps=1", *overrides])  # fine without train.fsdp


def test_cap_accumulates_under_fsdp():
    """Captioning's loss is per example: plain accumulation is exact, so FSDP takes accum_steps."""
    assert config.resolve("cap", ["model=micro", "train.steps=1", "train.fsdp=true", "train.accum_steps=2"])
