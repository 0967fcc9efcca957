"""The built-in compositional scenes: determinism, caching, held-out splits, labels, relations, captions."""
import collections
import re

import numpy as np
import pytest
from PIL import Image

from vlpt.data import scenes
from vlpt.data.dataset import ImageTextSet


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPT_CACHE", str(tmp_path))
    return tmp_path / "scenes"


def _foreground_colour(img: np.ndarray) -> np.ndarray:
    """Median colour of the object pixels (the background is dark: every channel < 60)."""
    fg = img.reshape(-1, 3)[img.reshape(-1, 3).max(axis=1) > 100]
    return np.median(fg, axis=0)


def _nearest_colour(rgb) -> str:
    return min(scenes.COLOURS, key=lambda c: np.sum((np.array(scenes.COLOURS[c]) - rgb) ** 2))


def test_generate_deterministic_and_seed_dependent():
    a_img, a_obj = scenes.generate(40, seed=3)
    b_img, b_obj = scenes.generate(40, seed=3)
    c_img, c_obj = scenes.generate(40, seed=4)
    assert a_img.shape == (40, 64, 64, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_obj == b_obj
    assert not np.array_equal(a_img, c_img) and a_obj != c_obj
    small, _ = scenes.generate(5, seed=0, size=32)
    assert small.shape == (5, 32, 32, 3)


def test_scene_layout():
    _, objects = scenes.generate(600, seed=0)
    counts = collections.Counter(len(o) for o in objects)
    assert set(counts) == {1, 2, 3} and 0.33 < counts[1] / 600 < 0.47  # single objects are common
    for objs in objects:
        for o in objs:
            assert o["colour"] in scenes.COLOURS and o["shape"] in scenes.SHAPES and o["size"] in scenes.SIZES
            assert o["r"] <= o["x"] < 64 - o["r"] and o["r"] <= o["y"] < 64 - o["r"]
        for i, a in enumerate(objs):  # no overlap
            for b in objs[i + 1:]:
                assert np.hypot(a["x"] - b["x"], a["y"] - b["y"]) >= a["r"] + b["r"]
    _, one = scenes.generate(20, seed=0, min_objects=1, max_objects=1)
    assert all(len(o) == 1 for o in one)


def test_scenes_set_deterministic_and_cached(cache):
    a = scenes.scenes_set("train", n=30)
    files = sorted(p.suffix for p in cache.iterdir())
    assert files == [".json", ".npz"]  # no temp files left behind
    b = scenes.scenes_set("train", n=30)  # cache hit
    assert isinstance(b, ImageTextSet) and a.name == "scenes:train"
    assert a.captions == b.captions and a.caption_image == b.caption_image
    assert np.array_equal(a.load.array, b.load.array)
    # a hit returns exactly what generating afresh gives
    for p in cache.iterdir():
        p.unlink()
    c = scenes.scenes_set("train", n=30)
    assert np.array_equal(a.load.array, c.load.array) and a.captions == c.captions
    assert len(a) == 60 and a.num_images == 30 and a.caption_image[:4] == [0, 0, 1, 1]
    img = a.load(a.images[0])
    assert isinstance(img, Image.Image) and img.size == (64, 64) and img.mode == "RGB"
    assert scenes.scenes_set("train", n=30, seed=1).captions != a.captions
    assert len(scenes.scenes_set("test", n=10, captions_per_image=3)) == 30


def test_corrupt_cache_entry_is_regenerated(cache):
    a = scenes.scenes_set("test", n=8)
    for p in cache.glob("*.npz"):
        p.write_bytes(b"garbage")
    b = scenes.scenes_set("test", n=8)
    assert np.array_equal(a.load.array, b.load.array)


def test_splits_are_disjoint():
    train = scenes.scenes_set("train", n=300).load.array
    held_out = [scenes.scenes_set("test", n=100).load.array, scenes.scenes_set("colour", n=100).load.array,
                scenes.relation_set(50)[0].load.array]
    seen = {x.tobytes() for x in train}
    for arr in held_out:
        assert not any(x.tobytes() in seen for x in arr)


@pytest.mark.parametrize("split,n_classes", [("colour", 8), ("shape", 5), ("colour_shape", 40)])
def test_classification_sets(split, n_classes):
    data = scenes.scenes_set(split, n=120)
    assert len(data.classnames) == n_classes and len(data.labels) == data.num_images == len(data) == 120
    assert data.captions == [f"a photo of a {data.classnames[y]}." for y in data.labels]
    assert len(set(data.labels)) > n_classes // 2
    for i, y in enumerate(data.labels[:40]):  # labels agree with the pixels
        img = np.asarray(data.load(data.images[i]))
        name = data.classnames[y]
        if split != "shape":
            assert _nearest_colour(_foreground_colour(img)) == name.split()[0]


def test_classification_colours_match_objects():
    data = scenes.scenes_set("colour_shape", n=60)
    _, objects = scenes.cached_generate(60, scenes._stream_seed(0, "classify"), 64, 1, 1)
    for y, objs in zip(data.labels, objects):
        assert data.classnames[y] == f"{objs[0]['colour']} {objs[0]['shape']}"


def test_relation_set():
    data, items = scenes.relation_set(60)
    again, items2 = scenes.relation_set(60)
    assert items == items2 and np.array_equal(data.load.array, again.load.array)
    assert data.captions == [it["true"] for it in items] and data.caption_image == list(range(60))
    assert {it["relation"] for it in items} == set(scenes.RELATIONS)
    for it in items:
        a, b = it["objects"]
        assert len({it["true"], it["swap_objects"], it["swap_attributes"]}) == 3
        assert a["colour"] != b["colour"] and a["shape"] != b["shape"]  # so both swaps are false
        assert scenes._relation(a, b) == it["relation"] and scenes._relation(b, a) != it["relation"]
        # the relation holds in the pixels: centroids of each object's colour
        img = np.asarray(data.load(it["image"])).astype(int)
        centres = []
        for o in (a, b):
            mask = (np.abs(img - scenes.COLOURS[o["colour"]]).max(axis=2) < 8)
            ys, xs = np.nonzero(mask)
            centres.append((xs.mean(), ys.mean()))
        (ax, ay), (bx, by) = centres
        expected = {"left_of": ax < bx, "right_of": ax > bx, "above": ay < by, "below": ay > by}
        assert expected[it["relation"]]
        # the attribute swap names colour-shape pairs that are not in the image
        pairs = {f"{o['colour']} {o['shape']}" for o in (a, b)}
        swapped = re.findall(r"a (\w+ \w+)", it["swap_attributes"])
        assert len(swapped) == 2 and not pairs & set(swapped)


def test_caption_styles_and_content():
    rng = np.random.Generator(np.random.PCG64(0))
    _, objects = scenes.generate(300, seed=1)
    styles = collections.Counter()
    for objs in objects:
        style, text = scenes._caption(objs, rng)
        styles[style] += 1
        words = set(re.findall(r"\w+", text))
        if style != "alt":  # alt-text may drop words; every other style names every object
            assert all(o["colour"] in words and o["shape"] in words for o in objs)
        if style == "descriptive" and len(objs) > 1:
            assert any(p in text for p in scenes.RELATIONS.values())
    assert set(styles) == set(scenes.STYLES)
    caps = scenes.scenes_set("train", n=300).captions
    assert any(c.startswith("a photo of a ") and c.endswith(".") and " and " not in c for c in caps)
    assert any("to the left of" in c for c in caps) and any(" above " in c for c in caps)
    assert any("#" in c for c in caps)


def test_load_scenes():
    assert scenes.load_scenes(n=5).name == "scenes:train"
    assert scenes.load_scenes("test", n=5).name == "scenes:test"
    assert scenes.load_scenes("color", n=5).classnames == list(scenes.COLOURS)
    assert len(scenes.load_scenes("relation", n=4)) == 4
    with pytest.raises(ValueError, match="colour_shape"):
        scenes.load_scenes("nope")


def test_probe_splits_train_on_other_images_with_the_test_sets_labels():
    train, test = scenes.load_scenes("colour_shape:train", n=80), scenes.load_scenes("colour_shape:test", n=80)
    assert (train.name, test.name, train.num_images) == ("scenes:colour_shape:train", "scenes:colour_shape:test", 80)
    assert train.classnames == test.classnames == scenes.scenes_set("colour_shape").classnames
    assert test.load.array.tobytes() == scenes.scenes_set("colour_shape", n=80).load.array.tobytes()  # the same set
    assert not {x.tobytes() for x in train.load.array} & {x.tobytes() for x in test.load.array}  # other images
    assert scenes.load_scenes("shape:train").num_images == scenes.PROBE_TRAIN_IMAGES
    with pytest.raises(ValueError, match=":train"):
        scenes.load_scenes("relation:train")
