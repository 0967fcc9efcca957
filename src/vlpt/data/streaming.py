"""Training batches streamed from WebDataset shards: each shard is read from start to end when its turn comes,
never held whole, so the data set can be any size.

A streamed set cannot be indexed, so its determinism is defined by positions instead of steps:
- epoch e of DataLoader worker w of process `rank` reads the shards `order(seed, e)[rank::world][w::W]`
  (webdataset's split_by_node, then split_by_worker; the parts are disjoint and cover the set, so over all
  processes and workers each sample is read once per epoch), or, with `resample`, ceil(N / (world x W))
  shards drawn with replacement, seeded by (seed, e, rank, w);
- their samples pass webdataset's shuffle buffer, seeded by (seed, e, rank, w) and drained at the end of the
  epoch, so an epoch's stream depends on nothing before it;
- a worker's position is (epoch, samples taken from that epoch's stream). A resumed worker reads its epoch
  again from the start and drops the samples taken before, without decoding them;
- the DataLoader takes the workers' batches in turn, so step s is worker (s mod W)'s: worker ids are rotated
  by the first step, so that a resumed run gets the same batch at each step as a run that never stopped.
"""
from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .dataset import decode_to_uint8
from .sources import BadDataError, _too_many
from .tokenizer import TextTokenizer
from .views import TextViews
from .webdataset_io import IMAGE_KEYS, sample_captions, sample_record, shard_samples

STREAM_COUNTERS = ("shards", "bad_shards", "samples", "bad_samples")


def epoch_shards(urls: list[str], seed: int, epoch: int, rank: int, world: int, worker: int, workers: int,
                 resample: bool = False) -> list[str]:
    """The shards worker `worker` (of `workers`) of process `rank` (of `world`) reads in epoch `epoch`."""
    if resample:
        rng = random.Random(f"vlpt-resample/{seed}/{epoch}/{rank}/{worker}")
        return [rng.choice(urls) for _ in range(math.ceil(len(urls) / (world * workers)))]
    order = list(urls)
    random.Random(f"vlpt-shards/{seed}/{epoch}").shuffle(order)
    return order[rank::world][worker::workers]


