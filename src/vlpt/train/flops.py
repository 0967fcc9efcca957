"""Model FLOPs of a recipe's training step, counted (torch.utils.flop_counter) rather than estimated.

One step is the training loop's own: the recipe's views, forward, losses and backward, on a random batch
of full-length captions (every text position real: the most a caption loss computes). FlopCounterMode counts
matrix multiplications, convolutions and attention, which are nearly all of a transformer's work; the
optimizer's elementwise update is not counted. Attention's backward counts 2.5x its forward when a fused
kernel runs (it recomputes the scores; fp32 here) and 2x when autocast takes the unfused path. `vlpt compare --flops` turns a FLOPs budget into each
recipe's samples with it, and `vlpt bench` divides it by the step time for MFU.
"""
from __future__ import annotations

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from vlpt.config import Config
from vlpt.data.tokenizer import Vocab

COUNT_BATCH = 8  # per-sample FLOPs barely depend on the batch (only the B x B similarities do)


def _count_cpu_attention() -> None:
    """torch counts the GPU attention kernels but not the CPU one that F.scaled_dot_product_attention
    dispatches to: count it with the same formulas (without this, attention's matmuls go missing on CPU)."""
    aten = torch.ops.aten
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", flop_counter.sdpa_flop),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", flop_counter.sdpa_backward_flop)):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula.__wrapped__ if hasattr(formula, "__wrapped__") else formula)


_count_cpu_attention()


def random_batch(cfg: Config, vocab: Vocab, batch: int, device: torch.device | str = "cpu") -> dict:
    """Images (uint8, as the data pipeline gives them), full-length captions <sot> words <eot>, and the
    recipe's views of both."""
    from vlpt.data.views import ImageViews

    g = torch.Generator().manual_seed(0)
    s, length = cfg.model.vision.image_size, cfg.model.text.context_length
    specials = max(vocab.pad, vocab.sot, vocab.eot, vocab.mask) + 1
    text = torch.randint(specials, vocab.size, (batch, length), generator=g)
    text[:, 0], text[:, -1] = vocab.sot, vocab.eot
    image = torch.randint(0, 256, (batch, 3, s, s), generator=g, dtype=torch.uint8)
    out = {"image": image.to(device), "text": text.to(device)}
    if cfg.views.text_views.count:  # the text views' FLOPs are those of any caption of the same length
        out["text_views"] = out["text"].expand(cfg.views.text_views.count, -1, -1)
    out.update(ImageViews(cfg.views, cfg.train.seed, 0)(out["image"], 1))  # as the loop adds them on the device
    return out


def step_flops(cfg: Config, vocab: Vocab, batch: int = COUNT_BATCH) -> float:
    """FLOPs of one training step (forward + backward) on `batch` samples of this config, on CPU in fp32."""
    from vlpt.train.optim import build_optimizer
    from vlpt.train.pretrainer import build
    from vlpt.train.step import StepParts, train_step

    torch.manual_seed(0)
    module = build(cfg, vocab).train()
    parts = StepParts(module, build_optimizer(module, cfg.train), grad_clip=cfg.train.grad_clip)
    data = random_batch(cfg, vocab, batch)
    with FlopCounterMode(display=False) as counter:
        train_step(parts, data, 1, 1)
    return float(counter.get_total_flops())


def flops_per_sample(cfg: Config, vocab: Vocab) -> float:
    return step_flops(cfg, vocab) / COUNT_BATCH


def recipe_vocab(cfg: Config) -> Vocab:
    """The vocabulary a run of this config will have: the tokenizer the training loop makes (from
    tokenizer.path, an inherited tower, MiniLM, or trained on the data's captions), made in a scratch folder."""
    import tempfile
    from pathlib import Path

    from vlpt.data.sources import open_source
    from vlpt.train.data import make_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return make_tokenizer(cfg, lambda: open_source(cfg.data.source).captions, Path(tmp)).vocab


def recipe_flops_per_sample(cfg: Config) -> float:
    """Per-sample training FLOPs of a run of this config, with the vocabulary its run would have."""
    return flops_per_sample(cfg, recipe_vocab(cfg))
