"""Learning on real data (../shared/data): skipped where that folder is absent."""
import pytest

from vlpt import config
from vlpt.data.sources import shared_data_dir
from vlpt.train import loop

needs_cifar = pytest.mark.skipif(
    shared_data_dir() is None or not (shared_data_dir() / "cifar10").is_dir(), reason="no ../shared/data/cifar10"
)


@needs_cifar
def test_clip_on_cifar10_labels_as_text_beats_chance(tmp_path):
    """Labels as text on CIFAR-10 train (10,000 images), then zero-shot on the 10,000 test images."""
    cfg = config.resolve("clip", [
        "model=micro", "data=cifar10:train", "train.steps=150", "train.batch_size=64", "train.lr=2e-3",
        "train.warmup_steps=10", "eval.tasks=[zeroshot:cifar10:test]", "eval.templates=simple",
    ])
    results = loop.train(cfg, tmp_path, progress=False)
    assert results["zeroshot:cifar10:test/top1"] > 20.0  # chance: 10%
