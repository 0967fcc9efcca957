"""train.compile works for every recipe: the compiled module (torch.compile of the whole Pretrainer, as the
training loop and `vlpt bench` compile it) gives eager's loss and gradients. Every recipe is traced with
the aot_eager backend (Dynamo and AOTAutograd, the parts that fail on unsupported code); CLIP and CoCa also
go through Inductor's generated kernels, where a C++ compiler is at hand."""
import copy
import shutil

import pytest
import torch

from vlpt import config
from vlpt.data.tokenizer import Vocab
from vlpt.train.flops import random_batch
from vlpt.train.pretrainer import build

RECIPES = [r for r in config.available_recipes() if not r.endswith("-flickr8k")]


def eager_and_compiled(recipe: str, backend: str):
    lock = ["model.lock=[]"] if recipe == "lit" else []  # locked below: model.init would need a run folder
    cfg = config.resolve(recipe, ["model=micro", "train.steps=1", "train.batch_size=8", *lock])
    torch.manual_seed(0)
    eager = build(cfg, Vocab(300)).train()
    if recipe == "lit":
        eager.model.lock("vision")
    compiled = copy.deepcopy(eager)
    batch = random_batch(cfg, Vocab(300), 8)
    results = []
    for module, run in ((eager, eager), (compiled, torch.compile(compiled, backend=backend))):
        torch.manual_seed(1)  # the same masks and noise in both
        loss, _ = run(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    return results


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_compiles_to_the_same_loss_and_gradients(recipe):
    torch._dynamo.reset()
    (want_loss, want), (got_loss, got) = eager_and_compiled(recipe, "aot_eager")
    torch.testing.assert_close(got_loss, want_loss)
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="Inductor's CPU kernels need a C++ compiler")
@pytest.mark.parametrize("recipe", ["clip", "coca"])
def test_inductor_kernels_give_eagers_loss_and_gradients(recipe):
    torch._dynamo.reset()
    (want_loss, want), (got_loss, got) = eager_and_compiled(recipe, "inductor")
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
