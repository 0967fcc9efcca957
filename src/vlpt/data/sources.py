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
from typing import Any, Iterator, NamedTuple

import torch
from PIL import Image

from vlpt.errors import DataError

from .dataset import ImageTextSet, Issue, merge_issues, to_uint8

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGE_COLUMNS = ("image", "filepath", "file", "path", "image_path", "filename", "file_name", "image_file",
                 "image_name", "img", "url", "image_url")
CAPTION_COLUMNS = ("caption", "text", "title", "sentence", "captions", "description", "raw")
FLICKR_SPLITS = {"train": "train", "dev": "dev", "val": "dev", "test": "test", "all": None}
FLICKR_LAYOUT = "the Flickr8k layout is Images/, captions.txt and Flickr_8k.{train,dev,test}Images.txt"
SPLIT_DIRS = ("train", "test", "val", "valid", "validation", "dev")
DEFAULT_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.",
                     "a close-up photo of a {}.", "{}")
KINDS = ("scenes", "flickr8k", "csv", "tsv", "coco", "folder", "cifar10", "wds", "sugarcrepe")
SPECS = ("a data spec is a path (a .csv/.tsv captions table, a COCO .json, an image folder, .tar shards) or KIND:ARG "
         f"with KIND one of {', '.join(KINDS)} (see `vlpt data --help`)")
SEPARATORS = ",;\t|"
# issues that drop input (checked against data.max_bad_fraction); the others repair it and are only counted
DROPPING = ("empty_captions", "bad_rows", "bad_samples", "bad_shards")


class BadDataError(DataError):
    """Data that cannot be read, or too much of it unusable; the message names the file and the fix."""


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


def _need(path: str | Path, what: str = "path", hint: str = SPECS) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise BadDataError(f"{what} not found: {path}; {hint}")
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


def _separator(path: Path, text: str) -> str:
    """Tabs for .tsv/.tab; otherwise sniffed among , ; tab | (spreadsheets in comma-decimal locales write ;
    into a .csv), and where the sniffer cannot tell, the one the header line holds most of."""
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    try:
        return csv.Sniffer().sniff(text[:8192], delimiters=SEPARATORS).delimiter
    except csv.Error:
        header = text.lstrip().partition("\n")[0]
        return max(SEPARATORS, key=header.count) if any(c in header for c in SEPARATORS) else ","


class Table(NamedTuple):
    path: Path
    header: list[str]
    header_line: int
    rows: list[tuple[int, list[str]]]  # (line number, cells) of each non-blank line after the header
    non_utf8: Issue  # the lines that were not UTF-8 (repaired)
    sep: str


def _read_rows(path: Path) -> Table:
    """A CSV/TSV table as text rows, its separator sniffed."""
    text, non_utf8 = _read_text(path)
    empty = BadDataError(f"{path}: the file is empty; a captions table needs a header line such as image,caption "
                         f"and then one line per image-caption pair")
    if not text.strip():
        raise empty
    sep = _separator(path, text)
    csv.field_size_limit(2**31 - 1)  # an over-long caption is cut by the tokenizer, not fatal here
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    if not rows:
        raise empty
    issue = Issue(text.count("\n") + 1, [f"{path}:{n}" for n in non_utf8])
    return Table(path, [c.strip() for c in rows[0][1]], rows[0][0], rows[1:], issue, sep)


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


def _looks_like_image(cell: str, root: Path) -> bool:
    """A header cell that is an image file name or an existing file: the table has no header line."""
    if Path(cell).suffix.lower() in IMAGE_EXTS:
        return True
    try:
        return bool(cell) and (root / cell).expanduser().is_file()
    except (OSError, ValueError):  # a caption too long or too odd for a file name
        return False


