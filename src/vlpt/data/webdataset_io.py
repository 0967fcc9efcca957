"""WebDataset shards: write a set to tar shards (one sample per image) and read shards back into memory.

A sample holds `<key>.jpg` (JPEG bytes), `<key>.txt` (the first caption) and `<key>.json`
({"captions": [...], "label": int, "classname": str} - label/classname only for classification sets).
"""
from __future__ import annotations

import glob
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import braceexpand
import webdataset as wds
from PIL import Image

from .dataset import ImageTextSet, Issue
from .sources import BadDataError

JPEG_MAGIC = b"\xff\xd8\xff"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class EncodedImage(NamedTuple):
    """An image kept as its encoded bytes; `origin` names it (shard#key) in messages."""

    origin: str
    data: bytes

    def __str__(self) -> str:
        return self.origin

    def __repr__(self) -> str:
        return f"EncodedImage({self.origin!r}, {len(self.data)} bytes)"


def load_encoded(ref: EncodedImage) -> Image.Image:
    img = Image.open(io.BytesIO(ref.data))
    img.load()
    return img


def _original_bytes(ref: Any) -> bytes | None:
    """The stored bytes behind a reference, when it is a file or encoded bytes."""
    ref = getattr(ref, "ref", ref)  # unwrap a mixture reference
    if isinstance(ref, EncodedImage):
        return ref.data
    if isinstance(ref, (str, os.PathLike)) and Path(ref).is_file():
        return Path(ref).read_bytes()
    return None


def _jpeg_bytes(s: ImageTextSet, ref: Any, size: int | None) -> bytes:
    if size is None:
        data = _original_bytes(ref)
        if data is not None and data.startswith(JPEG_MAGIC):
            return data
    img = s.load(ref).convert("RGB")
    if size is not None and min(img.size) > size:
        scale = size / min(img.size)
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                         Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shards(s: ImageTextSet, pattern: str, maxcount: int = 1000, size: int | None = None,
                 progress: bool = False) -> list[str]:
    """Write one sample per image to shards named by `pattern` (e.g. "out/shard-%06d.tar").

    Images are stored as JPEG: the original file bytes when the source is a JPEG file and `size` is None,
    else re-encoded (shorter side down to `size` when given). Unreadable images are skipped with a warning.
    """
    from vlpt.progress import bar

    if os.path.isdir(pattern) or pattern.endswith("/"):
        pattern = os.path.join(pattern, "shard-%06d.tar")
    if "%" not in pattern:
        raise ValueError(f"shard pattern {pattern!r} needs a number field, e.g. 'out/shard-%06d.tar'")
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    per_image: list[list[str]] = [[] for _ in range(s.num_images)]
    for caption, i in zip(s.captions, s.caption_image):
        per_image[i].append(caption)
    written: list[str] = []
    bad: list[str] = []
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, post=written.append) as sink:
        for i in bar(range(s.num_images), progress, desc=f"packing {s.name}", unit="img"):
            try:
                jpg = _jpeg_bytes(s, s.images[i], size)
            except Exception as e:  # unreadable image: leave it out
                bad.append(f"{s.images[i]} ({type(e).__name__}: {e})")
                continue
            meta: dict[str, Any] = {"captions": per_image[i]}
            if s.labels is not None:
                meta["label"] = int(s.labels[i])
                if s.classnames is not None:
                    meta["classname"] = s.classnames[s.labels[i]]
            sink.write({"__key__": f"{i:09d}", "jpg": jpg, "txt": (per_image[i] or [""])[0],
                        "json": json.dumps(meta).encode("utf-8")})
    if bad:
        print(f"warning: skipped {len(bad)} unreadable images while packing {s.name!r}: {bad[:5]}",
              file=sys.stderr)
    return written


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard paths from brace patterns, globs, directories (all *.tar inside) or plain paths."""
    out: list[str] = []
    for u in [urls] if isinstance(urls, str) else list(urls):
        u = os.path.expanduser(u)
        if os.path.isdir(u):
            found = sorted(glob.glob(os.path.join(u, "*.tar")))
        elif "{" in u:
            found = list(braceexpand.braceexpand(u))
        elif any(c in u for c in "*?["):
            found = sorted(glob.glob(u))
        else:
            found = [u]
        if not any(os.path.exists(f) for f in found):
            raise BadDataError(f"no shards found for {u}; give a .tar file, a folder of them, a glob or a brace "
                               f"pattern such as 'shards/{{000000..000009}}.tar'")
        out.extend(found)
    return out


def sample_captions(sample: dict) -> tuple[list[str], dict, bool]:
    """(captions, the parsed .json or {}, whether the .txt needed U+FFFD repairs) of a shard sample."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    captions = [str(c) for c in meta.get("captions", []) if c is not None]
    repaired = False
    if not captions and "txt" in sample:
        try:
            captions = [sample["txt"].decode("utf-8")]
        except UnicodeDecodeError:
            captions, repaired = [sample["txt"].decode("utf-8", errors="replace")], True
    return captions, meta, repaired


