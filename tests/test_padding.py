"""Trailing padding is dropped from training batches (Pretrainer.trim_padding) only where no loss reads it:
every recipe that declares itself padding-free gives the same loss and gradients on the trimmed batch, the
others are left whole, and the training loop trims what it trains on."""
import pytest
import torch

from vlpt import config
from vlpt.data.tokenizer import Vocab
from vlpt.train import loop
from vlpt.train.flops import random_batch
from vlpt.train.pretrainer import Pretrainer, build

RECIPES = [r for r in config.available_recipes() if not r.endswith("-flickr8k")]
VOCAB = Vocab(300)
READ_PADDING = {"cappa", "m3ae"}  # CapPa's parallel rows attend to every position; M3AE masks a share of all


def padded_batch(cfg, lengths):
    """random_batch's captions cut to `lengths` real tokens (<sot> words <eot>), then padding."""
    batch = random_batch(cfg, VOCAB, len(lengths))
    text = batch["text"].clone()
    for row, n in enumerate(lengths):
        text[row, n - 1], text[row, n:] = VOCAB.eot, VOCAB.pad
    batch["text"] = text
    if "text_views" in batch:  # each view with its own length, none longer than 7 tokens
        views = text[None].repeat(batch["text_views"].shape[0], 1, 1)
        views[0, 0, 3:] = VOCAB.pad
        batch["text_views"] = views
    return batch


def loss_and_grads(module, batch):
    torch.manual_seed(1)  # the same masks and noise in both runs
    module.zero_grad(set_to_none=True)
    loss, _ = module(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recipe", RECIPES)
def test_trimmed_batches_give_the_same_loss_and_gradients(recipe):
    lock = ["model.lock=[]"] if recipe == "lit" else []  # model.init would need a run folder
    # text-view dropout draws one number per position, so its masks differ with the length: off here
    cfg = config.resolve(recipe, ["model=micro", "train.steps=1", "views.text_views.dropout=0", *lock])
    torch.manual_seed(0)
    module = build(cfg, VOCAB).train().double()  # float64: matmuls of other lengths round differently
    batch = padded_batch(cfg, [5, 7, 4, 6])  # the context is 24; the longest caption, 7 tokens, rounds up to 8
    trimmed = module.trim_padding(batch)
    if recipe in READ_PADDING:
        assert not module.padding_free and trimmed is batch
        return
    assert module.padding_free
    assert trimmed["text"].shape == (4, 8) and torch.equal(trimmed["text"], batch["text"][:, :8])
    if "text_views" in batch:
        assert trimmed["text_views"].shape[-1] == 8
    want_loss, want = loss_and_grads(module, batch)
    got_loss, got = loss_and_grads(module, trimmed)
    torch.testing.assert_close(got_loss, want_loss)
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_trimming_keeps_the_longest_caption_and_whole_contexts():
    cfg = config.resolve("clip", ["model=micro", "train.steps=1"])
    module = build(cfg, VOCAB)
    assert module.trim_padding(padded_batch(cfg, [9, 3]))["text"].shape[1] == 16  # 9 -> 16: multiples of 8
    assert module.trim_padding(padded_batch(cfg, [17, 3]))["text"].shape[1] == 24  # the whole context
    batch = padded_batch(cfg, [24, 3])
    assert module.trim_padding(batch) is batch
    assert module.trim_padding(padded_batch(cfg, [9, 3]), multiple=1)["text"].shape[1] == 9


def test_open_clip_style_decoder_is_not_trimmed():
    """Its [CLS] follows all L positions and sees the first padding token (imported weights keep that)."""
    cfg = config.resolve("coca", ["model=micro", "train.steps=1", "model.decoder.style=open_clip"])
    module = build(cfg, VOCAB)
    batch = padded_batch(cfg, [5, 4])
    assert not module.padding_free and module.trim_padding(batch) is batch


def test_the_training_loop_trains_on_trimmed_batches(tmp_path, monkeypatch):
    lengths = []
    forward = Pretrainer.forward

    def spy(self, batch):
        lengths.append(batch["text"].shape[1])
        return forward(self, batch)

    monkeypatch.setattr(Pretrainer, "forward", spy)
    cfg = config.resolve("clip", ["model=micro", "model.text.context_length=64", "train.batch_size=16",
                                  "train.steps=2", "eval.tasks=[]"])
    loop.train(cfg, tmp_path, progress=False)
    assert len(lengths) == 2 and max(lengths) <= 40  # scene captions have at most 30-odd tokens


def test_a_compiled_module_takes_batches_of_several_trimmed_lengths():
    """torch.compile (train.compile) meets a new text length at most every few steps: it recompiles, once
    with the length dynamic, and gives eager's loss on each."""
    torch._dynamo.reset()
    cfg = config.resolve("clip", ["model=micro", "train.steps=1"])
    torch.manual_seed(0)
    module = build(cfg, VOCAB).train()
    compiled = torch.compile(module, backend="aot_eager")
    for lengths in ([5, 7], [12, 3], [20, 9], [4, 6]):
        batch = module.trim_padding(padded_batch(cfg, lengths))
        torch.testing.assert_close(compiled(batch)[0], module(batch)[0])
