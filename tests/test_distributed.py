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
    out = tmp_path / "grads.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(worker.__file__)), str(out), objective, local_loss]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(out)

    single = worker.make(objective, {"local_loss": local_loss == "1"} if objective == "contrastive" else {})
    loss, _ = single(worker.global_batch())
    loss.backward()
    one = worker.grads(single)

    assert one.keys() == two.keys() and len(one) > 20
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
