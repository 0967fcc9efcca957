"""Streamed WebDataset shards: each sample once per epoch over processes x data workers, resume at the saved
position, unreadable shards skipped and counted, JPEG draft decoding, and training that streams."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlpt import config
from vlpt.data.dataset import ImageTextSet, decode_to_uint8, to_uint8
from vlpt.data.sources import BadDataError
from vlpt.data.streaming import ShardStream, StreamBatches, epoch_shards
from vlpt.data.tokenizer import TextTokenizer
from vlpt.data.webdataset_io import read_shards, write_shards
from vlpt.train import loop
from vlpt.train.data import InMemoryData, StreamedData, training_source

N, PER_SHARD = 32, 4  # samples, samples per shard: 8 shards


def solid(i: int) -> Image.Image:
    """Sample i's image: red = 8 i, which survives JPEG, so a decoded batch tells which samples it holds."""
    return Image.new("RGB", (24, 20), (8 * i, 120, 40))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("shards")
    s = ImageTextSet("ids", list(range(N)), solid, [f"sample number {i}" for i in range(N)], list(range(N)))
    return write_shards(s, str(folder / "s-%02d.tar"), maxcount=PER_SHARD)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train([f"sample number {i}" for i in range(N)], 64, 8)


def ids(batch: dict) -> list[int]:
    return (batch["image"][:, 0, 0, 0].float() / 8).round().int().tolist()


def stream(urls, tokenizer, rank=0, world=1, workers=2, batch=4, buffer=5, counters=None, limit=0.0, **kw):
    s = ShardStream(urls, batch, 8, 3, tokenizer, rank=rank, world=world, num_workers=workers, shuffle_buffer=buffer,
                    **kw)
    return StreamBatches(s, {} if counters is None else counters, limit)


def take(batches: StreamBatches, start: int, n: int) -> list[dict]:
    it = batches.iterate(start)
    return [next(it) for _ in range(n)]


def test_each_sample_once_per_epoch_over_two_processes_and_two_workers(shards, tokenizer):
    # 2 processes x 2 workers read 2 shards (8 samples) each per epoch: 4 batches of 4 per process
    runs = [stream(shards, tokenizer, rank=r, world=2) for r in (0, 1)]
    got = [take(b, 0, 8) for b in runs]
    epochs = [[i for r in (0, 1) for b in got[r][4 * e: 4 * e + 4] for i in ids(b)] for e in (0, 1)]
    assert sorted(epochs[0]) == list(range(N)) and sorted(epochs[1]) == list(range(N))
    assert epochs[0] != epochs[1]  # shards and buffer shuffled anew each epoch
    assert set(ids(got[0][0]) + ids(got[0][1])).isdisjoint(ids(got[1][0]) + ids(got[1][1]))
    for b in runs:  # after 8 batches every worker has taken its whole epoch 1
        assert b.state_dict()["positions"] == {0: [1, 8], 1: [1, 8]}


def test_split_and_resampled_shard_assignment():
    urls = [f"s{k}" for k in range(11)]
    parts = [epoch_shards(urls, 0, 2, r, 2, w, 3) for r in range(2) for w in range(3)]
    assert sorted(sum(parts, [])) == sorted(urls)  # a partition: every shard read once per epoch
    assert epoch_shards(urls, 0, 2, 0, 2, 0, 3) != epoch_shards(urls, 0, 3, 0, 2, 0, 3)
    drawn = [epoch_shards(urls, 0, 2, r, 2, w, 3, resample=True) for r in range(2) for w in range(3)]
    assert all(len(d) == 2 for d in drawn) and drawn[0] == epoch_shards(urls, 0, 2, 0, 2, 0, 3, resample=True)


@pytest.mark.parametrize("at", [3, 6])  # mid-epoch on an odd step (workers rotate); at an epoch's end
def test_resume_at_the_saved_position_gives_exactly_the_remaining_batches(shards, tokenizer, at):
    straight = take(stream(shards, tokenizer, rank=1, world=2), 0, 10)
    first = stream(shards, tokenizer, rank=1, world=2)
    done = take(first, 0, at)
    resumed = stream(shards, tokenizer, rank=1, world=2)
    resumed.load_state_dict(first.state_dict())
    rest = take(resumed, at, 10 - at)
    for a, b in zip(straight[at:], rest):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in ("image", "text"))
    seen = [i for b in done + rest for i in ids(b)]
    assert len(set(seen[:16])) == 16  # this process's epoch: its 16 samples, none twice, none left out


