"""The training data of a run: a set read into memory (images decoded once, or per batch) or shards streamed,
the run's tokenizer and the batches, with what the first `data` row of metrics.jsonl says about them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from vlpt.config import Config, ConfigError
from vlpt.data.tokenizer import TextTokenizer
from vlpt.data.views import TextViews
from vlpt.models import minilm
from vlpt.train import distributed


def training_source(cfg: Config, world: int, progress: bool):
    """The run's training data, per data.streaming: StreamedData or InMemoryData. Either fails here on what
    can be known before the run writes anything (a bad spec, unreadable data, a batch larger than the data)."""
    urls = streamed_shards(cfg)
    return InMemoryData(cfg, progress) if urls is None else StreamedData(cfg, urls, world)


def streamed_shards(cfg: Config) -> list[str] | None:
    """The shards to stream, or None when the data is read into memory."""
    from vlpt.data.sources import shard_urls

    mode, spec = cfg.data.streaming, cfg.data.source
    if mode == "false":
        return None
    urls = shard_urls(spec)
    if mode == "true" and urls is None:
        raise ConfigError(f"data.streaming=true streams WebDataset shards, but data.source={spec!r} is not one set of "
                          f"shards; give wds:PATTERN (`vlpt data pack` writes them) or set data.streaming=auto")
    return None if mode == "auto" and cfg.data.cache_images else urls


class InMemoryData:
    """A data set read whole: images decoded once (data.cache_images) or per batch; batch k is a pure function
    of (seed, k, rank)."""

    def __init__(self, cfg: Config, progress: bool):
        self.cfg = cfg
        data, weights = open_training_data(cfg)
        self.data, self.images, self.weights, self.bad = decode_training_data(cfg, data, weights, progress)
        self.size = len(self.data)  # captions: an epoch
        self.cut = torch.zeros(0, dtype=torch.bool)

    def captions(self) -> list[str]:
        return self.data.captions

    def batches(self, tokenizer: TextTokenizer, text_views: TextViews, rank: int, world: int, counters: dict,
                pin_memory: bool = False):
        from vlpt.data.loader import StepBatches

        cfg = self.cfg
        tokens, self.cut = tokenize(tokenizer, self.data.captions)
        return StepBatches(self.data, tokens, cfg.train.batch_size, cfg.train.seed, cfg.model.vision.image_size,
                           images=self.images, weights=self.weights, rank=rank, world=world, text_views=text_views,
                           tokenizer=tokenizer, num_workers=cfg.data.num_workers, pin_memory=pin_memory)

    def summary(self) -> dict:
        data = self.data
        return {"images": data.num_images, "captions": len(data), "bad_images": len(self.bad),
                "long_captions": int(self.cut.sum()), **{k: len(i.names) for k, i in data.issues.items()}}


class StreamedData:
    """WebDataset shards streamed (vlpt.data.streaming): nothing of the data set is held in memory, so its size
    is not known before it is read (size None)."""

    size = None

    def __init__(self, cfg: Config, urls: list[str], world: int):
        from vlpt.data.streaming import probe

        self.cfg, self.urls = cfg, urls
        if cfg.train.epochs is not None:
            raise ConfigError(f"train.epochs={cfg.train.epochs} needs the size of the data, which streamed shards do "
                              f"not tell before they are read; give train.samples (epochs x samples per epoch) or "
                              f"train.steps, or read the shards whole with data.streaming=false")
        readers = world * max(1, cfg.data.num_workers)
        if len(urls) < readers and not cfg.data.resample:
            raise ConfigError(f"{len(urls)} shards cannot be split over {world} processes x "
                              f"{max(1, cfg.data.num_workers)} data workers (data.num_workers), which each read their "
                              f"own; write at least {readers} shards (`vlpt data pack --maxcount`), lower "
                              f"data.num_workers, or set data.resample=true")
        probe(urls, cfg.data.max_bad_fraction)

    def captions(self) -> list[str]:
        from vlpt.data.streaming import caption_sample

        return caption_sample(self.urls, self.cfg.tokenizer.sample_captions)

    def batches(self, tokenizer: TextTokenizer, text_views: TextViews, rank: int, world: int, counters: dict,
                pin_memory: bool = False):
        from vlpt.data.streaming import ShardStream, StreamBatches

        cfg = self.cfg
        stream = ShardStream(self.urls, cfg.train.batch_size // world, cfg.model.vision.image_size, cfg.train.seed,
                             tokenizer, rank=rank, world=world, num_workers=cfg.data.num_workers,
                             shuffle_buffer=cfg.data.shuffle_buffer, resample=cfg.data.resample, text_views=text_views)
        return StreamBatches(stream, counters, cfg.data.max_bad_fraction, pin_memory)

    bad: tuple = ()  # images left out before training: none (unusable samples are counted as they stream)

    def summary(self) -> dict:
        return {"shards": len(self.urls)}


def open_training_data(cfg: Config):
    """(set, sampling weights or None): metadata only, so a bad spec, too much bad input or a batch larger
    than the data fails before the run writes anything."""
    from vlpt.data.sources import check_issues, open_data

    data, weights = open_data(cfg.data.source)
    check_issues(data, cfg.data.max_bad_fraction)
    if weights is None:  # a mixture samples with replacement; a plain set's epoch must hold one batch
        check_batch_fits(len(data), cfg.train.batch_size, cfg.data.source)
    return data, weights


def check_batch_fits(captions: int, batch_size: int, name: str) -> None:
    if captions < batch_size:
        fit = 1 << (captions.bit_length() - 1) if captions else 0
        raise ConfigError(f"train.batch_size={batch_size} is larger than the data ({captions} captions in {name}); "
                          f"set train.batch_size={fit} or less" + (", or use more data" if fit < 8 else ""))


def decode_training_data(cfg: Config, data, weights, progress: bool):
    """(set, decoded images or None, sampling weights or None, bad image names); too many bad images raise."""
    from vlpt.data.sources import decode_all

    images, bad = None, []
    if cfg.data.cache_images:
        images, kept, bad = decode_all(data, cfg.model.vision.image_size, cfg.data.max_bad_fraction, progress=progress)
        if weights is not None and bad:  # keep the weights of the captions whose images survived
            good = {id(ref) for ref in kept.images}
            weights = weights[torch.tensor([id(data.images[i]) in good for i in data.caption_image])]
        data = kept
        if weights is None:
            check_batch_fits(len(data), cfg.train.batch_size, cfg.data.source)
    return data, images, weights, bad


def tokenize(tokenizer: TextTokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, L] as `tokenizer(captions)` gives them, and which captions were cut to fit L (bool [N])."""
    n = tokenizer.context_length
    longer = TextTokenizer(tokenizer.tok, n + 1)(captions)
    cut = longer[:, n] == tokenizer.eot_id  # with one more position, a caption that did not fit ends there
    tokens = longer[:, :n].clone()
    tokens[cut, n - 1] = tokenizer.eot_id
    return tokens, cut