def _columns(table: Table, root: Path) -> tuple[int, int]:
    """Indices of the image and caption columns of a table's header (image paths are relative to `root`)."""
    path, header, where = table.path, table.header, f"{table.path}:{table.header_line}"
    lower = [h.lower() for h in header]
    ic = next((lower.index(c) for c in IMAGE_COLUMNS if c in lower), None)
    cc = next((lower.index(c) for c in CAPTION_COLUMNS if c in lower), None)
    if ic is None or cc is None:
        cell = next((c for c in header if _looks_like_image(c, root)), None)
        if cell is not None:
            raise BadDataError(f"{where}: the first row looks like data, not a header ({cell!r} is an image); "
                               f"add a header line such as image,caption")
        what, names = ("image", IMAGE_COLUMNS) if ic is None else ("caption", CAPTION_COLUMNS)
        shown = "tab" if table.sep == "\t" else repr(table.sep)
        raise BadDataError(f"{where}: cannot find the {what} column; columns found: {header} (separator {shown}); "
                           f"name the {what} column one of {', '.join(names)}")
    if not table.rows:
        raise BadDataError(f"{path}: a header line and no rows; add one line per image-caption pair")
    return ic, cc


def _resolve(ref: str, root: Path) -> str:
    if re.match(r"^[a-z][a-z0-9+.-]*://", ref):  # a URL: left as is
        return ref
    p = Path(ref).expanduser()
    return str(p if p.is_absolute() else root / p)


def load_captions_table(path: str | Path, image_root: str | Path | None = None) -> ImageTextSet:
    """A CSV/TSV with a header naming an image column and a caption column; captions grouped per image."""
    path = _need(path, "caption table")
    table = _read_rows(path)
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    ic, cc = _columns(table, root)
    pairs, issues = _pairs(path, table.rows, ic, cc)
    return _grouped(path.stem, [(_resolve(ref, root), c) for ref, c in pairs],
                    issues={**issues, "non_utf8_rows": table.non_utf8})


# --------------------------------------------------------------------------------------------- flickr8k
def load_flickr8k(root: str | Path, split: str = "train") -> ImageTextSet:
    """Flickr8k in its CSV layout: Images/, captions.txt, Flickr_8k.{train,dev,test}Images.txt."""
    root = _need(root, "Flickr8k folder")
    if split not in FLICKR_SPLITS:
        raise BadDataError(f"unknown Flickr8k split {split!r}; choose one of {', '.join(sorted(FLICKR_SPLITS))}")
    table = _read_rows(_need(root / "captions.txt", "Flickr8k captions file", FLICKR_LAYOUT))
    ic, cc = _columns(table, root / "Images")
    pairs, issues = _pairs(table.path, table.rows, ic, cc)
    by_image: dict[str, list[str]] = defaultdict(list)
    for ref, caption in pairs:
        by_image[ref].append(caption)
    if FLICKR_SPLITS[split] is None:
        names = list(by_image)
    else:
        split_file = _need(root / f"Flickr_8k.{FLICKR_SPLITS[split]}Images.txt", "Flickr8k split file",
                           f"{FLICKR_LAYOUT}; or use split 'all'")
        names = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
        missing = [n for n in names if n not in by_image]
        if missing:
            print(f"warning: {len(missing)} images of {split_file} have no captions (e.g. {missing[0]})",
                  file=sys.stderr)
            names = [n for n in names if n in by_image]
    images = root / "Images"
    pairs = [(str(images / n), c) for n in names for c in by_image[n]]
    return _grouped(f"flickr8k-{split}", pairs, issues={**issues, "non_utf8_rows": table.non_utf8})


# ------------------------------------------------------------------------------------------------- coco
COCO_SHAPE = ("a COCO captions file is a JSON object with 'images' [{id, file_name}] and 'annotations' "
              "[{image_id, caption}]")


