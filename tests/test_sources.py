"""Real data sources: loaders, the spec parser, bad images, shards and mixtures (tiny fixtures in tmp_path)."""
import io
import json
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlpt.data.dataset import ImageTextSet, to_uint8
from vlpt.data.mixing import mix, parse_mixture
from vlpt.data.sources import (BadDataError, decode_all, load_captions_table, load_coco, load_flickr8k,
                               load_image_folder, open_data, open_source, shared_data_dir)
from vlpt.data.webdataset_io import pack, read_shards, write_shards


def make_image(path: Path, seed: int, size=(24, 20)) -> Path:
    """A smooth colour gradient (JPEG-friendly), different per seed."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 4 + seed * 20 % 140, yy * 4 + seed * 30 % 160,
                    np.full_like(xx, seed * 40 % 256)], -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(rgb).save(path)
    return path


@pytest.fixture
def pics(tmp_path):
    d = tmp_path / "pics"
    return [make_image(d / name, i) for i, name in enumerate(["a.jpg", "b.png", "c.jpg", "d.png"])]


def test_csv_column_detection_and_grouping(tmp_path, pics):
    table = tmp_path / "pics" / "pairs.csv"
    table.write_text('id,filepath,title\n1,a.jpg,"a red, thing"\n2,a.jpg,another\n3,b.png,third\n')
    s = load_captions_table(table)
    assert s.num_images == 2 and len(s) == 3
    assert s.captions == ["a red, thing", "another", "third"]
    assert s.caption_image == [0, 0, 1]
    assert s.images[0] == str(pics[0])  # resolved against the table's folder
    s2 = load_captions_table(table, image_root="/elsewhere")
    assert s2.images[1] == "/elsewhere/b.png"


def test_tsv_and_sniffed_table(tmp_path, pics):
    (tmp_path / "t.tsv").write_text(f"Image\tCaption\n{pics[1]}\tone, two\n")
    s = load_captions_table(tmp_path / "t.tsv")
    assert s.images == [str(pics[1])] and s.captions == ["one, two"]
    (tmp_path / "t.txt").write_text(f"url\ttext\n{pics[2]}\tx\n{pics[3]}\ty\n")
    assert load_captions_table(tmp_path / "t.txt").num_images == 2


def test_table_without_known_columns(tmp_path):
    (tmp_path / "bad.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*image column.*foo.*bar"):
        load_captions_table(tmp_path / "bad.csv")


@pytest.fixture
def flickr(tmp_path):
    root = tmp_path / "flickr"
    names = [f"{i}_x.jpg" for i in range(5)]
    for i, n in enumerate(names):
        make_image(root / "Images" / n, i)
    rows = ["image,caption"] + [f'{n},"caption {k} of {n}, with comma"' for n in names for k in range(2)]
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text(f"{names[0]}\n{names[1]}\n{names[2]}\n")
    (root / "Flickr_8k.devImages.txt").write_text(f"{names[3]}\n")
    (root / "Flickr_8k.testImages.txt").write_text(f"{names[4]}\n{names[1]}\n")  # order kept
    return root, names


def test_flickr8k_splits(flickr):
    root, names = flickr
    sizes = {sp: (load_flickr8k(root, sp).num_images, len(load_flickr8k(root, sp))) for sp in
             ("train", "dev", "test", "all")}
    assert sizes == {"train": (3, 6), "dev": (1, 2), "test": (2, 4), "all": (5, 10)}
    test = load_flickr8k(root, "test")
    assert [Path(p).name for p in test.images] == [names[4], names[1]]
    assert test.captions[0] == f"caption 0 of {names[4]}, with comma" and test.caption_image == [0, 0, 1, 1]
    assert open_source(f"flickr8k:{root}:test").captions == test.captions
    assert open_source(str(root)).num_images == 3  # bare folder with captions.txt: flickr8k, train
    with pytest.raises(ValueError, match="split"):
        load_flickr8k(root, "valid")


def test_coco(tmp_path, pics):
    ann = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.png"}],
           "annotations": [{"image_id": 9, "caption": "b1"}, {"image_id": 7, "caption": "a1"},
                           {"image_id": 9, "caption": "b2"}]}
    (tmp_path / "pics" / "caps.json").write_text(json.dumps(ann))
    s = load_coco(tmp_path / "pics" / "caps.json")
    assert s.images == [str(pics[0]), str(pics[1])]
    assert s.captions == ["a1", "b1", "b2"] and s.caption_image == [0, 1, 1]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(ann))
    s2 = open_source(f"coco:{other}:{tmp_path / 'pics'}")
    assert s2.images[0] == str(pics[0])


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "cls"
    for split in ("train", "test"):
        for c, cname in enumerate(["sea_lion", "cat"]):
            for k in range(3):
                make_image(root / split / cname / f"{k}.jpg", c * 3 + k)
    return root


def test_image_folder(folder):
    with pytest.raises(ValueError, match="pick one"):
        load_image_folder(folder)
    s = load_image_folder(folder, split="test")
    assert s.classnames == ["cat", "sea lion"]  # sorted folder names, underscores to spaces
    assert s.labels == [0, 0, 0, 1, 1, 1] and s.num_images == len(s) == 6
    assert all(s.classnames[lb] in c for lb, c in zip(s.labels, s.captions))
    assert load_image_folder(folder / "test").captions == s.captions  # seeded
    assert load_image_folder(folder / "test", templates=["{}!"]).captions[0] == "cat!"
    assert open_source(f"folder:{folder}:train").labels == s.labels
    assert open_source(str(folder / "train")).classnames == s.classnames


def test_decode_all_skips_and_limits_bad_images(tmp_path, pics):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(0).bytes(300))
    missing = tmp_path / "missing.jpg"
    refs = [str(p) for p in pics] + [str(corrupt), str(missing)]
    s = ImageTextSet("t", refs, Image.open, [f"c{i}" for i in range(6)], list(range(6)))
    imgs, good, bad = decode_all(s, 16, max_bad_fraction=0.5, progress=False)
    assert imgs.shape == (4, 3, 16, 16) and imgs.dtype == torch.uint8
    assert bad == [str(corrupt), str(missing)]
    assert good.captions == ["c0", "c1", "c2", "c3"] and good.num_images == 4
    assert torch.equal(imgs[1], to_uint8(Image.open(pics[1]), 16))
    with pytest.raises(BadDataError, match=r"^2 of 6 images .*data\.max_bad_fraction=0\.01 \(first: \S*corrupt\.jpg") as err:
        decode_all(s, 16, progress=False)
    assert "\n" not in str(err.value)


def test_shards_round_trip(tmp_path, pics):
    s = ImageTextSet("t", [str(p) for p in pics], Image.open, ["a1", "a2", "b", "c", "d1", "d2"],
                     [0, 0, 1, 2, 3, 3])
    shards = write_shards(s, str(tmp_path / "out" / "shard-%06d.tar"), maxcount=3)
    assert [Path(p).name for p in shards] == ["shard-000000.tar", "shard-000001.tar"]
    for urls in (str(tmp_path / "out"), str(tmp_path / "out" / "shard-{000000..000001}.tar"),
                 str(tmp_path / "out" / "*.tar"), shards):
        back, skipped = read_shards(urls)
        assert skipped == 0
        assert back.captions == s.captions and back.caption_image == s.caption_image
    assert back.images[0].data == pics[0].read_bytes()  # JPEG files are stored as they are
    for i in range(4):
        a = to_uint8(s.load(s.images[i]), 20).float()
        b = to_uint8(back.load(back.images[i]), 20).float()
        assert (a - b).abs().mean() < 3  # PNG sources re-encoded as JPEG
    small, _ = read_shards(write_shards(s, str(tmp_path / "small-%03d.tar"), size=10))
    assert min(small.load(small.images[1]).size) == 10


def test_shards_keep_labels_and_survive_bad_input(tmp_path, folder):
    s = load_image_folder(folder, split="test")
    shards = write_shards(s, str(tmp_path / "w" / "s-%04d.tar"), maxcount=4)
    (tmp_path / "w" / "s-9999.tar").write_bytes(b"not a tar file at all" * 50)
    with tarfile.open(tmp_path / "w" / "s-9998.tar", "w") as tar:  # one sample without an image
        info = tarfile.TarInfo("000000001.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    back, skipped = read_shards(str(tmp_path / "w"))
    assert skipped == 2
    assert back.labels == s.labels and back.classnames == s.classnames and back.captions == s.captions
    imgs, _, bad = decode_all(back, 8, progress=False)
    assert imgs.shape[0] == 6 and bad == []
    assert len(shards) == 2 and open_source(f"wds:{tmp_path / 'w'}/s-{{0000..0001}}.tar").num_images == 6


def test_pack(tmp_path, folder):
    shards = pack(f"folder:{folder}:train", str(tmp_path / "p" / "%02d.tar"), maxcount=100, size=8)
    back = open_source(shards[0])
    assert back.num_images == 6 and back.load(back.images[0]).size == (10, 8)


def test_mixture(folder, flickr):
    a, b = load_image_folder(folder, split="train"), load_flickr8k(flickr[0], "all")
    mixed, p = mix([a, b], [0.7, 0.3])
    assert len(mixed) == len(a) + len(b) and mixed.num_images == a.num_images + b.num_images
    assert p[: len(a)].sum().item() == pytest.approx(0.7) and p[len(a):].sum().item() == pytest.approx(0.3)
    assert torch.allclose(p[: len(a)], p[0].expand(len(a)))  # uniform within a source
    k = len(a) + 1
    assert mixed.images[mixed.caption_image[k]].ref == b.images[b.caption_image[1]]
    assert mixed.load(mixed.images[-1]).size == (24, 20)
    assert mixed.labels is None  # only one source has labels
    assert parse_mixture("x:/p@0.7 + y:/q") == [("x:/p", 0.7), ("y:/q", 1.0)]
    spec = f"folder:{folder}:train@3 + flickr8k:{flickr[0]}:all@1"
    s, q = open_data(spec)
    assert q[: len(a)].sum().item() == pytest.approx(0.75)
    assert open_data(f"folder:{folder}:train")[1] is None
    with pytest.raises(ValueError, match="open_data"):
        open_source(spec)
    for bad in ("x@0 + y", "x@-1", " + y"):
        with pytest.raises(ValueError):
            parse_mixture(bad)


def test_spec_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"flickr9k.*did you mean 'flickr8k'.*scenes"):
        open_source("flickr9k:/x")
    with pytest.raises(BadDataError, match="nope.csv"):
        open_source("csv:/nowhere/nope.csv")
    with pytest.raises(BadDataError, match="nowhere"):
        open_source(str(tmp_path / "nowhere"))
    with pytest.raises(BadDataError, match="nope"):
        open_source(f"folder:{tmp_path / 'nope'}:test")
    with pytest.raises(ValueError, match="needs a path"):
        open_source("csv")
    fake = types.ModuleType("vlpt.data.scenes")
    fake.load_scenes = lambda split="train": f"scenes-{split}"
    monkeypatch.setitem(sys.modules, "vlpt.data.scenes", fake)
    assert open_source("scenes") == "scenes-train" and open_source("scenes:colour") == "scenes-colour"


def test_shared_data_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPT_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.setenv("VLPT_SHARED_DATA", str(tmp_path / "absent"))
    assert shared_data_dir() is None
    with pytest.raises(BadDataError, match="VLPT_SHARED_DATA"):
        open_source("cifar10:test")


def _shared(sub):
    base = shared_data_dir()
    if base is None or not (base / sub).is_dir():
        pytest.skip(f"shared data {sub} not available")
    return base / sub


def test_real_flickr8k_test_split():
    _shared("flickr8k")
    s = open_source("flickr8k:test")
    assert s.num_images == 1000 and len(s) == 5000
    first = (shared_data_dir() / "flickr8k" / "Flickr_8k.testImages.txt").read_text().split()[0]
    assert Path(s.images[0]).name == first and Path(s.images[0]).is_file()


def test_real_cifar10_test_metadata():
    _shared("cifar10")
    s = open_source("cifar10:test")
    assert len(s.classnames) == 10 and s.num_images == 10000 and len(s) == 10000
    assert np.bincount(s.labels).tolist() == [1000] * 10
