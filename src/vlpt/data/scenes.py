"""Compositional scenes: a seeded, cached generator of small images of coloured shapes, with captions.

Every image shows 1-3 non-overlapping objects (shape, colour, size) on a dark, lightly noisy background.
Captions come in several styles (descriptive with spatial relations, lists, "a photo of ..." prompts and
noisy alt-text). Splits use separate seed streams, so test and classification scenes are held out.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlpt.data.dataset import ImageTextSet
from vlpt.data.sources import BadDataError

GENERATOR_VERSION = 1  # bump whenever generated pixels or objects change (invalidates the cache)

COLOURS = {
    "red": (230, 30, 30), "orange": (255, 140, 0), "yellow": (240, 230, 30), "green": (30, 200, 50),
    "cyan": (30, 220, 230), "blue": (40, 80, 255), "purple": (170, 50, 230), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ("small", "large")
_RADIUS = {"small": (6, 8), "large": (12, 15)}  # radius range in px at 64x64 (diameters 12-16, 24-30)
RELATIONS = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
STYLES = ("descriptive", "list", "photo", "alt")
CLASSIFICATION_SPLITS = ("colour", "shape", "colour_shape")
SPLITS = ("train", "test", *CLASSIFICATION_SPLITS, "relation")
_ALIASES = {"color": "colour", "color_shape": "colour_shape"}
_STREAMS = {"train": 1, "test": 2, "classify": 3, "relation": 4, "classify_train": 5}
PROBE_TRAIN_IMAGES = 2000  # "colour_shape:train" etc.: a probe's training set, disjoint from the test images
_TAGS = ("#shapes", "#geometry", "clipart", "stock image", "jpg", "#art")


def _stream_seed(seed: int, stream: str) -> int:
    """A 64-bit seed for one split's stream (split streams never share random numbers)."""
    return int(np.random.SeedSequence([seed, _STREAMS[stream]]).generate_state(1, np.uint64)[0])


# ---------------------------------------------------------------------------------------------- drawing
def _draw(draw: ImageDraw.ImageDraw, o: dict) -> None:
    x, y, r, fill = o["x"], o["y"], o["r"], COLOURS[o["colour"]]
    if o["shape"] == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif o["shape"] == "square":
        h = round(r * 0.85)
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    elif o["shape"] == "triangle":
        draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=fill)
    elif o["shape"] == "star":
        pts = [(x + rr * math.sin(k * math.pi / 5), y - rr * math.cos(k * math.pi / 5))
               for k in range(10) for rr in [r if k % 2 == 0 else 0.5 * r]]
        draw.polygon(pts, fill=fill)
    else:  # cross
        t = max(1, round(r * 0.35))
        draw.rectangle((x - r, y - t, x + r, y + t), fill=fill)
        draw.rectangle((x - t, y - r, x + t, y + r), fill=fill)


