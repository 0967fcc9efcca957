"""Towers: pooling options, EOT pooling ignores padding, activation checkpointing changes no gradient."""
import pytest
import torch

from vlpt import config
from vlpt.data.tokenizer import Vocab
from vlpt.models.model import ImageTextModel

EOT = 2


def micro(**over):
    cfg = config.resolve("clip", ["model=micro", "train.steps=1"] + [f"{k}={v}" for k, v in over.items()])
    torch.manual_seed(0)
    return ImageTextModel(cfg.model, Vocab(50, eot=EOT))


def images(b=4):
    return torch.randint(0, 256, (b, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def texts():
    t = torch.tensor([[1, 7, 8, 9, EOT, 0, 0, 0], [1, 10, EOT, 0, 0, 0, 0, 0]])
    return t


@pytest.mark.parametrize("pool", ["cls", "gap", "max", "map"])
def test_pooling_options(pool):
    m = micro(**{"model.vision.pool": pool})
    pooled, tokens = m.visual(images())
    assert pooled.shape == (4, 64) and tokens.shape == (4, 16, 64)  # 32/8 = 4x4 patches, no cls in tokens
    if pool == "gap":
        torch.testing.assert_close(pooled, tokens.mean(1))
    if pool == "max":
        torch.testing.assert_close(pooled, tokens.amax(1))
    emb = m.encode_image(images())
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))


def test_text_feature_is_taken_at_eot_and_ignores_padding():
    m = micro()
    t = texts()
    other_padding = t.clone()
    other_padding[0, 5:] = 33  # garbage after <eot> must not change the text embedding
    torch.testing.assert_close(m.encode_text(t), m.encode_text(other_padding))
    changed_prefix = t.clone()
    changed_prefix[0, 2] = 40
    assert not torch.allclose(m.encode_text(t)[0], m.encode_text(changed_prefix)[0])


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        m = micro(**{"model.grad_checkpointing": str(ckpt).lower()})
        loss = (m.encode_image(images(2)) * m.encode_text(texts())).sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_bad_shapes_fail_before_any_work():
    with pytest.raises(config.ConfigError, match="patch_size"):
        config.resolve("clip", ["model.vision.image_size=30", "model.vision.patch_size=8"])
    with pytest.raises(config.ConfigError, match="heads"):
        config.resolve("clip", ["model.text.heads=3"])
    with pytest.raises(config.ConfigError, match="exactly one budget"):
        config.resolve("clip", ["train.epochs=1", "train.samples=10", "train.steps=null"])
