"""Exact and lean losses: the chunked caption loss equals the dense one without building its logits, and
exact gradient accumulation (GradCache) equals the full-batch step.

Run under torchrun with an output path, this file is also the worker of the two-process test.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))
import dist_grad_worker as worker  # noqa: E402

from vlpt import config  # noqa: E402
from vlpt.data.tokenizer import Vocab  # noqa: E402
from vlpt.models.model import ImageTextModel  # noqa: E402
from vlpt.objectives import OBJECTIVES, linear_ce  # noqa: E402
from vlpt.train import exact_accum  # noqa: E402
from vlpt.train.microbatch import split  # noqa: E402
from vlpt.train.pretrainer import Pretrainer, build  # noqa: E402
from vlpt.train.step import StepParts, backward  # noqa: E402

PAD, SOT, EOT, MASK = 0, 1, 2, 3
V, L = 40, 12


def coca(overrides=(), seed=0) -> Pretrainer:
    torch.manual_seed(seed)
    cfg = config.resolve("coca", ["model=micro", "train.steps=1", f"model.text.context_length={L}", *overrides])
    module = build(cfg, Vocab(V, PAD, SOT, EOT, MASK))
    head = module.model.decoder.head  # zero-initialised: every token would be equally likely
    torch.nn.init.normal_(head.weight, std=0.5)
    torch.nn.init.normal_(head.bias, std=0.5)
    return module


def batch_of(lengths, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = torch.full((len(lengths), L), PAD)
    for row, n in zip(text, lengths):
        row[0] = SOT
        row[1 : 1 + n] = torch.randint(5, V, (n,), generator=g)
        if 1 + n < L:
            row[1 + n] = EOT
    image = torch.randint(0, 256, (len(lengths), 3, 32, 32), generator=g, dtype=torch.uint8)
    return {"image": image, "text": text}


def dense_caption_loss(outputs: dict, batch: dict) -> torch.Tensor:
    """The loss as the objective computed it before: all logits, fp32, cross-entropy over [B,V,L-1]."""
    logits, real = outputs["caption_logits"], outputs["caption_mask"]
    with torch.autocast("cpu", enabled=False):
        nll = F.cross_entropy(logits.float().transpose(1, 2), batch["text"][:, 1:], reduction="none")
    return ((nll * real).sum(1) / real.sum(1).clamp(min=1)).mean()


def loss_and_grads(module: Pretrainer, batch: dict, dense: bool, bf16: bool = False):
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = module.model(batch, module.needs | {"caption_logits"})
        loss = dense_caption_loss(out, batch) if dense else module.objectives["captioning"](out, batch)[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


# the lengths: words before <eot>; 11 fills the context (no <eot>, no padding)
LENGTHS = [3, 6, 10, 1, 11]


@pytest.mark.parametrize("softmax_rows", [0, 4])
def test_chunked_caption_loss_equals_the_dense_loss_and_gradients_in_fp32(softmax_rows, monkeypatch):
    """softmax_rows=4: each chunk's softmax runs over blocks of 4 rows (4, then 2: ragged too)."""
    if softmax_rows:
        monkeypatch.setattr(linear_ce, "SOFTMAX_LOGITS", softmax_rows * V)
    module = coca(["objectives.captioning.chunk_tokens=6"])  # 35 real tokens: 5 full chunks and a ragged one
    batch = batch_of(LENGTHS)
    want_loss, want = loss_and_grads(module, batch, dense=True)
    got_loss, got = loss_and_grads(module, batch, dense=False)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-6)
    assert got.keys() == want.keys() and len(want) > 100  # every parameter the loss reaches
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_chunked_caption_loss_under_bf16_autocast_is_as_accurate_as_the_dense_one():
    """Both paths run the same bf16 matmuls and the same fp32 softmax; they differ only in the output layer:
    the dense loss rounds d loss / d logits to bf16 once, the chunked one once per chunk (summed in fp32; the
    bias's gradient is not rounded at all). One bf16 rounding is at most 2^-9 relative, so the two agree to a
    few of them (2^-7). Against the same loss in fp32 on the same bf16 hidden states, the chunked output
    layer's gradients must be no farther off than the dense one's."""
    module = coca(["objectives.captioning.chunk_tokens=6"])
    batch = batch_of(LENGTHS)
    head, hidden = module.model.decoder.head, []
    hook = head.register_forward_pre_hook(lambda _, args: hidden.append(args[0].detach()))
    dense_loss, dense = loss_and_grads(module, batch, dense=True, bf16=True)
    hook.remove()
    got_loss, got = loss_and_grads(module, batch, dense=False, bf16=True)
    torch.testing.assert_close(got_loss, dense_loss, atol=0, rtol=1e-5)  # the same bf16 logits, fp32 sums
    assert got.keys() == dense.keys() and len(dense) > 100
    for name in dense:
        assert (got[name] - dense[name]).norm() <= 2**-7 * dense[name].norm(), name

    weight, bias = (p.detach().bfloat16().float().requires_grad_() for p in (head.weight, head.bias))
    logits = F.linear(hidden[0].bfloat16().float(), weight, bias)  # the values the bf16 matmul multiplied
    mask = module.model(batch, module.needs | {"caption_logits"})["caption_mask"]
    exact = torch.autograd.grad(dense_caption_loss({"caption_logits": logits, "caption_mask": mask}, batch),
                                (weight, bias))
    for name, want in zip(("weight", "bias"), exact):
        name = f"model.decoder.head.{name}"
        assert (got[name] - want).norm() <= 1.05 * (dense[name] - want).norm(), name


