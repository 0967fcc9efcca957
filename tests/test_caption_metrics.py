"""Caption metrics: BLEU-1..4 / CIDEr-D against pycocoevalcap, and the pure-Python PTB tokeniser."""
from __future__ import annotations

import csv
import math
import shutil
import warnings

import pytest

from vlpt.data.sources import shared_data_dir
from vlpt.eval import captioning
from vlpt.eval.captioning import caption_metrics, ptb_tokenize_python

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs java")

# (caption, what PTBTokenizer -lowerCase -preserveLines + pycocoevalcap's punctuation removal gives),
# recorded from Stanford PTBTokenizer 3.4.1 (the jar pycocoevalcap ships).
PTB_CASES = [
    ("A black dog is running through the grass.", "a black dog is running through the grass"),
    ("Two dogs , one cat .", "two dogs one cat"),
    ("A man's dog.", "a man 's dog"),
    ("Don't do it!", "do n't do it"),
    ("He can't go", "he ca n't go"),
    ("They won't stop , it's late .", "they wo n't stop it 's late"),
    ("shouldn't've", "should n't 've"),
    ("cannot", "can not"),
    ("gonna", "gon na"),
    ("Let's go", "let 's go"),
    ("a (red) dog", "a -lrb- red -rrb- dog"),
    ("A man in a red shirt ( left ) .", "a man in a red shirt -lrb- left -rrb-"),
    ("a [red] dog", "a -lsb- red -rsb- dog"),
    ('"Hi," he said.', "hi he said"),
    ("'single' quotes", "single quotes"),
    ("dogs' toys", "dogs toys"),
    ("Mr. Smith at St. Paul's", "mr. smith at st. paul 's"),
    ("a st. bernard dog", "a st. bernard dog"),
    ("The answer is no.", "the answer is no"),
    ("the no. 1 jersey", "the no. 1 jersey"),
    ("U.S. flag", "u.s. flag"),
    ("3 p.m. today", "3 p.m. today"),
    ("3.5 miles", "3.5 miles"),
    ("1,000 people", "1,000 people"),
    ("at 3:30 , dog;cat:bird", "at 3:30 dog cat bird"),
    ("a -- b a--b a - b", "a b a b a b"),
    ("black-and-white e-mail word-", "black-and-white e-mail word"),
    ("wait... ok", "wait ok"),
    ("hello?! okay!!! what?", "hello ?! okay !!! what"),
    ("50% off , $5 bill , #1 fan , #hashtag", "50 % off $ 5 bill # 1 fan #hashtag"),
    ("R&B music , x&y", "r&b music x & y"),
    ("the 1990's '90s", "the 1990 's '90s"),
    ("A young boy slides on a Slip 'n' Slide .", "a young boy slides on a slip 'n' slide"),
    ("a dog\u2019s bone , \u201cquoted\u201d", "a dog 's bone quoted"),
    ("A DOG", "a dog"),
    ("tab\there", "tab here"),
    ("", ""),
    ("   ", ""),
]


def test_fallback_tokeniser_on_typical_captions():
    for text, expected in PTB_CASES:
        assert ptb_tokenize_python(text) == expected, text


@needs_java
def test_recorded_cases_are_what_ptbtokenizer_gives():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": t}] for i, (t, _) in enumerate(PTB_CASES)})
    assert [out[i][0] for i in range(len(PTB_CASES))] == [e for _, e in PTB_CASES]


@needs_java
def test_fallback_matches_ptbtokenizer_on_flickr8k():
    """All 40,455 Flickr8k captions: the fallback agrees with Java on all but a handful of oddities."""
    root = shared_data_dir()
    if root is None or not (root / "flickr8k" / "captions.txt").is_file():
        pytest.skip("shared Flickr8k data not present")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with open(root / "flickr8k" / "captions.txt", newline="") as f:
        caps = [r["caption"] for r in csv.DictReader(f)]
    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(caps)})
    differ = [c for i, c in enumerate(caps) if ptb_tokenize_python(c) != java[i][0]]
    assert len(differ) <= 5, differ[:10]  # today: 1 ("ant 's-eye-view")


# ------------------------------------------------------------------------------------------ the metrics

PREDICTIONS = {
    "img1": "A dog runs through the grass.",
    "img2": "Two children play on the beach .",
    "img3": "a man rides a bike down the street",
    "img4": "A woman in a red dress is dancing!",
    "img5": "a dog",
    "img6": "The black dog's ball is in the water",
}
REFERENCES = {
    "img1": ["A brown dog is running through the green grass .", "A dog runs across a field.",
             "The dog is running on the grass", "a dog running", "A puppy runs in the grass outdoors ."],
    "img2": ["Two kids are playing in the sand at the beach .", "Children play on a beach", "Two children at the sea."],
    "img3": ["A man is riding his bicycle down the road .", "A cyclist rides down a city street.",
             "a man on a bike"],
    "img4": ["A woman in a red dress dances .", "A lady dancing in red", "A woman is dancing on stage ."],
    "img5": ["A black dog is swimming .", "A dog swims in a lake", "A dog is in the water ."],
    "img6": ["A black dog fetches a ball from the water .", "The dog's ball floats in a pond",
             "A wet black dog with a ball ."],
}