def _render(rng: np.random.Generator, objs: list[dict], size: int) -> np.ndarray:
    base = rng.integers(0, 40, 3)
    img = Image.fromarray((base + rng.integers(0, 12, (size, size, 3))).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for o in objs:
        _draw(draw, o)
    return np.asarray(img)


def _relation(a: dict, b: dict) -> str:
    """Where `a` is relative to `b`, along the dominant axis (image y grows downwards)."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    if abs(dx) >= abs(dy):
        return "left_of" if dx > 0 else "right_of"
    return "above" if dy > 0 else "below"


def _place(rng, radii, size, clear=False):
    """Non-overlapping centres for objects with `radii` (None when the random candidates do not fit).

    clear=True also makes the relation of object 0 to object 1 unambiguous: separated along the dominant
    axis and that axis at least twice the other.
    """
    gap = max(1, size // 32)
    pos: list[tuple[int, int]] = []
    for r in radii:
        cand = rng.integers(r, size - r, size=(64, 2))
        ok = np.ones(len(cand), dtype=bool)
        for (px, py), pr in zip(pos, radii):
            ok &= np.hypot(cand[:, 0] - px, cand[:, 1] - py) >= r + pr + gap
        if clear and pos:
            dx, dy = np.abs(cand[:, 0] - pos[0][0]), np.abs(cand[:, 1] - pos[0][1])
            major, minor = np.maximum(dx, dy), np.minimum(dx, dy)
            ok &= (major >= 2 * minor) & (major >= r + radii[0] + gap)
        if not ok.any():
            return None
        c = cand[int(ok.argmax())]
        pos.append((int(c[0]), int(c[1])))
    return pos


def _sample_scene(rng, size: int, k: int, distinct: bool = False, clear: bool = False) -> list[dict]:
    """k objects (distinct=True: all colours and all shapes differ), placed without overlap."""
    scale, names = size / 64, list(COLOURS)
    while True:
        colours = rng.choice(len(names), k, replace=False) if distinct else rng.integers(0, len(names), k)
        shapes = rng.choice(len(SHAPES), k, replace=False) if distinct else rng.integers(0, len(SHAPES), k)
        sizes = [SIZES[s] for s in rng.integers(0, 2, k)]
        radii = [int(rng.integers(max(1, round(lo * scale)), max(1, round(hi * scale)) + 1))
                 for lo, hi in (_RADIUS[s] for s in sizes)]
        pos = _place(rng, radii, size, clear)
        if pos is not None:
            return [{"shape": SHAPES[sh], "colour": names[c], "size": sz, "x": x, "y": y, "r": r}
                    for sh, c, sz, (x, y), r in zip(shapes, colours, sizes, pos, radii)]


def generate(n: int, seed: int, size: int = 64, min_objects: int = 1, max_objects: int = 3):
    """`n` scenes: uint8 images [n, size, size, 3] and per-image lists of object dicts
    (shape, colour, size, x, y, r). Deterministic in all arguments; ~40% single-object scenes."""
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    counts = np.arange(min_objects, max_objects + 1)
    p = np.full(len(counts), 1.0 / len(counts))
    if min_objects == 1 and len(counts) > 1:
        p[0], p[1:] = 0.4, 0.6 / (len(counts) - 1)
    cum = np.cumsum(p)[:-1]
    rng = np.random.Generator(np.random.PCG64(seed))
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    objects = []
    for i in range(n):
        k = int(counts[np.searchsorted(cum, rng.random(), side="right")])
        objs = _sample_scene(rng, size, k)
        images[i] = _render(rng, objs, size)
        objects.append(objs)
    return images, objects


# ---------------------------------------------------------------------------------------------- captions
def _phrase(o: dict, rng, p_size: float) -> str:
    return f"{o['size']} {o['colour']} {o['shape']}" if rng.random() < p_size else f"{o['colour']} {o['shape']}"


def _listing(objs: list[dict], rng, p_size: float) -> str:
    parts = [f"a {_phrase(objs[j], rng, p_size)}" for j in rng.permutation(len(objs))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _caption(objs: list[dict], rng) -> tuple[str, str]:
    """(style, caption) for one scene, the style drawn at random."""
    weights = [0.2, 0.15, 0.4, 0.25] if len(objs) == 1 else [0.4, 0.2, 0.15, 0.25]
    style = STYLES[int(np.searchsorted(np.cumsum(weights)[:-1], rng.random(), side="right"))]
    if style == "photo":
        return style, f"a photo of {_listing(objs, rng, 0.4)}."
    if style == "list":
        prefix = ("", "", "a picture showing ", "shapes: ")[rng.integers(4)]
        return style, prefix + _listing(objs, rng, 0.3)
    if style == "descriptive":
        if len(objs) == 1:
            template = ("a {}.", "a {} on a dark background.", "there is a {} in the image.")[rng.integers(3)]
            return style, template.format(_phrase(objs[0], rng, 0.7))
        o = [objs[j] for j in rng.permutation(len(objs))]
        text = f"a {_phrase(o[0], rng, 0.6)} {RELATIONS[_relation(o[0], o[1])]} a {_phrase(o[1], rng, 0.6)}"
        if len(o) > 2:
            text += f", and a {_phrase(o[2], rng, 0.6)} {RELATIONS[_relation(o[2], o[1])]} the " \
                    f"{o[1]['colour']} {o[1]['shape']}"
        return style, text
    # alt-text: bare words, random order, dropped words, odd separators, tags
    chunks = []
    for j in rng.permutation(len(objs)):
        words = [objs[j]["colour"], objs[j]["shape"]]
        if rng.random() < 0.15:
            words.pop(int(rng.integers(2)))
        elif rng.random() < 0.3:
            words.reverse()
        if rng.random() < 0.3:
            words.insert(0, objs[j]["size"])
        chunks.append(" ".join(words))
    text = (" ", ", ", "  ", " | ")[rng.integers(4)].join(chunks)
    if rng.random() < 0.4:
        text += " " + _TAGS[rng.integers(len(_TAGS))]
    return style, text


# ---------------------------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """Where generated scenes are cached: $VLPT_CACHE/scenes, else ~/.cache/vlpt/scenes."""
    return Path(os.environ.get("VLPT_CACHE") or Path.home() / ".cache" / "vlpt") / "scenes"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_generate(n: int, seed: int, size: int = 64, min_objects: int = 1, max_objects: int = 3):
    """`generate`, memoised on disk (a hit returns identical data)."""
    params = {"version": GENERATOR_VERSION, "n": n, "seed": seed, "size": size,
              "min_objects": min_objects, "max_objects": max_objects}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:24]
    d = cache_dir()
    npz, meta = d / f"{key}.npz", d / f"{key}.json"
    if npz.exists() and meta.exists():
        try:
            with np.load(npz) as f:
                images = f["images"]
            return images, json.loads(meta.read_text())["objects"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable entry: regenerate and overwrite
    images, objects = generate(n, seed, size, min_objects, max_objects)
    try:
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write(meta, lambda f: f.write(json.dumps({"params": params, "objects": objects}).encode()))
        _atomic_write(npz, lambda f: np.savez(f, images=images))
    except OSError as e:
        warnings.warn(f"could not cache scenes in {d}: {e}")
    return images, objects


# ---------------------------------------------------------------------------------------------- data sets
class _ArrayLoader:
    """Picklable `load` for ImageTextSet: index -> PIL image of array[index]."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __call__(self, i) -> Image.Image:
        return Image.fromarray(self.array[i])


def scenes_set(split: str = "train", n: int | None = None, size: int = 64,
               captions_per_image: int | None = None, seed: int = 0) -> ImageTextSet:
    """A scenes split: "train" (20000 images, 2 captions each), "test" (500, 2 captions), or a single-object
    classification set "colour" / "shape" / "colour_shape" (1000 images, one "a photo of a {class}." each,
    with labels and classnames; the three share their images). "CLASSES:train" is a probe's training set of
    those classes (2000 other single-object images), "CLASSES:test" the 1000 of "CLASSES"."""
    split, _, part = split.partition(":")
    split = _ALIASES.get(split, split)
    if part and not (split in CLASSIFICATION_SPLITS and part in ("train", "test")):
        raise ValueError(f"unknown scenes split {split}:{part!r}; only {', '.join(CLASSIFICATION_SPLITS)} take "
                         f":train or :test")
    if split in ("train", "test"):
        n = n if n is not None else (20000 if split == "train" else 500)
        s = _stream_seed(seed, split)
        images, objects = cached_generate(n, s, size)
        rng = np.random.Generator(np.random.PCG64([s, 1]))
        cpi = captions_per_image or 2
        captions = [_caption(objs, rng)[1] for objs in objects for _ in range(cpi)]
        return ImageTextSet(f"scenes:{split}", list(range(n)), _ArrayLoader(images), captions,
                            [i for i in range(n) for _ in range(cpi)])
    if split in CLASSIFICATION_SPLITS:
        stream = "classify_train" if part == "train" else "classify"
        n = n if n is not None else (PROBE_TRAIN_IMAGES if part == "train" else 1000)
        images, objects = cached_generate(n, _stream_seed(seed, stream), size, 1, 1)
        if split == "colour":
            classnames, names = list(COLOURS), [o[0]["colour"] for o in objects]
        elif split == "shape":
            classnames, names = list(SHAPES), [o[0]["shape"] for o in objects]
        else:
            classnames = [f"{c} {s}" for c in COLOURS for s in SHAPES]
            names = [f"{o[0]['colour']} {o[0]['shape']}" for o in objects]
        labels = [classnames.index(x) for x in names]
        return ImageTextSet(f"scenes:{split}" + (f":{part}" if part else ""), list(range(n)), _ArrayLoader(images),
                            [f"a photo of a {x}." for x in names], list(range(n)), labels, classnames)
    if split == "relation":
        return relation_set(n if n is not None else 300, size, seed)[0]
    raise ValueError(f"unknown scenes split {split!r}; valid: {', '.join(SPLITS)}")


def relation_set(n: int = 300, size: int = 64, seed: int = 0) -> tuple[ImageTextSet, list[dict]]:
    """Two-object scenes with an unambiguous relation, their true captions, and per image a dict with
    "image", "true", "swap_objects", "swap_attributes", "relation" (and "objects")."""
    rng = np.random.Generator(np.random.PCG64(_stream_seed(seed, "relation")))
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    items = []
    for i in range(n):
        a, b = _sample_scene(rng, size, 2, distinct=True, clear=True)
        images[i] = _render(rng, [a, b], size)
        rel = _relation(a, b)
        words = RELATIONS[rel]
        items.append({
            "image": i, "relation": rel, "objects": [a, b],
            "true": f"a {a['colour']} {a['shape']} {words} a {b['colour']} {b['shape']}",
            "swap_objects": f"a {b['colour']} {b['shape']} {words} a {a['colour']} {a['shape']}",
            "swap_attributes": f"a {b['colour']} {a['shape']} {words} a {a['colour']} {b['shape']}",
        })
    data = ImageTextSet("scenes:relation", list(range(n)), _ArrayLoader(images),
                        [it["true"] for it in items], list(range(n)))
    return data, items


def load_scenes(split: str = "train", **kw) -> ImageTextSet:
    """Data-spec entry point: "scenes" -> train, "scenes:<split>" -> that split (see SPLITS)."""
    split = split or "train"
    name, _, part = split.partition(":")
    name = _ALIASES.get(name, name)
    if name not in SPLITS or (part and not (name in CLASSIFICATION_SPLITS and part in ("train", "test"))):
        raise BadDataError(f"unknown scenes split {split!r}; valid: {', '.join(SPLITS)}, and "
                           f"{'/'.join(CLASSIFICATION_SPLITS)} with :train (a probe's training images) or :test")
    return scenes_set(split, **kw)
