"""`vlpt data info [--check]` and the one-line messages for common data mistakes (tiny fixtures in tmp_path)."""
import json
from pathlib import Path

import pytest
from PIL import Image

from vlpt import config
from vlpt.cli import main as cli_main
from vlpt.data.sources import BadDataError, load_captions_table, shared_data_dir
from vlpt.train.data import decode_training_data, open_training_data


def png(path: Path, k: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), (40 * k % 256, 90, 160)).save(path, format="PNG")
    return path.name


def table(folder: Path, rows: list[str], name: str = "t.csv", header: str = "image,caption") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join([header, *rows] if header else rows) + "\n")
    return folder / name


def info(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli_main(["data", "info", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, *argv: str) -> str:
    """The one-line reason `vlpt data info` gives for data training would refuse (exit status 1)."""
    rc, _, err = info(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize("sep", [";", "|", "\t"])
def test_csv_separator_is_sniffed(tmp_path, capsys, sep):
    names = [png(tmp_path / f"{k}.png", k) for k in range(3)]
    path = table(tmp_path, [f"{names[0]}{sep}a cat, sitting", f"{names[1]}{sep}a dog", f"{names[2]}{sep}a bird"],
                 header=f"image{sep}caption")
    s = load_captions_table(path)
    assert s.captions == ["a cat, sitting", "a dog", "a bird"] and s.images[1] == str(tmp_path / "1.png")
    rc, out, _ = info(capsys, path, "--show", "0")
    assert rc == 0 and out.splitlines()[0] == "t: 3 images, 3 captions"


def test_comma_csv_with_semicolons_in_quoted_captions_stays_comma(tmp_path):
    png(tmp_path / "a.png")
    path = table(tmp_path, ['a.png,"one; two; three"', 'a.png,"four, five"'])
    assert load_captions_table(path).captions == ["one; two; three", "four, five"]


@pytest.mark.parametrize("first", ["a.png,a cat", "photo,a cat"])
def test_headerless_table_is_named(tmp_path, capsys, first):
    png(tmp_path / "a.png")
    png(tmp_path / "photo")  # an existing file without an image suffix counts as data too
    path = table(tmp_path, [first, "a.png,a dog"], header="")
    cell = first.split(",")[0]
    assert refused(capsys, path) == (f"{path}:1: the first row looks like data, not a header ({cell!r} is an image); "
                                     f"add a header line such as image,caption")


def test_unknown_columns_name_what_was_found(tmp_path, capsys):
    path = table(tmp_path, ["a.png,a cat"], header="picture,words")
    assert refused(capsys, path) == (f"{path}:1: cannot find the image column; columns found: ['picture', 'words'] "
                                     f"(separator ','); name the image column one of image, filepath, file, path, "
                                     f"image_path, filename, file_name, image_file, image_name, img, url, image_url")
    (tmp_path / "late.csv").write_text("\n\npicture,words\na.png,a cat\n")  # the header on line 3
    assert refused(capsys, tmp_path / "late.csv").startswith(f"{tmp_path / 'late.csv'}:3: cannot find the image column")


@pytest.mark.parametrize("text, reason", [
    ("", "the file is empty; a captions table needs a header line such as image,caption"),
    ("\n  \n", "the file is empty"),
    ("image,caption\n", "a header line and no rows; add one line per image-caption pair"),
])
def test_empty_tables(tmp_path, capsys, text, reason):
    (tmp_path / "e.csv").write_text(text)
    assert refused(capsys, tmp_path / "e.csv").startswith(f"{tmp_path / 'e.csv'}: {reason}")


def test_spec_pointing_nowhere_lists_the_specs(tmp_path, capsys):
    for spec in (tmp_path / "nope.csv", f"csv:{tmp_path / 'nope.csv'}"):
        msg = refused(capsys, spec)
        assert f"{tmp_path / 'nope.csv'}; a data spec is a path" in msg and "(see `vlpt data --help`)" in msg
        assert "flickr8k, csv, tsv, coco, folder" in msg


def test_missing_images_are_counted_without_opening_any(tmp_path, capsys):
    path = table(tmp_path, [f"img{k}.png,a photo {k}" for k in range(20)])
    rc, out, err = info(capsys, path)
    assert rc == 1 and "20 images, 20 captions" in out
    assert f"missing image files: 20 of 20 (first: {tmp_path / 'img0.png'})" in out
    assert err.strip() == (f"error: 20 of 20 images (100.0%) in 't' are unusable, more than "
                           f"data.max_bad_fraction=0.01 (first: {tmp_path / 'img0.png'} (file not found)); fix or "
                           f"remove them (`vlpt data info SPEC --check` lists them all), or raise "
                           f"data.max_bad_fraction to skip them")
    for k in range(1, 20):
        png(tmp_path / f"img{k}.png", k)
    rc, out, err = info(capsys, path, "data.max_bad_fraction=0.05")  # 1 of 20 = 5%: skipped, not refused
    assert rc == 0 and "missing image files: 1 of 20" in out and err == ""
    assert "ok so far (data.max_bad_fraction=0.05)" in out
    assert refused(capsys, path, "data.max_bad_fraction=0.04").startswith("1 of 20 images (5.0%)")


def unreadable_set(tmp_path: Path) -> Path:
    for k in range(3):
        png(tmp_path / f"{k}.png", k)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))  # a PNG signature, then nothing
    return table(tmp_path, [f"{k}.png,picture {k}" for k in range(3)] + ["bad.png,a broken picture"])


def test_check_opens_every_image_with_training_rules(tmp_path, capsys):
    path = unreadable_set(tmp_path)
    rc, out, _ = info(capsys, path)  # the file exists: only --check can tell
    assert rc == 0 and "unreadable" not in out
    rc, out, err = info(capsys, path, "model=micro", "--check")
    assert rc == 1
    assert "  unreadable images: 1 of 4\n    " + str(tmp_path / "bad.png") + " (" in out
    reason = err.strip().removeprefix("error: ")
    assert reason.startswith("1 of 4 images (25.0%) in 't' are unusable, more than data.max_bad_fraction=0.01")
    cfg = config.resolve("clip", ["model=micro", f"data=csv:{path}", "train.batch_size=2"])
    with pytest.raises(BadDataError) as training:  # training refuses it with the very same line
        decode_training_data(cfg, *open_training_data(cfg), progress=False)
    assert str(training.value) == reason
    rc, out, _ = info(capsys, path, "data.max_bad_fraction=0.25", "--check")
    assert rc == 0 and out.strip().endswith("ok: training would accept this data (data.max_bad_fraction=0.25)")


def test_empty_caption_is_named_with_its_line(tmp_path, capsys):
    for k in range(3):
        png(tmp_path / f"{k}.png", k)
    path = table(tmp_path, ["0.png,a red one", "1.png,", "2.png,a blue one"])  # line 3 has no caption
    rc, out, err = info(capsys, path, "--check")
    assert rc == 1 and "2 images, 2 captions" in out
    assert f"  empty captions: 1 of 3, skipped\n    {path}:3\n" in out
    assert err.startswith(f"error: 1 of 3 empty captions (33.3%) in 't' are unusable, more than "
                          f"data.max_bad_fraction=0.01 (first: {path}:3)")
    rc, out, _ = info(capsys, path, "data.max_bad_fraction=0.5", "--check")
    assert rc == 0


def test_duplicates_and_cut_captions(tmp_path, capsys):
    for k in range(3):
        png(tmp_path / f"{k}.png", k)
    long = " ".join(f"w{k}" for k in range(40))  # 40 words: more than micro's 24 - 2 token positions
    path = table(tmp_path, ["0.png,a cat", "0.png,a cat", "1.png,a cat", "0.png,a cat", f"2.png,{long}"])
    rc, out, _ = info(capsys, path, "model=micro", "--check", "--show", "0")
    assert rc == 0  # duplicates and long captions are reported, not refused
    assert "  duplicate (image, caption) pairs, extra copies: 2\n" f"    {tmp_path / '0.png'}: 'a cat' x3\n" in out
    assert "  captions longer than model.text.context_length=24 tokens, cut in training: 1\n" in out
    assert f"    {tmp_path / '2.png'}: 'w0 w1 w2" in out
    rc, out, _ = info(capsys, path, "model.text.context_length=200", "--check")  # the key training reads
    assert "cut in training: none" in out


def test_folders_without_classes_or_images(tmp_path, capsys):
    flat = tmp_path / "flat"
    png(flat / "a.png")
    png(flat / "b.png", 1)
    assert refused(capsys, flat) == (f"{flat}: 2 images but no class subfolders; move them into {flat}/<class>/ "
                                     f"folders (each class name becomes a caption), or list them with captions in a "
                                     f".csv with a header line image,caption")
    (tmp_path / "none").mkdir()
    assert refused(capsys, tmp_path / "none").endswith("no class subfolders and no images; an image folder holds "
                                                       f"{tmp_path / 'none'}/<class>/<image> files")
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    assert refused(capsys, f"folder:{tmp_path / 'hollow'}").startswith(
        f"{tmp_path / 'hollow'}: no images (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp) in its 1 class folders")
    png(tmp_path / "ok" / "cat" / "a.png")
    rc, out, _ = info(capsys, tmp_path / "ok", "--check")
    assert rc == 0 and "ok: 1 images, 1 captions, 1 classes" in out


@pytest.mark.parametrize("content, reason", [
    ("not json", "c.json:1: not valid JSON (Expecting value); a COCO captions file is a JSON object"),
    (json.dumps([1, 2]), "c.json: a JSON list, not an object"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}]}), "c.json: no 'annotations' list"),
    (json.dumps({"images": [], "annotations": []}), "c.json: 'annotations' is empty, so there are no captions"),
    (json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "x"}]}),
     "c.json: images[0] has no 'id' or 'file_name'"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}),
     "c.json: no annotation has a 'caption' (an instances or keypoints file?)"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 2, "caption": "x"}]}),
     "c.json: no annotation's image_id is the id of an entry of 'images'"),
])
def test_coco_mistakes(tmp_path, capsys, content, reason):
    (tmp_path / "c.json").write_text(content)
    assert refused(capsys, tmp_path / "c.json").startswith(f"{tmp_path}/{reason}")


def test_too_small_a_data_set_names_the_batch_size(tmp_path, capsys):
    for k in range(3):
        png(tmp_path / f"{k}.png", k)
    path = table(tmp_path, [f"{k}.png,picture {k}" for k in range(3)])
    overrides = ["model=micro", f"data=csv:{path}", "train.steps=1", "train.batch_size=4", "eval.tasks=[]"]
    assert cli_main(["train", "clip", *overrides, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: train.batch_size=4 is larger than the data (3 captions in "
                                               f"csv:{path}); set train.batch_size=2 or less, or use more data")


def test_real_flickr8k_report(capsys):
    base = shared_data_dir()
    if base is None or not (base / "flickr8k").is_dir():
        pytest.skip("shared data flickr8k not available")
    rc, out, err = info(capsys, "flickr8k:dev", "--show", "0")
    assert rc == 0 and out.splitlines()[0] == "flickr8k-dev: 1000 images, 5000 captions" and "missing" not in out
