"""`vlpt data info [--check]`: what a data spec holds and whether training would accept it.

The verdict comes from training's own rules, not a copy of them: `issue_error` (rows, captions, samples
and shards a loader dropped) and `image_error` (unreadable images), both against data.max_bad_fraction.
Without --check, images are only looked for (a missing file is certainly unreadable); with it, every image
is decoded as training decodes it, and the captions are tokenized by the tokenizer training would use.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vlpt.config import Config
from vlpt.data.dataset import ImageTextSet
from vlpt.data.sources import DROPPING, BadDataError, image_error, issue_error, open_data, read_images, ref_name

LISTED = 20  # names listed per kind of problem with --check (without it: the first one)
ISSUE_NAMES = {"empty_captions": "empty captions", "bad_rows": "rows without an image",
               "bad_samples": "unreadable samples", "bad_shards": "unreadable shards",
               "non_utf8_rows": "lines not in UTF-8"}


@dataclass
class DataReport:
    """What `check_data` found; the lists hold the names messages use. None: not looked at (no --check)."""

    data: ImageTextSet | None = None
    weighted: bool = False
    missing: list[str] = field(default_factory=list)  # image files that do not exist
    unreadable: list[str] | None = None  # "name (error)" of the images that cannot be decoded
    cut: list[tuple[str, str]] | None = None  # (image, caption) of the captions training cuts to the context
    context_length: int = 0
    duplicates: list[tuple[str, str, int]] | None = None  # (image, caption, times) of repeated pairs
    error: str | None = None  # why training would refuse the data; None: it would accept it


def missing_files(s: ImageTextSet) -> list[str]:
    """The image references that are file paths with no file there (cheap: no image is opened)."""
    out = []
    for ref in s.images:
        ref = getattr(ref, "ref", ref)  # a mixture's reference wraps its source's
        if isinstance(ref, (str, os.PathLike)) and not os.path.isfile(ref):
            out.append(os.fspath(ref))
    return out


def duplicates(s: ImageTextSet) -> list[tuple[str, str, int]]:
    """(image, caption, times) of each (image, caption) pair that occurs more than once."""
    counts = Counter(zip(s.caption_image, s.captions))
    return [(ref_name(s, i), caption, n) for (i, caption), n in counts.items() if n > 1]


def cut_captions(cfg: Config, s: ImageTextSet) -> list[tuple[str, str]]:
    """(image, caption) of the captions the tokenizer training would make cuts to model.text.context_length."""
    from vlpt.train.data import make_tokenizer, tokenize

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(cfg, s.captions, Path(tmp))
    _, cut = tokenize(tokenizer, s.captions)
    return [(ref_name(s, s.caption_image[k]), s.captions[k]) for k in cut.nonzero().flatten().tolist()]


def check_data(spec: str, cfg: Config, full: bool = False, progress: bool = False) -> DataReport:
    """Open `spec` and judge it by the rules and thresholds of `cfg`; `full` decodes every image too."""
    report = DataReport()
    limit = cfg.data.max_bad_fraction
    try:
        s, weights = open_data(spec)
    except BadDataError as err:
        report.error = str(err)
        return report
    report.data, report.weighted = s, weights is not None
    report.missing = missing_files(s)
    errors = [issue_error(s, limit)]  # training's order: dropped input first, then images
    if full:
        good, bad = [], []
        for i, (_, err) in enumerate(read_images(s, cfg.model.vision.image_size, progress)):
            if err is None:
                good.append(i)
            else:
                bad.append(err)
        report.unreadable = bad
        errors.append(image_error(s, bad, limit))
        kept = s.subset_images(good) if bad else s  # what training goes on with
        report.context_length = cfg.model.text.context_length
        report.cut = cut_captions(cfg, kept) if len(kept) else []
        report.duplicates = duplicates(kept)
    else:
        errors.append(image_error(s, [f"{p} (file not found)" for p in report.missing], limit))
    report.error = next((str(e) for e in errors if e is not None), None)
    return report


def _short(caption: str, width: int = 60) -> str:
    return repr(caption if len(caption) <= width else caption[: width - 3] + "...")


def _listed(names: list[str], full: bool) -> list[str]:
    """The names as report lines: up to LISTED of them with --check, else the first one on the count's line."""
    if not full:
        return [f" (first: {names[0]})"] if names else [""]
    more = [f"    ... and {len(names) - LISTED} more"] if len(names) > LISTED else []
    return [""] + [f"    {n}" for n in names[:LISTED]] + more


def _line(head: str, names: list[str], full: bool) -> list[str]:
    first, *rest = _listed(names, full)
    return [head + first, *rest]


def format_report(report: DataReport, show: int = 0, full: bool = False) -> list[str]:
    """The report as lines for stdout (the verdict is the caller's: it goes to stderr when it is an error)."""
    s = report.data
    if s is None:
        return []
    lines = [f"{s.name}: {s.num_images} images, {len(s)} captions"
             + (f", {len(s.classnames)} classes" if s.classnames else "")
             + (", weighted mixture" if report.weighted else "")]
    if report.missing:
        lines += _line(f"  missing image files: {len(report.missing)} of {s.num_images}", report.missing, False)
    for kind, issue in s.issues.items():
        if issue.names:
            verb = "skipped" if kind in DROPPING else "repaired"
            lines += _line(f"  {ISSUE_NAMES.get(kind, kind)}: {len(issue.names)} of {issue.total}, {verb}",
                           issue.names, full)
    if report.unreadable is not None:
        lines += _line(f"  unreadable images: {len(report.unreadable)} of {s.num_images}", report.unreadable, full)
    if report.cut is not None:
        lines += _line(f"  captions longer than model.text.context_length={report.context_length} tokens, cut in "
                       f"training: {len(report.cut) or 'none'}", [f"{i}: {_short(c)}" for i, c in report.cut], full)
    if report.duplicates is not None:
        extra = sum(n - 1 for _, _, n in report.duplicates)
        lines += _line(f"  duplicate (image, caption) pairs, extra copies: {extra or 'none'}",
                       [f"{i}: {_short(c)} x{n}" for i, c, n in report.duplicates], full)
    lines += [f"  [{i}] {t}" for t, i in list(zip(s.captions, s.caption_image))[:show]]
    return lines
