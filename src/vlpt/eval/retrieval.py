"""Image-text retrieval recall@K.

text->image R@K: % of captions whose image is among the K most similar images.
image->text R@K: % of images (that have captions) with ANY of their captions among the K most similar
captions. Similarities are computed chunk by chunk and only the top-K indices are kept, so the full
[num_texts, num_images] matrix never has to exist. Ties are broken by torch.topk.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from vlpt.eval.batching import encode_batched
from vlpt.eval.data import load_decoded
from vlpt.eval.registry import EvalOptions, Evaluator, register

MAX_CHUNK_ELEMENTS = 1 << 24  # similarity scores held at once (64 MB of float32)


def _chunked_topk(rows: Callable[[int, int], torch.Tensor], n_rows: int, n_cols: int, k: int) -> torch.Tensor:
    """Indices [n_rows, min(k, n_cols)] of the largest scores per row; `rows(a, b)` gives rows a..b."""
    k = min(k, n_cols)
    chunk = max(1, MAX_CHUNK_ELEMENTS // max(1, n_cols))
    return torch.cat([rows(a, min(a + chunk, n_rows)).topk(k, dim=1).indices for a in range(0, n_rows, chunk)])


def _recalls(t2i_top: torch.Tensor, i2t_top: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int]) -> dict:
    num_images = i2t_top.shape[0]
    # image->text: map retrieved captions to their images; only images with a caption count.
    i2t_img = caption_image[i2t_top]
    own = torch.arange(num_images)[:, None]
    has_caption = torch.bincount(caption_image, minlength=num_images) > 0
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * (t2i_top[:, :k] == caption_image[:, None]).any(1).double().mean().item()
    for k in ks:
        hit = (i2t_img[:, :k] == own).any(1)[has_caption]
        out[f"i2t_R@{k}"] = 100.0 * hit.double().mean().item()
    return out


def _check(caption_image: torch.Tensor, num_texts: int, num_images: int, ks: Sequence[int]) -> None:
    if caption_image.shape != (num_texts,):
        raise ValueError(f"caption_image has shape {tuple(caption_image.shape)}, expected ({num_texts},)")
    if num_texts == 0 or num_images == 0:
        raise ValueError("retrieval needs at least one caption and one image")
    if caption_image.min() < 0 or caption_image.max() >= num_images:
        raise ValueError("caption_image holds an index outside [0, num_images)")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")


def recall_at_k(sim: torch.Tensor, caption_image: Sequence[int] | torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """R@K both ways from a similarity matrix `sim` [num_texts, num_images]."""
    caption_image = torch.as_tensor(caption_image, dtype=torch.long, device="cpu")
    sim = sim.float().cpu()
    n_txt, n_img = sim.shape
    _check(caption_image, n_txt, n_img, ks)
    t2i = _chunked_topk(lambda a, b: sim[a:b], n_txt, n_img, max(ks))
    i2t = _chunked_topk(lambda a, b: sim[:, a:b].T, n_img, n_txt, max(ks))
    return _recalls(t2i, i2t, caption_image, ks)


def retrieval(
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    encode_texts: Callable[[list[str]], torch.Tensor],
    images: torch.Tensor,
    captions: Sequence[str],
    caption_image: Sequence[int] | torch.Tensor,
    batch_size: int = 256,
    ks: Sequence[int] = (1, 5, 10),
    progress: bool = False,
) -> dict:
    """Encode uint8 `images` [N,3,H,W] and `captions`, then R@K both ways (cosine similarity)."""
    caption_image = torch.as_tensor(caption_image, dtype=torch.long, device="cpu")
    _check(caption_image, len(captions), len(images), ks)
    img = F.normalize(encode_batched(encode_images, images, batch_size, progress, "images"), dim=-1)
    txt = F.normalize(encode_batched(encode_texts, list(captions), batch_size, progress, "captions"), dim=-1)
    t2i = _chunked_topk(lambda a, b: txt[a:b] @ img.T, len(txt), len(img), max(ks))
    i2t = _chunked_topk(lambda a, b: img[a:b] @ txt.T, len(img), len(txt), max(ks))
    return _recalls(t2i, i2t, caption_image, ks)


@register("retrieval")
class Retrieval(Evaluator):
    """retrieval:DATA: image<->text retrieval over a captioned set (t2i_R@K, i2t_R@K in %)."""

    requires = frozenset({"image_embed", "text_embed"})

    def __call__(self, model, data: str, options: EvalOptions) -> dict[str, float]:
        images, ds = load_decoded(data, model.image_size, options)
        return retrieval(model.encode_images, model.encode_texts, images, ds.captions, ds.caption_image,
                         batch_size=options.batch_size, progress=options.progress)