def test_truncated_shard_is_skipped_and_counted(shards, tokenizer, tmp_path):
    urls = []
    for k, path in enumerate(shards):
        raw = Path(path).read_bytes()
        urls.append(str(tmp_path / Path(path).name))
        Path(urls[-1]).write_bytes(raw[: len(raw) // 2] if k == 1 else raw)  # the samples before the cut stay
    kept = read_shards(urls)[0]  # the in-memory reader's verdict: what an epoch holds
    assert N - PER_SHARD < kept.num_images < N
    counters = {}
    batches = stream(urls, tokenizer, workers=0, batch=1, buffer=10, counters=counters, limit=0.5)
    epoch = take(batches, 0, kept.num_images)
    assert sorted(i for b in epoch for i in ids(b)) == sorted(int(c.split()[-1]) for c in kept.captions)
    assert counters["bad_shards"] == 1 and counters["shards"] == 8
    for at in range(1, kept.num_images):  # a resumed run counts what its part read, not what it skipped
        part = {}
        first = stream(urls, tokenizer, workers=0, batch=1, buffer=10, counters=part, limit=0.5)
        take(first, 0, at)
        second = stream(urls, tokenizer, workers=0, batch=1, buffer=10, counters=dict(part), limit=0.5)
        second.load_state_dict(first.state_dict())
        take(second, at, kept.num_images - at)
        assert second.issues.counters == counters
    strict = stream(urls, tokenizer, workers=0, batch=1, buffer=10, counters={}, limit=0.1)
    with pytest.raises(BadDataError, match=r"^1 of 8 shards of this process were unreadable, more than "
                                           r"data\.max_bad_fraction=0\.1 \(first: \S*s-01\.tar"):
        take(strict, 0, kept.num_images)


def test_a_worker_with_nothing_usable_stops_the_run_naming_it(shards, tokenizer, tmp_path):
    (tmp_path / "garbage.tar").write_bytes(b"not a tar" * 100)
    batches = stream([shards[0], str(tmp_path / "garbage.tar")], tokenizer, workers=2, batch=2, limit=1.0)
    with pytest.raises(BadDataError, match=r"^process 0, data worker \d found no usable sample in its shards of "
                                           r"epoch 0 \(first: \S*garbage\.tar \(ReadError"):
        take(batches, 0, 4)


def test_a_sample_with_several_captions_gives_one_per_epoch(tmp_path, tokenizer):
    s = ImageTextSet("multi", [0], solid, ["one", "two", "six"], [0, 0, 0])
    urls = write_shards(s, str(tmp_path / "m-%02d.tar"))
    texts = [tokenizer.decode(b["text"][0]) for b in take(stream(urls, tokenizer, workers=0, batch=1), 0, 12)]
    again = [tokenizer.decode(b["text"][0]) for b in take(stream(urls, tokenizer, workers=0, batch=1), 0, 12)]
    assert texts == again and set(texts) == {"one", "two", "six"}  # 12 epochs of the one sample


def test_draft_decoding_gives_the_size_and_close_pixels():
    y, x = np.mgrid[0:192, 0:256]
    smooth = np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=95)
    img = Image.open(io.BytesIO(buf.getvalue()))
    img.draft("RGB", (32, 32))
    assert img.size == (64, 48)  # decoded at 1/4: the smallest DCT scale that keeps both sides >= 32
    fast, full = decode_to_uint8(buf.getvalue(), 32), to_uint8(Image.open(io.BytesIO(buf.getvalue())), 32)
    assert fast.shape == full.shape == (3, 32, 32)
    assert (fast.float() - full.float()).abs().mean() < 2


def base(*extra: str) -> list[str]:
    budget = [] if any(e.startswith("train.epochs") for e in extra) else ["train.steps=6"]
    return ["model=micro", "train.batch_size=8", *budget, "train.warmup_steps=2", "train.log_every=1",
            "eval.tasks=[]", "train.deterministic=true", "train.seed=5", "train.threads=1", *extra]


def test_which_data_streams_and_what_it_refuses(shards, tmp_path):
    folder = Path(shards[0]).parent
    cfg = lambda *o: config.resolve("clip", base(f"data=wds:{folder}", *o))  # noqa: E731
    assert isinstance(training_source(cfg("data.cache_images=false"), 1, False), StreamedData)
    assert isinstance(training_source(cfg("data.streaming=true"), 1, False), StreamedData)
    assert isinstance(training_source(cfg(), 1, False), InMemoryData)  # auto with cache_images: read whole
    assert isinstance(training_source(cfg("data.cache_images=false", "data.streaming=false"), 1, False), InMemoryData)
    with pytest.raises(config.ConfigError, match="train.epochs=1.0 needs the size of the data.*train.samples"):
        training_source(config.resolve("clip", base(f"data=wds:{folder}", "train.epochs=1", "data.streaming=true")),
                        1, False)
    with pytest.raises(config.ConfigError, match="8 shards cannot be split over 4 processes x 4 data workers"):
        training_source(cfg("data.streaming=true", "data.num_workers=4"), 4, False)
    with pytest.raises(config.ConfigError, match="data.streaming=true streams WebDataset shards, but data.source='sce"):
        training_source(config.resolve("clip", base("data=scenes", "data.streaming=true")), 1, False)
    with pytest.raises(config.ConfigError, match="data.streaming='sometimes': choose auto, true or false"):
        cfg("data.streaming=sometimes")
    (tmp_path / "bad.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(BadDataError, match=r"^1 of 1 unreadable shards .*bad\.tar"):
        training_source(config.resolve("clip", base(f"data=wds:{tmp_path}/bad.tar", "data.streaming=true")), 1, False)


def params(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / "step-00000006" / "model.safetensors"))


def test_streamed_training_resumes_bit_equal(shards, tmp_path):
    folder = Path(shards[0]).parent
    cfg = config.resolve("clip", base(f"data=wds:{folder}", "data.cache_images=false", "data.num_workers=2",
                                      "checkpoint.every_steps=3"))
    loop.train(cfg, tmp_path / "straight", progress=False)
    loop.train(cfg, tmp_path / "broken", progress=False, stop_at=5)  # the last checkpoint is step 3
    loop.train(cfg, tmp_path / "broken", progress=False, resume=True)
    a, b = params(tmp_path / "straight"), params(tmp_path / "broken")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(r) for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "kind": "data", "shards": 8.0}
    assert "epoch" not in next(r for r in rows if r["kind"] == "train")  # the size of a stream is not known
