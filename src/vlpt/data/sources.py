"""Real data sources: caption tables, Flickr8k, COCO captions, image folders, shards, and the spec parser.

Every loader returns an `ImageTextSet` holding only metadata (image references); pixels are read later,
once, by `decode_all`, which also finds and skips bad images.
"""
from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import os
import random
import re
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .dataset import ImageTextSet, Issue, merge_issues, to_uint8

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGE_COLUMNS = ("image", "filepath", "file", "path", "image_path", "filename", "file_name", "image_file",
                 "image_name", "img", "url", "image_url")
CAPTION_COLUMNS = ("caption", "text", "title", "sentence", "captions", "description", "raw")
FLICKR_SPLITS = {"train": "train", "dev": "dev", "val": "dev", "test": "test", "all": None}
SPLIT_DIRS = ("train", "test", "val", "valid", "validation", "dev")
DEFAULT_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.",
                     "a close-up photo of a {}.", "{}")
KINDS = ("scenes", "flickr8k", "csv", "tsv", "coco", "folder", "cifar10", "wds")
# issues that drop input (checked against data.max_bad_fraction); the others repair it and are only counted
DROPPING = ("empty_captions", "bad_rows", "bad_samples", "bad_shards")


class BadDataError(RuntimeError):
    """Too many images of a data set could not be decoded."""


def shared_data_dir() -> Path | None:
    """$VLPT_SHARED_DATA if set, else `shared/data` beside the repository; None when it does not exist."""
    env = os.environ.get("VLPT_SHARED_DATA")
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[3].parent / "shared" / "data"
    return path if path.is_dir() else None


def load_path(ref: Any) -> Image.Image:
    """Open an image file and read it fully (so no file handle stays open)."""
    img = Image.open(ref)
    img.load()
    return img


def _need(path: str | Path, what: str = "path") -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _grouped(name: str, pairs: list[tuple[str, str]], **kw) -> ImageTextSet:
    """(image ref, caption) pairs -> set with one entry per unique image (first-appearance order)."""
    index: dict[str, int] = {}
    captions, caption_image = [], []
    for ref, caption in pairs:
        captions.append(caption)
        caption_image.append(index.setdefault(ref, len(index)))
    return ImageTextSet(name=name, images=list(index), load=load_path, captions=captions,
                        caption_image=caption_image, **kw)