def reference_scores(predictions, references) -> dict:
    """pycocoevalcap used the way its COCOEvalCap does: tokenise each side, then Bleu(4) and Cider()."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu1": bleu[0], "bleu2": bleu[1], "bleu3": bleu[2], "bleu4": bleu[3], "cider": cider}


@needs_java
def test_caption_metrics_equal_pycocoevalcap():
    ours = caption_metrics(PREDICTIONS, REFERENCES)
    ref = reference_scores(PREDICTIONS, REFERENCES)
    assert list(ours) == ["bleu1", "bleu2", "bleu3", "bleu4", "cider"]
    for name in ref:
        assert abs(ours[name] - ref[name]) < 1e-9, name
    assert 0 < ours["bleu4"] < ours["bleu1"] < 1 and ours["cider"] > 0


@needs_java
def test_caption_metrics_equal_pycocoevalcap_on_flickr8k_references():
    """Leave-one-out on 200 Flickr8k test images: each image's first caption predicted from the other four."""
    root = shared_data_dir()
    if root is None or not (root / "flickr8k" / "captions.txt").is_file():
        pytest.skip("shared Flickr8k data not present")
    from vlpt.data.sources import load_flickr8k

    ds = load_flickr8k(root / "flickr8k", "test")
    refs: dict[int, list[str]] = {}
    for caption, image in zip(ds.captions, ds.caption_image):
        refs.setdefault(image, []).append(caption)
    refs = {i: refs[i] for i in range(200)}
    preds = {i: refs[i][0] for i in refs}
    refs = {i: refs[i][1:] for i in refs}
    ours, ref = caption_metrics(preds, refs), reference_scores(preds, refs)
    assert all(abs(ours[n] - ref[n]) < 1e-9 for n in ref), (ours, ref)


def test_corpus_bleu_by_hand():
    # No punctuation or capitals, so PTB tokenisation (Java or fallback) is plain whitespace splitting.
    preds = {"a": "a dog runs on the grass", "b": "a cat"}
    refs = {"a": ["a dog runs on grass"], "b": ["a black cat sleeps", "the cat"]}
    # Corpus counts: hypothesis length 6 + 2 = 8, closest reference lengths 5 + 2 = 7 -> no brevity penalty.
    # clipped matches / guesses: 1-grams (5+2)/(6+2), 2-grams (3+0)/(5+1), 3-grams (2+0)/(4+0), 4-grams 1/3
    p = [7 / 8, 3 / 6, 2 / 4, 1 / 3]
    r = caption_metrics(preds, refs)
    for n in range(1, 5):
        assert r[f"bleu{n}"] == pytest.approx(math.prod(p[:n]) ** (1 / n), rel=1e-6)
    assert r["bleu1"] != pytest.approx((5 / 6 + 1) / 2)  # corpus level, not a mean of sentence scores

    # A short hypothesis pays the brevity penalty exp(1 - r/c).
    r = caption_metrics({"x": "a dog runs"}, {"x": ["a dog runs on grass"]})
    assert r["bleu1"] == pytest.approx(math.exp(1 - 5 / 3), rel=1e-6)


def test_perfect_and_disjoint_captions():
    refs = {i: [f"a {c} dog plays with a ball", f"the {c} dog is playing"] for i, c in enumerate(["red", "brown", "white"])}
    perfect = caption_metrics({i: v[0] for i, v in refs.items()}, refs)
    assert perfect["bleu1"] == pytest.approx(1.0) and perfect["bleu4"] == pytest.approx(1.0)
    disjoint = caption_metrics({i: "zebra zebra zebra zebra" for i in refs}, refs)
    assert disjoint["cider"] == 0.0 and disjoint["bleu1"] < 1e-6


def test_fallback_gives_java_scores_and_warns_once(monkeypatch):
    monkeypatch.setattr(captioning, "java_available", lambda: False)
    monkeypatch.setattr(captioning, "_warned", False)
    with pytest.warns(UserWarning, match="java not found"):
        fallback = caption_metrics(PREDICTIONS, REFERENCES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        caption_metrics(PREDICTIONS, REFERENCES)  # no second warning
    if shutil.which("java") is not None:
        monkeypatch.setattr(captioning, "java_available", lambda: True)
        assert fallback == caption_metrics(PREDICTIONS, REFERENCES)


def test_line_breaks_inside_captions_do_not_shift_the_others():
    # Java's PTB lexer ends a line at \r, \v, \f, U+2028, U+2029: each would shift every later caption
    odd = {k: v.replace(" ", sep, 1) for k, v, sep in zip(PREDICTIONS, PREDICTIONS.values(), "\r\x0b\x0c\u2028\u2029\r")}
    assert all(odd[k] != PREDICTIONS[k] for k in PREDICTIONS)
    assert caption_metrics(odd, REFERENCES) == caption_metrics(PREDICTIONS, REFERENCES)


def test_caption_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="same keys"):
        caption_metrics({"a": "x"}, {"a": ["x"], "b": ["y"]})
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({"a": "x"}, {"a": []})
    with pytest.raises(ValueError, match="at least one"):
        caption_metrics({}, {})
