"""A 2-process (gloo) run gives the same gradients as one process on the same global batch."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import dist_grad_worker as worker  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("objective,local_loss", [("contrastive", "1"), ("contrastive", "0"), ("sigmoid", "1")])
def test_two_processes_match_one_process(tmp_path, objective, local_loss):
    two = worker.run_two_processes(tmp_path / "grads.pt", objective, local_loss)
    one = worker.one_process(objective, {"local_loss": local_loss == "1"} if objective == "contrastive" else {})
    torch.testing.assert_close(two["loss"], one["loss"], atol=1e-6, rtol=1e-5)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 20
    for name in one["grads"]:
        torch.testing.assert_close(two["grads"][name], one["grads"][name], atol=1e-5, rtol=1e-4, msg=name)


# SLIP's head has batch norms (synchronised by the loop under DDP). Adam's eps=1e-8 would turn the float noise
# in gradients that are 0 in exact arithmetic (the biases before a batch norm) into lr-sized steps; with eps=1
# the update follows the gradient, so the comparison measures gradients. Views off: they are drawn per rank.
SLIP = ["slip", "train.steps=3", "train.batch_size=16", "views.image_views.preset=null",
        "views.image_views.crop_scale=[1,1]",
        "objectives.simclr.hidden=32", "train.eps=1.0", "train.lr=0.1"]


@pytest.mark.parametrize("recipe", [["clip", "train.steps=4", "train.batch_size=32"], SLIP], ids=["clip", "slip"])
def test_torchrun_training_matches_one_process(tmp_path, recipe):
    """`torchrun -m vlpt train` needs no code change, and 2 processes train like 1 with the global batch."""
    from safetensors.torch import load_file

    from vlpt.train import checkpoint

    args = [*recipe, "model=micro", "train.warmup_steps=1", "views.image.crop_scale=[1,1]", "train.precision=fp32",
            "train.ema=0.5", "eval.tasks=[]", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), "-m", "vlpt", "train", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "vlpt", "train", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (load_file(str(checkpoint.latest(tmp_path / r / "checkpoints") / "model.safetensors")) for r in ("one", "two"))
    assert any(k.startswith("ema.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