class LogitRows(TorchDispatchMode):
    """Every computed (not viewed) tensor whose last dimension is the vocabulary: how many rows it has."""

    def __init__(self):
        super().__init__()
        self.rows, self.matmul_rows = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not func.is_view and t.dim() >= 2 and t.shape[-1] == V:
                self.rows.append(t.numel() // V)
                if func.__name__.startswith(("addmm", "mm")):
                    self.matmul_rows += t.shape[0]
        return out


def test_caption_loss_computes_logits_only_for_real_tokens_one_chunk_at_a_time():
    module = coca(["objectives.captioning.chunk_tokens=4"])
    batch = batch_of(LENGTHS)
    out = module.model(batch, module.needs)
    assert "caption_logits" not in out
    seen = LogitRows()
    with seen:
        loss, metrics = module.objectives["captioning"](out, batch)
        loss.backward()
    real = int(out["caption_mask"].sum())
    assert real == sum(n + 1 for n in LENGTHS) - 1  # each example's words and <eot>; the full one has no <eot>
    assert seen.matmul_rows == real  # logits of the real targets only, each computed once (no recomputation)
    assert max(seen.rows) == 4  # never more than one chunk's logits (the dense loss holds B*(L-1) rows)
    dense = module.model(batch, module.needs | {"caption_logits"})
    acc = ((dense["caption_logits"].argmax(-1) == batch["text"][:, 1:]) & dense["caption_mask"]).sum() / real
    assert metrics["token_acc"].item() == pytest.approx(acc.item())


def test_chunk_tokens_must_not_be_negative():
    with pytest.raises(config.ConfigError, match=r"objectives.captioning: chunk_tokens=-1 must be >= 0"):
        config.resolve("coca", ["model=micro", "train.steps=1", "objectives.captioning.chunk_tokens=-1"])


# ------------------------------------------------------------------------------------ exact accumulation
def grads_of(module: torch.nn.Module) -> dict:
    out = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


def test_gradcache_over_four_micro_batches_equals_the_full_batch_step():
    """CoCa (contrastive + captioning) with CapPa's per-example switches: exact accumulation gives the loss and
    the gradient of every parameter of one full-batch step; plain accumulation does not (its negatives are
    per micro-batch)."""
    module = coca(["objectives.captioning.parallel_prob=0.5"]).train()
    batch = batch_of([3, 6, 10, 1, 11, 4, 2, 7])
    torch.manual_seed(5)  # the same parallel switches in both: drawn once, on the whole batch
    loss, metrics = module(batch)
    loss.backward()
    want = grads_of(module)
    torch.manual_seed(5)
    got_loss, got_metrics = exact_accum.exact_backward(StepParts(module, None, accum_steps=4), batch)
    got = grads_of(module)
    torch.testing.assert_close(got_loss, loss.detach(), atol=1e-6, rtol=1e-6)
    assert got_metrics.keys() == metrics.keys() and 0 < metrics["captioning/parallel_fraction"] < 1
    assert got.keys() == want.keys() and len(want) > 100
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    torch.manual_seed(5)
    plain_loss, _ = backward(StepParts(module, None, accum_steps=4, exact=False), batch)
    assert abs(plain_loss.item() - loss.item()) > 1e-2


def rocket(dropout: float) -> Pretrainer:
    """Contrastive + CL2L (heads with batch norm, text views through the text tower with dropout)."""
    torch.manual_seed(0)
    cfg = config.resolve("clip", ["model=micro", "train.steps=1"]).model
    objs = {"contrastive": OBJECTIVES["contrastive"]({}, cfg), "cl2l": OBJECTIVES["cl2l"]({"hidden": 16, "dim": 8}, cfg)}
    needs = frozenset().union(*(o.needs for o in objs.values()))
    model = ImageTextModel(cfg, Vocab(worker.VOCAB, eot=worker.EOT), needs, text_view_dropout=dropout)
    return Pretrainer(model, objs, {"contrastive": 1.0, "cl2l": 1.0}).train()


def test_gradcache_replays_each_micro_batch_with_its_own_random_state(monkeypatch):
    """With dropout the reference is the full-batch loss on the outputs of the micro-batches' forward passes,
    run in order: the recomputation must draw the same masks, and leave the RNG where one pass leaves it."""
    module, batch = rocket(dropout=0.3), worker.global_batch()
    torch.manual_seed(7)
    prepared = module.prepare(batch)
    parts = [module.model(chunk, module.needs) for chunk in split(prepared, 4)]
    outputs = {k: torch.cat([p[k] for p in parts], dim=1 if k.endswith("_views") else 0) for k in parts[0]}
    loss, _ = module.losses(outputs, prepared)
    loss.backward()
    want, rng_after = grads_of(module), torch.get_rng_state()

    torch.manual_seed(7)
    got_loss, _ = exact_accum.exact_backward(StepParts(module, None, accum_steps=4), batch)
    got = grads_of(module)
    torch.testing.assert_close(got_loss, loss.detach(), atol=1e-6, rtol=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    assert torch.equal(torch.get_rng_state(), rng_after)

    monkeypatch.setattr(exact_accum.RngState, "restore", lambda self: None)  # fresh masks in the recomputation
    torch.manual_seed(7)
    exact_accum.exact_backward(StepParts(module, None, accum_steps=4), batch)
    wrong = grads_of(module)
    assert not torch.allclose(wrong["model.text.token_embed.weight"], want["model.text.token_embed.weight"], atol=1e-4)


def test_exact_accumulation_is_chosen_when_an_objective_couples_examples():
    def exact(recipe, accum, **kw):
        cfg = config.resolve(recipe, ["model=micro", "train.steps=1"])
        return StepParts(build(cfg, Vocab(V, PAD, SOT, EOT, MASK)), None, accum_steps=accum, **kw).exact

    assert exact("coca", 2) and exact("clip", 4)
    assert not exact("cap", 2)  # per-example losses: plain accumulation is already exact
    assert not exact("coca", 1) and not exact("coca", 2, exact=False)


# ------------------------------------------------------------------------------------ two processes
def save_rank0_exact_grads(out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from vlpt.train import distributed

    rank, world = distributed.rank(), distributed.world_size()
    module = distributed.convert_sync_batchnorm(worker.make("contrastive+simclr", {}))
    ddp = DistributedDataParallel(module)
    b = worker.GLOBAL_BATCH // world
    batch = {k: v.narrow(1 if k.endswith("_views") else 0, rank * b, b) for k, v in worker.global_batch().items()}
    loss, _ = exact_accum.exact_backward(StepParts(module, None, ddp=ddp, accum_steps=2), batch)
    torch.distributed.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / world, "grads": worker.grads(module)}, out)


@pytest.mark.slow
def test_two_processes_with_exact_accumulation_match_one_process_on_the_global_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, str(tmp_path / "grads.pt")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / "grads.pt")
    one = worker.one_process("contrastive+simclr")
    torch.testing.assert_close(two["loss"], one["loss"], atol=1e-6, rtol=1e-5)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 20
    for name, want in one["grads"].items():  # float noise of the all-reduced sums: ~1e-5 of the largest entry
        assert (two["grads"][name] - want).abs().max() <= 2e-5 * max(1.0, want.abs().max().item()), name


if __name__ == "__main__":
    from vlpt.train import distributed

    distributed.setup()
    save_rank0_exact_grads(sys.argv[1])
    distributed.teardown()
