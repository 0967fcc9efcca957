"""Caption metrics: corpus BLEU-1..4 and CIDEr-D through the reference package `pycocoevalcap`.

Both candidates and references are PTB-tokenised (lower case, punctuation removed) the way the COCO
caption evaluation does it: Stanford's PTBTokenizer, which needs `java`. Without Java a pure-Python
tokeniser that mimics PTBTokenizer's output on ordinary captions is used instead, with a one-time
warning; scores then may differ slightly from the reference. Scores are on pycocoevalcap's scale:
BLEU in [0, 1], CIDEr-D already multiplied by 10 (so a perfect caption scores about 10).
"""
from __future__ import annotations

import re
import shutil
import warnings
from typing import Hashable, Mapping, Sequence

# pycocoevalcap's PTBTokenizer.PUNCTUATIONS: tokens dropped after tokenisation (kept here so the
# fallback does not import the package's Java wrapper).
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider")

_LINE_BREAKS = str.maketrans({c: " " for c in "\r\x0b\x0c\x85\u2028\u2029"})
_warned = False


def java_available() -> bool:
    return shutil.which("java") is not None


# ------------------------------------------------------------------------------ pure-Python PTB mimic
# Abbreviations whose final period PTBTokenizer keeps (the ones that occur in captions).
_ABBREVIATIONS = frozenset("mr. mrs. ms. dr. st. mt. jr. sr. etc. vs. inc. co. ave. e.g. i.e. a.m. p.m.".split())
_CLITICS = ("n't", "'s", "'m", "'d", "'re", "'ve", "'ll")
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
                "wanna": ["wan", "na"], "gimme": ["gim", "me"], "lemme": ["lem", "me"], "'tis": ["'t", "is"]}
_KEEP_LEADING_APOSTROPHE = re.compile(r"^'(s|m|d|re|ve|ll|em|cause|\d\d?s?)$")
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_WHOLE_TOKENS = frozenset(t.strip() for t in _BRACKETS.values()) | {"'n'"}
_CHAR_MAP = str.maketrans({"\u2019": "'", "\u2018": "`", "\u201c": '"', "\u201d": '"', **_BRACKETS})
_ACRONYM = re.compile(r"^([a-z]\.)+$")  # u.s. a.m. o.k.
# "dog,cat" splits, "1,000" and "3:30" do not; "x&y" splits, "AT&T" does not
_INNER_SPLIT = re.compile(r"(--|;|=|'n'|(?<!\d)[,:]|[,:](?!\d)|(?<![A-Z])&|&(?![A-Z]))")


def _opens_with_punctuation(word: str) -> bool:
    c, low = word[0], word.lower()
    if c == "'":  # an opening quote, unless a clitic ('s) or a year ('90s)
        return not _KEEP_LEADING_APOSTROPHE.match(low) and low not in _SPLIT_WORDS
    if c in "$#":  # "$5" -> $ 5, but "#hashtag" stays
        return word[1].isdigit()
    return c in "-?!,;:." and word[:2] != "--"


def _peel(word: str, next_word: str) -> list[str]:
    """One whitespace-separated chunk -> tokens (PTB rules for leading/trailing punctuation and clitics)."""
    if word.lower() in _WHOLE_TOKENS or re.fullmatch(r"[!?]+", word):
        return [word]
    head: list[str] = []
    tail: list[str] = []
    while len(word) > 1 and _opens_with_punctuation(word):
        n = len(re.match(r"[!?]*|\.*", word).group(0)) or 1  # "?!" and "..." stay one token
        head.append(word[:n])
        word = word[n:]
    while word:  # trailing punctuation, outermost first
        m = re.search(r"(\.{2,}|[!?]+|[,;:%$']|-+)$", word)
        if m and m.start() > 0:
            tail.insert(0, "..." if m.group(0).startswith("..") else m.group(0))
            word = word[: m.start()]
        elif word.endswith(".") and len(word) > 1:
            low = word.lower()
            if low in _ABBREVIATIONS or _ACRONYM.match(low) or (low == "no." and next_word[:1].isdigit()):
                break
            tail.insert(0, ".")
            word = word[:-1]
        else:
            break
    core: list[str] = []
    for piece in _INNER_SPLIT.split(word):
        if not piece:
            continue
        clitics: list[str] = []
        while True:  # "shouldn't've" -> should n't 've
            c = next((c for c in _CLITICS if piece.lower().endswith(c) and len(piece) > len(c)), None)
            if c is None:
                break
            clitics.insert(0, c)
            piece = piece[: -len(c)]
        core += _SPLIT_WORDS.get(piece.lower(), [piece]) + clitics
    return head + core + tail


def ptb_tokenize_python(text: str) -> str:
    """PTBTokenizer(-lowerCase, -preserveLines) + punctuation removal, approximated in pure Python."""
    # Case matters to a few rules ("AT&T" vs "x&y"), so tokens are lower-cased at the end, as in Java.
    text = text.replace("\n", " ").translate(_CHAR_MAP).replace('"', " ").replace("`", " ' ")
    words = text.split()
    tokens: list[str] = []
    for i, w in enumerate(words):
        tokens += _peel(w, words[i + 1] if i + 1 < len(words) else "")
    # Java lower-cases before pycocoevalcap filters with its upper-case list, so "-lrb-" survives there too.
    return " ".join(t for t in (t.lower() for t in tokens) if t not in PUNCTUATIONS)


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """{key: [caption, ...]} -> {key: [tokenised caption, ...]}, with Java's PTBTokenizer when possible."""
    global _warned
    # Java ends a line at these too; one in a (generated) caption would shift every later caption.
    captions = {k: [c.translate(_LINE_BREAKS) for c in v] for k, v in captions.items()}
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    if not _warned:
        warnings.warn("java not found: caption metrics use a pure-Python imitation of the PTB tokenizer; "
                      "BLEU/CIDEr may differ slightly from the reference (install Java 8+ for exact scores)",
                      stacklevel=3)
        _warned = True
    return {k: [ptb_tokenize_python(c) for c in v] for k, v in captions.items()}


def caption_metrics(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> dict:
    """{"bleu1".."bleu4", "cider"} of one predicted caption per key against that key's references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(predictions) != set(references):
        missing, extra = set(references) - set(predictions), set(predictions) - set(references)
        raise ValueError(f"predictions and references must have the same keys: {len(missing)} keys have no "
                         f"prediction, {len(extra)} have no references (e.g. {next(iter(missing or extra))!r})")
    if not predictions:
        raise ValueError("caption_metrics needs at least one prediction")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"{len(empty)} keys have no reference captions (e.g. {empty[0]!r})")
    # One tokeniser call for both (one JVM start); tagged keys keep the two apart.
    merged = {("pred", k): [v] for k, v in predictions.items()} | {("ref", k): list(v) for k, v in references.items()}
    tok = ptb_tokenize(merged)
    res = {k: tok[("pred", k)] for k in predictions}
    gts = {k: tok[("ref", k)] for k in predictions}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}, "cider": float(cider)}