def inherited_tokenizer(cfg: Config) -> str | None:
    """The tokenizer JSON of the run a text tower or decoder starts from (model.init.text / .decoder):
    its token embeddings only mean something with that vocabulary. None when no such tower is inherited."""
    from vlpt.train.towers import source_metadata

    for tower in ("text", "decoder"):
        path = getattr(cfg.model.init, tower)
        if path is not None:
            tok = source_metadata(path).get("tokenizer")
            if tok is None:
                raise ConfigError(f"model.init.{tower}={path} carries no tokenizer; give the one its weights were "
                                  f"trained with as tokenizer.path=...")
            return tok
    return None


def make_tokenizer(cfg: Config, captions: Sequence[str] | Callable[[], Sequence[str]], run_dir: Path) -> TextTokenizer:
    """The run's tokenizer.json (a resumed run reuses it), made by the main process; every rank waits for it
    (deciding by the file's existence on each rank would let a late rank skip the barrier).

    In order: tokenizer.path, the tokenizer of an inherited text tower or decoder, MiniLM's (a
    model.text.kind=minilm tower), one trained on `captions` (a function giving them when reading them
    costs: only called when a tokenizer is trained).
    """
    path = run_dir / "tokenizer.json"
    ctx = cfg.model.text.context_length
    if distributed.is_main() and not path.exists():
        inherited = None if cfg.tokenizer.path else inherited_tokenizer(cfg)
        if cfg.tokenizer.path:
            tok = TextTokenizer.from_file(cfg.tokenizer.path, ctx)
        elif inherited is not None:
            tok = TextTokenizer.from_str(inherited, ctx)
        elif cfg.model.text.kind == "minilm":
            tok = TextTokenizer.from_file(minilm.tokenizer_file(), ctx)
        else:
            tok = TextTokenizer.train(captions() if callable(captions) else captions, cfg.tokenizer.vocab_size, ctx)
        tmp = path.with_suffix(".tmp")
        tok.save(tmp)
        os.replace(tmp, path)  # whole or absent, like a checkpoint
    distributed.barrier()
    return TextTokenizer.from_file(path, ctx)