def sample_record(sample: dict) -> tuple[bytes, list[str], int | None, str | None, bool]:
    """(image bytes, captions, label, class name, whether the text needed U+FFFD repairs)."""
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        raise ValueError(f"no image ({'/'.join(IMAGE_KEYS)}) in the sample")
    captions, meta, repaired = sample_captions(sample)
    Image.open(io.BytesIO(data))  # header check: raises on bytes that are no image
    return data, captions, meta.get("label"), meta.get("classname"), repaired


def shard_samples(path: str, select_files=None):
    """The samples of one shard in order, as dicts of raw bytes by extension (plus `__key__`, `__url__`);
    `select_files(name)` keeps only some members. A missing, truncated or non-tar shard raises when the
    reading reaches the damage, after the samples before it."""
    with open(path, "rb") as stream:
        files = wds.tariterators.tar_file_expander([{"url": path, "stream": stream}], select_files=select_files)
        yield from wds.tariterators.group_by_keys(files)


def read_shards(urls: str | list[str]) -> tuple[ImageTextSet, int]:
    """Read shards into memory. Returns (set, number of skipped samples and unreadable shards); the set's
    `issues` name them, and the empty captions and repaired texts."""
    paths = expand_urls(urls)
    images, captions, caption_image, labels, names = [], [], [], [], {}
    bad_samples, bad_shards, empty, non_utf8, n_samples, n_captions = [], [], [], [], 0, 0
    for path in paths:
        try:
            for sample in shard_samples(path):
                n_samples += 1
                origin = f"{path}#{sample.get('__key__')}"
                try:
                    data, caps, label, classname, repaired = sample_record(sample)
                except Exception as e:
                    bad_samples.append(f"{origin} ({type(e).__name__}: {e})")
                    continue
                if repaired:
                    non_utf8.append(origin)
                n_captions += len(caps)
                for c in caps:
                    if not c.strip():
                        empty.append(origin)
                        continue
                    captions.append(c)
                    caption_image.append(len(images))
                images.append(EncodedImage(origin, data))
                labels.append(label)
                if label is not None and classname is not None:
                    names[int(label)] = classname
        except Exception as e:  # missing, truncated or not a tar: count the shard and go on
            bad_shards.append(f"{path} ({type(e).__name__}: {e})")
            print(f"warning: unreadable shard {path} ({type(e).__name__}: {e}); skipped", file=sys.stderr)
    skipped = len(bad_samples) + len(bad_shards)
    if skipped:
        print(f"warning: {skipped} unreadable samples/shards skipped in {len(paths)} shards", file=sys.stderr)
    has_labels = bool(labels) and all(lb is not None for lb in labels)
    classnames = None
    if has_labels and names:
        classnames = [names.get(k, f"class {k}") for k in range(max(int(lb) for lb in labels) + 1)]
    name = Path(paths[0]).parent.name or "shards"
    return ImageTextSet(name=name, images=images, load=load_encoded, captions=captions,
                        caption_image=caption_image, labels=[int(lb) for lb in labels] if has_labels else None,
                        classnames=classnames,
                        issues={"bad_shards": Issue(len(paths), bad_shards), "bad_samples": Issue(n_samples, bad_samples),
                                "empty_captions": Issue(n_captions, empty), "non_utf8_rows": Issue(n_samples, non_utf8)}), skipped


def pack(spec: str, out_pattern: str, maxcount: int = 1000, size: int | None = None) -> list[str]:
    """`vlpt data pack`: open a data spec and write it to shards, with a progress bar."""
    from .sources import open_source
    return write_shards(open_source(spec), out_pattern, maxcount=maxcount, size=size, progress=True)
