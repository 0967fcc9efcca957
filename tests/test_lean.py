"""Lean losses: the chunked caption loss equals the dense one without building its logits."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vlpt import config
from vlpt.data.tokenizer import Vocab
from vlpt.train.pretrainer import Pretrainer, build

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


def test_chunked_caption_loss_equals_the_dense_loss_and_gradients_in_fp32():
    module = coca(["objectives.captioning.chunk_tokens=6"])  # 35 real tokens: 5 full chunks and a ragged one
    batch = batch_of(LENGTHS)
    want_loss, want = loss_and_grads(module, batch, dense=True)
    got_loss, got = loss_and_grads(module, batch, dense=False)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-6)
    assert got.keys() == want.keys() and len(want) > 100  # every parameter the loss reaches
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_chunked_caption_loss_under_bf16_autocast_is_as_accurate_as_the_dense_one():
    """Both paths run the same bf16 matmuls and the same fp32 softmax; they differ only where the output layer's
    gradient, a sum over tokens, is rounded to bf16: once for the dense loss, once per chunk here (then summed
    in fp32). One bf16 rounding is at most 2^-9 relative, so the two agree to a few of them (2^-7), and the
    chunked one must be no farther from the fp32 gradient than the dense one is."""
    module = coca(["objectives.captioning.chunk_tokens=6"])
    batch = batch_of(LENGTHS)
    _, exact = loss_and_grads(module, batch, dense=True)
    dense_loss, dense = loss_and_grads(module, batch, dense=True, bf16=True)
    got_loss, got = loss_and_grads(module, batch, dense=False, bf16=True)
    torch.testing.assert_close(got_loss, dense_loss, atol=0, rtol=1e-5)  # the same bf16 logits, fp32 sums
    assert got.keys() == dense.keys() == exact.keys()
    for name in exact:
        scale = dense[name].norm()
        assert (got[name] - dense[name]).norm() <= 2**-7 * scale, name
        assert (got[name] - exact[name]).norm() <= 1.05 * (dense[name] - exact[name]).norm() + 1e-6 * scale, name


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
