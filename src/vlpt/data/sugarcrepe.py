"""Hard-negative caption pairs in the SugarCrepe JSON format (Hsieh et al. 2023).

Layout of a folder DIR (data spec `sugarcrepe:DIR`):
    DIR/<category>.json   one file per category (SugarCrepe's: add_att, add_obj, replace_att, replace_obj,
                          replace_rel, swap_att, swap_obj), each {id: {"filename", "caption", "negative_caption"}}
    DIR/images/           the images the files name by "filename" (for SugarCrepe: COCO val2017, or a link to it)
As a data set it is the images with their true captions; `read_pairs` gives the pairs for evaluation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from .dataset import ImageTextSet
from .sources import BadDataError, load_path

FIELDS = ("filename", "caption", "negative_caption")
LAYOUT = ("a SugarCrepe folder holds one <category>.json per category, each {id: {\"filename\", \"caption\", "
          "\"negative_caption\"}}, and an images/ folder with the files they name")


class Pair(NamedTuple):
    category: str
    id: str
    image: str  # path of the image file
    caption: str
    negative: str


def _entries(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise BadDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); {LAYOUT}") from None
    except UnicodeDecodeError as e:
        raise BadDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if not isinstance(data, dict) or not data:
        what = "an empty object" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise BadDataError(f"{path}: {what}, not an object of pairs; {LAYOUT}")
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise BadDataError(f"{path}: entry {key!r} is a {type(entry).__name__}, not an object with "
                               f"{', '.join(FIELDS)}")
        for field in FIELDS:
            value = entry.get(field)
            if not isinstance(value, str) or not value.strip():
                found = "missing" if field not in entry else f"{value!r}"
                raise BadDataError(f"{path}: entry {key!r} has no usable {field!r} (found {found}); every entry needs "
                                   f"a non-empty {', '.join(FIELDS)}")
    return data


def read_pairs(root: str | Path) -> list[Pair]:
    """Every pair of every category file, categories in name order, pairs in file order."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BadDataError(f"SugarCrepe folder not found: {root}; {LAYOUT}")
    files = sorted(root.glob("*.json"))
    if not files:
        raise BadDataError(f"{root}: no .json files; {LAYOUT}")
    images = root / "images"
    if not images.is_dir():
        raise BadDataError(f"{images} not found; put the images the JSON files name there (a link to COCO's "
                           f"val2017 folder for SugarCrepe)")
    return [Pair(f.stem, str(key), str(images / e["filename"]), e["caption"].strip(), e["negative_caption"].strip())
            for f in files for key, e in _entries(f).items()]


def load_sugarcrepe(root: str | Path) -> ImageTextSet:
    """The images of a SugarCrepe folder, each with the true captions that name it (each once)."""
    pairs = dict.fromkeys((p.image, p.caption) for p in read_pairs(root))
    index: dict[str, int] = {}
    caption_image = [index.setdefault(image, len(index)) for image, _ in pairs]
    return ImageTextSet(f"sugarcrepe-{Path(root).name}", list(index), load_path, [c for _, c in pairs], caption_image)