def _coco_json(path: Path, text: str) -> dict:
    """The parsed file, checked to have the shape of COCO captions (each mistake one line naming it)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); {COCO_SHAPE}") from None
    if not isinstance(data, dict):
        raise BadDataError(f"{path}: a JSON {type(data).__name__}, not an object; {COCO_SHAPE}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise BadDataError(f"{path}: no {key!r} list; {COCO_SHAPE}")
    if not data["annotations"]:
        raise BadDataError(f"{path}: 'annotations' is empty, so there are no captions; {COCO_SHAPE}")
    for key, fields in (("images", ("id", "file_name")), ("annotations", ("image_id",))):
        for k, entry in enumerate(data[key]):
            if not isinstance(entry, dict) or any(f not in entry for f in fields):
                raise BadDataError(f"{path}: {key}[{k}] has no {' or '.join(map(repr, fields))}; {COCO_SHAPE}")
    if not any("caption" in a for a in data["annotations"]):
        raise BadDataError(f"{path}: no annotation has a 'caption' (an instances or keypoints file?); use a "
                           f"captions_*.json file")
    return data


def load_coco(json_path: str | Path, image_root: str | Path | None = None) -> ImageTextSet:
    """COCO captions JSON: images[{id, file_name}], annotations[{image_id, caption}]."""
    json_path = _need(json_path, "COCO captions file")
    text, non_utf8 = _read_text(json_path)
    data = _coco_json(json_path, text)
    root = Path(image_root).expanduser() if image_root is not None else json_path.parent
    by_id: dict[Any, list[str]] = defaultdict(list)
    empty = []
    for k, a in enumerate(data["annotations"]):
        caption = a.get("caption")
        if isinstance(caption, str) and caption.strip():
            by_id[a["image_id"]].append(caption.strip())
        else:
            empty.append(f"{json_path} annotation #{k} (id {a.get('id')})")
    pairs = [(_resolve(str(im["file_name"]), root), c) for im in data["images"] for c in by_id.get(im["id"], [])]
    if by_id and not pairs:
        raise BadDataError(f"{json_path}: no annotation's image_id is the id of an entry of 'images'; {COCO_SHAPE}")
    issues = {"empty_captions": Issue(len(data["annotations"]), empty),
              "non_utf8_rows": Issue(text.count("\n") + 1, [f"{json_path}:{n}" for n in non_utf8])}
    return _grouped(json_path.stem, pairs, issues=issues)


# ---------------------------------------------------------------------------------------- image folders
def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_split_root(path: Path) -> bool:
    return any((path / s).is_dir() and _subdirs(path / s) for s in SPLIT_DIRS)


def _no_classes(root: Path) -> str:
    """Why a folder without class subfolders is no data set, and what it could be instead."""
    files = sorted(f for f in root.iterdir() if f.is_file())
    tables = [f for f in files if f.suffix.lower() in (".csv", ".tsv", ".json")]
    if tables:
        return (f"{root}: no class subfolders (expected {root}/<class>/<image>); it holds {tables[0].name}: "
                f"give data={tables[0]}")
    n = sum(f.suffix.lower() in IMAGE_EXTS for f in files)
    if n:
        return (f"{root}: {n} image{'s' * (n != 1)} but no class subfolders; move them into {root}/<class>/ "
                f"folders (each class name becomes a caption), or list them with captions in a .csv with a header "
                f"line image,caption")
    return f"{root}: no class subfolders and no images; an image folder holds {root}/<class>/<image> files"


def load_image_folder(root: str | Path, templates: list[str] | None = None, seed: int = 0,
                      split: str | None = None) -> ImageTextSet:
    """A classification tree root/<class>/<image>; one caption per image from a seeded random template."""
    root = _need(root, "image folder")
    if split is not None:
        subdirs = [d.name for d in _subdirs(root)]
        root = _need(root / split, f"split {split!r} of image folder",
                     f"its subfolders: {', '.join(subdirs)}" if subdirs else f"{root} has no subfolders")
    elif _is_split_root(root):
        found = [s for s in SPLIT_DIRS if (root / s).is_dir()]
        raise BadDataError(f"{root} holds splits {found}: pick one, e.g. 'folder:{root}:{found[0]}'")
    classes = _subdirs(root)
    if not classes:
        raise BadDataError(_no_classes(root))
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
    if not images:
        raise BadDataError(f"{root}: no images ({', '.join(sorted(IMAGE_EXTS))}) in its {len(classes)} class "
                           f"folders (e.g. {classes[0].name}/)")
    name = f"{root.parent.name}-{root.name}" if split else root.name
    return ImageTextSet(name=name, images=images, load=load_path, captions=captions,
                        caption_image=list(range(len(images))), labels=labels, classnames=classnames)


# --------------------------------------------------------------------------------------------- the spec
def _shared(sub: str) -> Path:
    base = shared_data_dir()
    if base is None:
        raise BadDataError(f"no shared data folder for {sub!r}: set VLPT_SHARED_DATA or give a path")
    return base / sub


def _split_last(rest: str) -> tuple[str, str | None]:
    head, sep, tail = rest.rpartition(":")
    return (head, tail) if sep else (rest, None)


def _is_shard_folder(path: Path) -> bool:
    return not (path / "captions.txt").is_file() and any(path.glob("*.tar"))


def shard_urls(spec: str) -> list[str] | None:
    """The shard paths when `spec` is one set of WebDataset shards (`wds:PATTERN`, a .tar file, a .tar glob or
    brace pattern, a folder of .tar files), else None. Only names are listed: no shard is opened."""
    from .mixing import parse_mixture
    from .webdataset_io import expand_urls

    spec = spec.strip()
    path = Path(spec).expanduser()
    if path.exists():
        shards = _is_shard_folder(path) if path.is_dir() else path.suffix.lower() == ".tar"
        return expand_urls(str(path)) if shards else None
    parts = parse_mixture(spec)
    if len(parts) > 1:
        return None
    spec = parts[0][0]  # a lone `SPEC@w` is SPEC
    kind, sep, rest = spec.partition(":")
    if kind == "wds" and sep and rest:
        return expand_urls(rest)
    if re.search(r"\.tar$", spec) and re.search(r"[{*?\[]", spec):
        return expand_urls(spec)
    return None


def _auto(path: Path) -> ImageTextSet:
    """Guess the kind of an existing path."""
    if path.is_dir():
        if (path / "captions.txt").is_file():
            return load_flickr8k(path)
        if _is_shard_folder(path):
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
    raise BadDataError(f"cannot tell what kind of data {path} is; {SPECS}")


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
            raise BadDataError("cifar10 needs a split: cifar10:train or cifar10:test")
        return load_image_folder(_shared("cifar10"), split=rest)
    if not rest:
        raise BadDataError(f"data spec {kind!r} needs a path: {kind}:PATH")
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
    if kind == "sugarcrepe":
        from .sugarcrepe import load_sugarcrepe
        return load_sugarcrepe(rest)
    raise AssertionError(kind)


def open_source(spec: str) -> ImageTextSet:
    """One data source from a spec `KIND:ARG[:SPLIT]` or a bare path (see docs)."""
    from .mixing import parse_mixture
    spec = spec.strip()
    if not spec:
        raise BadDataError(f"empty data spec; {SPECS}")
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
        raise BadDataError(f"data path not found: {spec}; {SPECS}")
    near = difflib.get_close_matches(kind, KINDS, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise BadDataError(f"unknown data kind {kind!r}{hint}; valid kinds: {', '.join(KINDS)}, or a path "
                       f"(see `vlpt data --help`)")


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
def ref_name(s: ImageTextSet, i: int) -> str:
    """Image `i` of `s` as messages name it."""
    ref = s.images[i]
    if isinstance(ref, (bytes, bytearray, int)):
        return f"{s.name} image #{i}"
    return str(ref)


def _too_many(what: str, names: list[str], total: int, name: str, limit: float) -> BadDataError:
    return BadDataError(
        f"{len(names)} of {total} {what} ({len(names) / total:.1%}) in {name!r} are unusable, more than "
        f"data.max_bad_fraction={limit} (first: {names[0]}); fix or remove them (`vlpt data info SPEC --check` "
        f"lists them all), or raise data.max_bad_fraction to skip them")


def issue_error(s: ImageTextSet, max_bad_fraction: float) -> BadDataError | None:
    """Why training refuses the input a loader dropped (too much of it, or nothing left); None: it does not."""
    for kind, issue in s.issues.items():
        if kind in DROPPING and issue.names and len(issue.names) / issue.total > max_bad_fraction:
            return _too_many(kind.replace("_", " ").replace("bad ", "unreadable "), issue.names, issue.total,
                             s.name, max_bad_fraction)
    if not len(s):
        return BadDataError(f"{s.name!r} has no image-caption pairs to train on")
    return None


def check_issues(s: ImageTextSet, max_bad_fraction: float) -> None:
    """Warn about input a loader skipped or repaired; raise BadDataError when too much was skipped."""
    error = issue_error(s, max_bad_fraction)
    if error is not None:
        raise error
    for kind, issue in s.issues.items():
        if issue.names:
            verb = "skipped" if kind in DROPPING else "repaired"
            print(f"warning: {verb} {len(issue.names)} of {issue.total} {kind} in {s.name!r} (first: {issue.names[0]})",
                  file=sys.stderr)


def image_error(s: ImageTextSet, bad: list[str], max_bad_fraction: float) -> BadDataError | None:
    """Why training refuses a set whose images `bad` cannot be read; None when it skips them."""
    if s.num_images and len(bad) / s.num_images > max_bad_fraction:
        return _too_many("images", bad, s.num_images, s.name, max_bad_fraction)
    return None


def read_images(s: ImageTextSet, size: int, progress: bool = True) -> Iterator[tuple[torch.Tensor | None, str | None]]:
    """Each image of `s` in order, decoded to uint8 [3,size,size] on a few threads: (image, None), or
    (None, "name (error)") for one that cannot be read."""
    from vlpt.progress import bar

    def work(i: int):
        try:
            return to_uint8(s.load(s.images[i]), size), None
        except Exception as e:  # corrupt, truncated, missing, unreadable: all count as bad
            return None, f"{ref_name(s, i)} ({type(e).__name__}: {e})"

    n = s.num_images
    threads = max(2, min(4, os.cpu_count() or 2))
    with ThreadPoolExecutor(threads) as pool:
        yield from bar(pool.map(work, range(n), chunksize=1), progress, total=n, desc=f"decoding {s.name}",
                       unit="img", leave=False)


def decode_all(s: ImageTextSet, size: int, max_bad_fraction: float = 0.01,
               progress: bool = True) -> tuple[torch.Tensor, ImageTextSet, list[str]]:
    """Decode every image once to uint8 [N,3,size,size], skipping unreadable ones.

    Returns (good images, the set restricted to them, names of the bad ones). Raises BadDataError when
    more than `max_bad_fraction` of the images are bad.
    """
    out = torch.empty((s.num_images, 3, size, size), dtype=torch.uint8)
    good: list[int] = []
    bad: list[tuple[str, str]] = []
    for i, (img, err) in enumerate(read_images(s, size, progress)):
        if img is None:
            bad.append((ref_name(s, i), err))
        else:
            out[len(good)] = img
            good.append(i)
    error = image_error(s, [err for _, err in bad], max_bad_fraction)
    if error is not None:
        raise error
    if bad:
        print(f"warning: skipped {len(bad)} unreadable images of {s.name!r} (first: {bad[0][0]})",
              file=sys.stderr)
    kept = s if not bad else s.subset_images(good)
    return out[: len(good)], kept, [name for name, _ in bad]