class _Report:
    """What a worker read and could not use since its last batch; it travels with the next batch."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.shards, self.samples, self.bad_shards, self.bad_samples = 0, 0, [], []

    def pop(self) -> dict:
        out = {"shards": self.shards, "samples": self.samples, "bad_shards": self.bad_shards,
               "bad_samples": self.bad_samples}
        self.clear()
        return out


class ShardStream(IterableDataset):
    """This process's batches of `batch_size` (image uint8 [B,3,S,S], text [B,L], maybe text_views, the
    names of undecodable images under "bad"), made in DataLoader workers; each batch also carries
    "_stream": the worker's position after it and what it could not use, which StreamBatches takes off."""

    def __init__(self, urls: list[str], batch_size: int, image_size: int, seed: int, tokenizer: TextTokenizer,
                 rank: int = 0, world: int = 1, num_workers: int = 0, shuffle_buffer: int = 1000,
                 resample: bool = False, text_views: TextViews | None = None):
        self.urls, self.batch_size, self.size, self.seed = list(urls), batch_size, image_size, seed
        self.tokenizer, self.rank, self.world, self.num_workers = tokenizer, rank, world, num_workers
        self.shuffle_buffer, self.resample = shuffle_buffer, resample
        self.text_views = text_views if text_views is not None and text_views.active else None
        self.start_step = 0  # the step of the first batch the next iteration makes
        self.start: dict[int, tuple[int, int]] = {}  # worker -> (epoch, samples taken): where it resumes

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    def epoch_samples(self, epoch: int, worker: int, report: _Report):
        """The raw samples of one worker's epoch, in shuffled order."""
        shards = epoch_shards(self.urls, self.seed, epoch, self.rank, self.world, worker, self.workers, self.resample)
        rng = random.Random(f"vlpt-shuffle/{self.seed}/{epoch}/{self.rank}/{worker}")
        return wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(self._read(shards, report))

    @staticmethod
    def _read(shards: list[str], report: _Report):
        for url in shards:
            report.shards += 1
            try:
                yield from shard_samples(url)
            except Exception as e:  # missing, truncated or no tar: the samples before the damage were used
                report.bad_shards.append(f"{url} ({type(e).__name__}: {e})")

    def __iter__(self):
        physical = info.id if (info := get_worker_info()) is not None else 0
        worker = (physical + self.start_step) % self.workers
        epoch, skip = self.start.get(worker, (0, 0))
        step = self.start_step + physical  # the step this worker's next batch is for
        report, images, captions, bad = _Report(), [], [], []
        while True:
            taken = good = 0
            for sample in self.epoch_samples(epoch, worker, report):
                taken += 1
                if taken <= skip:  # trained on before the checkpoint, and so was what was found reading it
                    report.clear()
                    continue
                report.samples += 1
                item = self._decode(sample, epoch, report, bad)
                if item is None:
                    continue
                good += 1
                images.append(item[0])
                captions.append(item[1])
                if len(images) == self.batch_size:
                    yield {"image": torch.stack(images), **self._texts(captions, step), "bad": bad,
                           "_stream": {"worker": worker, "epoch": epoch, "taken": taken, **report.pop()}}
                    images, captions, bad, step = [], [], [], step + self.workers
            if not good and not skip:  # nothing usable at all: say so rather than read it forever
                first = (report.bad_shards + report.bad_samples + bad + ["its shards hold no samples"])[0]
                yield {"_stream": {"error": f"process {self.rank}, data worker {worker} found no usable sample in "
                                            f"its shards of epoch {epoch} (first: {first}); check them with "
                                            f"`vlpt data info wds:{Path(self.urls[0]).parent} --check`"}}
                return
            epoch, skip = epoch + 1, 0

    def _decode(self, sample: dict, epoch: int, report: _Report, bad: list[str]) -> tuple | None:
        """(image, caption), or None for a sample that cannot be used (named in `report` or `bad`)."""
        origin = f"{sample.get('__url__')}#{sample.get('__key__')}"
        try:
            data, captions, *_ = sample_record(sample)
        except Exception as e:  # no image, no image header, broken json
            report.bad_samples.append(f"{origin} ({type(e).__name__}: {e})")
            return None
        captions = [c for c in captions if c.strip()]
        if not captions:
            report.bad_samples.append(f"{origin} (no caption)")
            return None
        try:
            image = decode_to_uint8(data, self.size)
        except Exception as e:  # corrupt or truncated image: counted with the run's bad images
            bad.append(f"{origin} ({type(e).__name__}: {e})")
            return None
        if len(captions) > 1:  # one caption per epoch, drawn from (seed, epoch, the shard's name and sample key)
            rng = random.Random(f"vlpt-caption/{self.seed}/{epoch}/{Path(origin).name}")
            captions = [captions[rng.randrange(len(captions))]]
        return image, captions[0]

    def _texts(self, captions: list[str], step: int) -> dict[str, torch.Tensor]:
        if self.text_views is None:
            return {"text": self.tokenizer(captions)}
        main, extra = self.text_views(captions, step)
        out = {"text": self.tokenizer(captions if main is None else main)}
        if extra:
            out["text_views"] = torch.stack([self.tokenizer(e) for e in extra])
        return out


class StreamIssues:
    """Shards and samples the workers could not use, in this process's run counters; past
    data.max_bad_fraction of the shards (of an epoch's share, or of those read when more) or of the samples
    read, the run stops naming the first."""

    def __init__(self, counters: dict, max_bad_fraction: float, shards_per_epoch: int):
        for k in STREAM_COUNTERS:
            counters.setdefault(k, 0)
        self.counters, self.limit, self.per_epoch, self.first = counters, max_bad_fraction, shards_per_epoch, {}

    def add(self, report: dict) -> None:
        c = self.counters
        c["shards"] += report["shards"]
        c["samples"] += report["samples"]
        # kind: (out of, how many pass unjudged (one bad sample among the first read says little), what they are)
        judged = {"bad_shards": (max(c["shards"], self.per_epoch), 0, "shards of this process were unreadable"),
                  "bad_samples": (c["samples"], 1, "samples read by this process had no image or no caption")}
        for kind, (total, tolerated, what) in judged.items():
            c[kind] += len(report[kind])
            if report[kind] and kind not in self.first:
                self.first[kind] = report[kind][0]
                print(f"warning: skipped {report[kind][0]}; such {kind.removeprefix('bad_')} are counted in the "
                      f"data rows of metrics.jsonl", file=sys.stderr)
            if c[kind] > tolerated and c[kind] / total > self.limit:
                raise BadDataError(f"{c[kind]} of {total} {what}, more than data.max_bad_fraction={self.limit} "
                                   f"(first: {self.first[kind]}); fix or remove them, or raise data.max_bad_fraction "
                                   f"to skip them")