# ---------------------------------------------------------------------------------------------- tables
def _read_text(path: Path) -> tuple[str, list[int]]:
    """The file as text and the numbers of its lines that were not UTF-8 (decoded with U+FFFD in place of
    the bad bytes: one bad byte should not cost a whole caption, let alone the run)."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # spreadsheet "Unicode text" exports
        return raw.decode("utf-16"), []
    try:
        return raw.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        pass
    lines, bad = [], []
    for n, line in enumerate(raw.split(b"\n"), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("utf-8", errors="replace"))
            bad.append(n)
    return "\n".join(lines).removeprefix("\ufeff"), bad


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]], Issue]:
    """(header, (line number, row) pairs, the lines that were not UTF-8) of a CSV/TSV table."""
    text, non_utf8 = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        delimiter = ","
    elif suffix in (".tsv", ".tab"):
        delimiter = "\t"
    else:
        try:
            delimiter = csv.Sniffer().sniff(text[:8192], delimiters=",\t;|").delimiter
        except csv.Error:
            delimiter = "\t" if "\t" in text.partition("\n")[0] else ","
    csv.field_size_limit(2**31 - 1)  # an over-long caption is cut by the tokenizer, not fatal here
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: empty table (a header row is required)")
    return [c.strip() for c in rows[0][1]], rows[1:], Issue(text.count("\n") + 1, [f"{path}:{n}" for n in non_utf8])


def _pairs(path: Path, rows: list[tuple[int, list[str]]], ic: int, cc: int) -> tuple[list[tuple[str, str]], dict]:
    """(image ref, caption) of each usable row; rows without an image or a caption are counted, not used."""
    pairs, empty, broken = [], [], []
    for n, r in rows:
        ref = r[ic].strip() if len(r) > ic else ""
        caption = r[cc].strip() if len(r) > cc else ""
        if not ref:
            broken.append(f"{path}:{n}")
        elif not caption:
            empty.append(f"{path}:{n}")
        else:
            pairs.append((ref, caption))
    return pairs, {"empty_captions": Issue(len(rows) - len(broken), empty), "bad_rows": Issue(len(rows), broken)}


def _find_column(header: list[str], candidates: tuple[str, ...], what: str, path: Path) -> int:
    lower = [h.lower() for h in header]
    for cand in candidates:
        if cand in lower:
            return lower.index(cand)
    raise ValueError(f"{path}: cannot find the {what} column; columns found: {header}; "
                     f"expected one of {list(candidates)}")


def _resolve(ref: str, root: Path) -> str:
    if re.match(r"^[a-z][a-z0-9+.-]*://", ref):  # a URL: left as is
        return ref
    p = Path(ref).expanduser()
    return str(p if p.is_absolute() else root / p)


def load_captions_table(path: str | Path, image_root: str | Path | None = None) -> ImageTextSet:
    """A CSV/TSV with a header naming an image column and a caption column; captions grouped per image."""
    path = _need(path, "caption table")
    header, rows, non_utf8 = _read_rows(path)
    ic = _find_column(header, IMAGE_COLUMNS, "image", path)
    cc = _find_column(header, CAPTION_COLUMNS, "caption", path)
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    pairs, issues = _pairs(path, rows, ic, cc)
    return _grouped(path.stem, [(_resolve(ref, root), c) for ref, c in pairs],
                    issues={**issues, "non_utf8_rows": non_utf8})


# --------------------------------------------------------------------------------------------- flickr8k
def load_flickr8k(root: str | Path, split: str = "train") -> ImageTextSet:
    """Flickr8k in its CSV layout: Images/, captions.txt, Flickr_8k.{train,dev,test}Images.txt."""
    root = _need(root, "Flickr8k folder")
    if split not in FLICKR_SPLITS:
        raise ValueError(f"unknown Flickr8k split {split!r}; choose one of {sorted(FLICKR_SPLITS)}")
    table = _need(root / "captions.txt", "Flickr8k captions file")
    header, rows, non_utf8 = _read_rows(table)
    ic = _find_column(header, IMAGE_COLUMNS, "image", table)
    cc = _find_column(header, CAPTION_COLUMNS, "caption", table)
    pairs, issues = _pairs(table, rows, ic, cc)
    by_image: dict[str, list[str]] = defaultdict(list)
    for ref, caption in pairs:
        by_image[ref].append(caption)
    if FLICKR_SPLITS[split] is None:
        names = list(by_image)
    else:
        split_file = _need(root / f"Flickr_8k.{FLICKR_SPLITS[split]}Images.txt", "Flickr8k split file")
        names = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
        missing = [n for n in names if n not in by_image]
        if missing:
            print(f"warning: {len(missing)} images of {split_file} have no captions (e.g. {missing[0]})",
                  file=sys.stderr)
            names = [n for n in names if n in by_image]
    images = root / "Images"
    pairs = [(str(images / n), c) for n in names for c in by_image[n]]
    return _grouped(f"flickr8k-{split}", pairs, issues={**issues, "non_utf8_rows": non_utf8})


# ------------------------------------------------------------------------------------------------- coco
def load_coco(json_path: str | Path, image_root: str | Path | None = None) -> ImageTextSet:
    """COCO captions JSON: images[{id, file_name}], annotations[{image_id, caption}]."""
    json_path = _need(json_path, "COCO captions file")
    text, non_utf8 = _read_text(json_path)
    data = json.loads(text)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{json_path}: not a COCO captions file (needs 'images' and 'annotations')")
    root = Path(image_root).expanduser() if image_root is not None else json_path.parent
    by_id: dict[Any, list[str]] = defaultdict(list)
    empty = []
    for k, a in enumerate(data["annotations"]):
        caption = a.get("caption")
        if isinstance(caption, str) and caption.strip():
            by_id[a["image_id"]].append(caption.strip())
        else:
            empty.append(f"{json_path} annotation #{k} (id {a.get('id')})")
    pairs = [(_resolve(im["file_name"], root), c) for im in data["images"] for c in by_id.get(im["id"], [])]
    issues = {"empty_captions": Issue(len(data["annotations"]), empty),
              "non_utf8_rows": Issue(text.count("\n") + 1, [f"{json_path}:{n}" for n in non_utf8])}
    return _grouped(json_path.stem, pairs, issues=issues)


# ---------------------------------------------------------------------------------------- image folders
def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_split_root(path: Path) -> bool:
    return any((path / s).is_dir() and _subdirs(path / s) for s in SPLIT_DIRS)


def load_image_folder(root: str | Path, templates: list[str] | None = None, seed: int = 0,
                      split: str | None = None) -> ImageTextSet:
    """A classification tree root/<class>/<image>; one caption per image from a seeded random template."""
    root = _need(root, "image folder")
    if split is not None:
        root = _need(root / split, f"split {split!r} of image folder")
    elif _is_split_root(root):
        found = [s for s in SPLIT_DIRS if (root / s).is_dir()]
        raise ValueError(f"{root} holds splits {found}: pick one, e.g. 'folder:{root}:{found[0]}'")
    classes = _subdirs(root)
    if not classes:
        raise ValueError(f"{root}: no class subfolders found (expected root/<class>/<image>)")
    templates = list(templates or DEFAULT_TEMPLATES)
    rng = random.Random(seed)
    images, labels, captions = [], [], []
    classnames = [c.name.replace("_", " ") for c in classes]
    for label, cdir in enumerate(classes):
        for f in sorted(cdir.iterdir()):
            if f.suffix.lower() in IMAGE_EXTS and f.is_file():
                images.append(str(f))
                labels.append(label)
                captions.append(rng.choice(templates).format(classnames[label]))
    name = f"{root.parent.name}-{root.name}" if split else root.name
    return ImageTextSet(name=name, images=images, load=load_path, captions=captions,
                        caption_image=list(range(len(images))), labels=labels, classnames=classnames)


# --------------------------------------------------------------------------------------------- the spec
def _shared(sub: str) -> Path:
    base = shared_data_dir()
    if base is None:
        raise FileNotFoundError(f"no shared data folder for {sub!r}: set VLPT_SHARED_DATA or give a path")
    return base / sub


def _split_last(rest: str) -> tuple[str, str | None]:
    head, sep, tail = rest.rpartition(":")
    return (head, tail) if sep else (rest, None)


def _auto(path: Path) -> ImageTextSet:
    """Guess the kind of an existing path."""
    if path.is_dir():
        if (path / "captions.txt").is_file():
            return load_flickr8k(path)
        if any(path.glob("*.tar")):
            from .webdataset_io import read_shards
            return read_shards(str(path))[0]
        return load_image_folder(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".tab"):
        return load_captions_table(path)
    if suffix == ".json":
        return load_coco(path)
    if suffix == ".tar":
        from .webdataset_io import read_shards
        return read_shards(str(path))[0]
    raise ValueError(f"cannot tell what kind of data {path} is; write KIND:PATH with KIND in {list(KINDS)}")


def _open_kind(kind: str, rest: str | None) -> ImageTextSet:
    if kind == "scenes":
        from .scenes import load_scenes
        return load_scenes(rest) if rest else load_scenes()
    if kind == "flickr8k":
        if not rest or (rest in FLICKR_SPLITS and not Path(rest).is_dir()):
            return load_flickr8k(_shared("flickr8k"), rest or "train")
        path, split = _split_last(rest)
        if split is not None and split not in FLICKR_SPLITS:
            path, split = rest, None
        return load_flickr8k(path, split or "train")
    if kind == "cifar10":
        if not rest:
            raise ValueError("cifar10 needs a split: cifar10:train or cifar10:test")
        return load_image_folder(_shared("cifar10"), split=rest)
    if not rest:
        raise ValueError(f"data spec {kind!r} needs a path: {kind}:PATH")
    if kind in ("csv", "tsv"):
        return load_captions_table(rest)
    if kind == "coco":
        path, root = _split_last(rest)
        if root is not None and not path:
            path, root = rest, None
        return load_coco(path, root)
    if kind == "folder":
        path, split = _split_last(rest)
        return load_image_folder(path, split=split) if path else load_image_folder(rest)
    if kind == "wds":
        from .webdataset_io import read_shards
        return read_shards(rest)[0]
    raise AssertionError(kind)


def open_source(spec: str) -> ImageTextSet:
    """One data source from a spec `KIND:ARG[:SPLIT]` or a bare path (see docs)."""
    from .mixing import parse_mixture
    spec = spec.strip()
    if not spec:
        raise ValueError("empty data spec")
    if Path(spec).expanduser().exists():
        return _auto(Path(spec).expanduser())
    parts = parse_mixture(spec)
    if len(parts) > 1 or parts[0][0] != spec:
        raise ValueError(f"{spec!r} is a weighted mixture: use vlpt.data.sources.open_data, which also "
                         f"returns the sampling probabilities")
    kind, sep, rest = spec.partition(":")
    if kind in KINDS:
        return _open_kind(kind, rest if sep else None)
    if re.search(r"\.tar$", spec) and re.search(r"[{*?\[]", spec):
        return _open_kind("wds", spec)
    if not (sep and re.fullmatch(r"[A-Za-z][\w-]*", kind)) and (
            "/" in spec or Path(spec).suffix or spec.startswith((".", "~"))):
        raise FileNotFoundError(f"data path not found: {spec}")
    near = difflib.get_close_matches(kind, KINDS, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ValueError(f"unknown data kind {kind!r}{hint}; valid kinds: {', '.join(KINDS)}, or a path")


def open_data(spec: str) -> tuple[ImageTextSet, torch.Tensor | None]:
    """A source or a weighted mixture `A@0.7 + B@0.3`: the set and per-caption probabilities (None: uniform)."""
    from .mixing import mix, parse_mixture
    if Path(spec.strip()).expanduser().exists():
        return open_source(spec), None
    parts = parse_mixture(spec)
    if len(parts) == 1:
        return open_source(parts[0][0]), None
    sets = [open_source(p) for p, _ in parts]
    mixed, weights = mix(sets, [w for _, w in parts])
    mixed.issues = merge_issues(sets)
    return mixed, weights


# ------------------------------------------------------------------------------------------ bad images
def _ref_name(s: ImageTextSet, i: int) -> str:
    ref = s.images[i]
    if isinstance(ref, (bytes, bytearray, int)):
        return f"{s.name} image #{i}"
    return str(ref)


def _too_many(what: str, names: list[str], total: int, name: str, limit: float) -> BadDataError:
    shown = "\n  ".join(names[:10])
    more = f"\n  ... and {len(names) - 10} more" if len(names) > 10 else ""
    return BadDataError(
        f"{len(names)} of {total} {what} ({len(names) / total:.1%}) in {name!r} are unusable, more than "
        f"data.max_bad_fraction={limit}:\n  {shown}{more}\n"
        f"Fix or remove them, or raise data.max_bad_fraction to skip them.")


def check_issues(s: ImageTextSet, max_bad_fraction: float) -> None:
    """Warn about input a loader skipped or repaired; raise BadDataError when too much was skipped."""
    for kind, issue in s.issues.items():
        if not issue.names:
            continue
        if kind in DROPPING and len(issue.names) / issue.total > max_bad_fraction:
            raise _too_many(kind.replace("_", " ").replace("bad ", "unreadable "), issue.names, issue.total,
                            s.name, max_bad_fraction)
        verb = "skipped" if kind in DROPPING else "repaired"
        print(f"warning: {verb} {len(issue.names)} of {issue.total} {kind} in {s.name!r} (first: {issue.names[0]})",
              file=sys.stderr)


def decode_all(s: ImageTextSet, size: int, max_bad_fraction: float = 0.01,
               progress: bool = True) -> tuple[torch.Tensor, ImageTextSet, list[str]]:
    """Decode every image once to uint8 [N,3,size,size], skipping unreadable ones.

    Returns (good images, the set restricted to them, names of the bad ones). Raises BadDataError when
    more than `max_bad_fraction` of the images are bad.
    """
    from vlpt.progress import bar

    def work(i: int):
        try:
            return to_uint8(s.load(s.images[i]), size), None
        except Exception as e:  # corrupt, truncated, missing, unreadable: all count as bad
            return None, f"{type(e).__name__}: {e}"

    n = s.num_images
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    good: list[int] = []
    bad: list[tuple[str, str]] = []
    threads = max(2, min(4, os.cpu_count() or 2))
    with ThreadPoolExecutor(threads) as pool:
        results = pool.map(work, range(n), chunksize=1)
        for i, (img, err) in enumerate(bar(results, progress, total=n, desc=f"decoding {s.name}", unit="img",
                                           leave=False)):
            if img is None:
                bad.append((_ref_name(s, i), err))
            else:
                out[len(good)] = img
                good.append(i)
    if n and len(bad) / n > max_bad_fraction:
        raise _too_many("images", [f"{name} ({err})" for name, err in bad], n, s.name, max_bad_fraction)
    if bad:
        print(f"warning: skipped {len(bad)} unreadable images of {s.name!r} (first: {bad[0][0]})",
              file=sys.stderr)
    kept = s if not bad else s.subset_images(good)
    return out[: len(good)], kept, [name for name, _ in bad]
