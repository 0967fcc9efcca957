"""The score of a model that guesses at random, for the metrics where it is known from the data alone."""
from __future__ import annotations

from functools import lru_cache
from math import comb

from vlpt.data import sources

CLASSIFIERS = ("zeroshot", "zeroshot_bow", "zeroshot_captioner", "linear_probe", "attentional_probe")


def _recall_chances(ds) -> dict[str, float]:
    """R@K of a random ranking: text->image, 1 right image among N; image->text, any of its m captions among
    the T captions in the top K: 1 - C(T-m, K) / C(T, K), averaged over images."""
    n_img, n_txt = ds.num_images, len(ds.captions)
    per_image: dict[int, int] = {}
    for image in ds.caption_image:
        per_image[image] = per_image.get(image, 0) + 1
    out = {}
    for k in (1, 5, 10):
        out[f"t2i_R@{k}"] = 100.0 * min(k, n_img) / n_img
        hit = sum(1 - comb(n_txt - per_image.get(i, 0), k) / comb(n_txt, k) for i in range(n_img))
        out[f"i2t_R@{k}"] = 100.0 * hit / n_img
    return out


@lru_cache(maxsize=None)  # a table and its bars ask for the same task
def chance(task: str) -> dict[str, float]:
    """{metric name: chance score in %} of a task "KIND:DATA"; empty where chance is not a fixed number
    (caption metrics, losses) or the data cannot be opened."""
    kind, _, data = task.partition(":")
    if kind not in CLASSIFIERS + ("retrieval",):
        return {}
    if kind.endswith("_probe"):  # scored on TEST of TRAIN|TEST (or X:train -> X:test)
        from vlpt.eval.probes import probe_specs
        from vlpt.eval.registry import TaskError

        try:
            data = probe_specs(data, kind)[1]
        except TaskError:
            return {}
    try:
        ds = sources.open_source(data)
    except Exception:  # noqa: BLE001 - chance is a courtesy; the evaluation itself reports bad data
        return {}
    if kind == "retrieval":
        return _recall_chances(ds)
    if not ds.classnames:
        return {}
    classes = len(ds.classnames)
    if kind.endswith("_probe"):
        return {f"{kind}_top1": 100.0 / classes, f"{kind}_val_top1": 100.0 / classes}
    return {"top1": 100.0 / classes, **({"top5": 500.0 / classes} if classes > 5 else {})}