class StreamBatches:
    """The training process's side of a ShardStream: `iterate` hands out the workers' batches in step order
    and keeps each worker's position, which `state_dict` gives for the checkpoint and `load_state_dict`
    restores (with another number of processes or workers, the split differs: every worker then starts the
    epoch after the newest saved one)."""

    def __init__(self, stream: ShardStream, counters: dict, max_bad_fraction: float, pin_memory: bool = False):
        self.stream, self.pin_memory = stream, pin_memory
        per_epoch = math.ceil(len(stream.urls) / stream.world)
        self.issues = StreamIssues(counters, max_bad_fraction, per_epoch)
        self.positions = {w: (0, 0) for w in range(stream.workers)}

    def state_dict(self) -> dict:
        s = self.stream
        return {"rank": s.rank, "world": s.world, "workers": s.workers,
                "positions": {w: list(p) for w, p in self.positions.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not state:  # a checkpoint from before streaming, or of an in-memory run
            return
        s = self.stream
        saved = {int(w): (int(e), int(t)) for w, (e, t) in state["positions"].items()}
        if (state["world"], state["workers"]) == (s.world, s.workers):
            self.positions = saved
        else:
            epoch = 1 + max(e for e, _ in saved.values())
            print(f"warning: the stream position was saved by {state['world']} processes x {state['workers']} data "
                  f"workers, and {s.world} x {s.workers} split the shards otherwise; every worker starts at epoch "
                  f"{epoch}", file=sys.stderr)
            self.positions = {w: (epoch, 0) for w in range(s.workers)}

    def iterate(self, start: int, stop: int | None = None):
        """Batches for steps start, start + 1, ... (the stream has no end; `stop` is for the same call shape
        as StepBatches)."""
        self.stream.start_step = start
        self.stream.start = dict(self.positions)
        workers = self.stream.num_workers
        loader = DataLoader(self.stream, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                            prefetch_factor=4 if workers else None)
        return self._take(iter(loader))

    def _take(self, loader):
        for batch in loader:
            info = batch.pop("_stream")
            if "error" in info:
                raise BadDataError(info["error"])
            self.positions[info["worker"]] = (info["epoch"], info["taken"])
            self.issues.add(info)
            yield batch


def probe(urls: list[str], max_bad_fraction: float) -> None:
    """Reads the shards in order up to the first usable sample, so that a set that cannot be read stops the
    run before it writes anything; more than max_bad_fraction of the shards found unreadable on the way, too."""
    name = Path(urls[0]).parent.name or "shards"
    bad_shards, bad_samples, found = [], [], False
    for url in urls:
        try:
            for sample in shard_samples(url):
                try:
                    captions = [c for c in sample_record(sample)[1] if c.strip()]
                except Exception as e:  # noqa: BLE001 - any unusable sample; training skips it too
                    bad_samples.append(f"{url}#{sample.get('__key__')} ({type(e).__name__}: {e})")
                    continue
                if captions:
                    found = True
                    break
        except Exception as e:  # noqa: BLE001 - missing, truncated, no tar
            bad_shards.append(f"{url} ({type(e).__name__}: {e})")
        if found or (bad_shards and len(bad_shards) / len(urls) > max_bad_fraction):
            break
    if bad_shards and len(bad_shards) / len(urls) > max_bad_fraction:
        raise _too_many("unreadable shards", bad_shards, len(urls), name, max_bad_fraction)
    if not found:
        first = (bad_samples + ["no samples in them"])[0]
        raise BadDataError(f"no usable sample (an image with a caption) in the {len(urls)} shards of {name!r} "
                           f"(first: {first}); write them with `vlpt data pack`")


def caption_sample(urls: list[str], n: int) -> list[str]:
    """Up to `n` captions from the first shards (in the given order), for training the run's tokenizer;
    only the text members are kept (images are passed over unread where the file allows)."""
    captions: list[str] = []
    for url in urls:
        try:
            for sample in shard_samples(url, select_files=_text_member):
                captions += [c for c in sample_captions(sample)[0] if c.strip()]
                if len(captions) >= n:
                    return captions[:n]
        except Exception:  # noqa: BLE001 - unreadable shards are counted when training reads them
            continue
    return captions


def _text_member(name: str) -> bool:
    return name.rpartition(".")[2].lower() not in IMAGE_KEYS
