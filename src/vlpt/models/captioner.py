"""A captioning model at inference: generate captions (greedy, beam, nucleus) and score given texts.

Both always decode autoregressively (CapPa's parallel mode is a training-time device only). Generation
steps a key/value cache, one token per step; sequences that finish leave the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlpt.errors import UsageError
from vlpt.models.model import ImageTextModel

METHODS = ("greedy", "beam", "nucleus")
SCORE_ELEMENTS = 1 << 25  # log-softmax block size while scoring (rows x positions x vocabulary)


def _memory(model: ImageTextModel, images: torch.Tensor | None) -> torch.Tensor | None:
    if model.decoder.blind:
        return None
    return model.image_memory(model.visual(images)[1])


def _banned(model: ImageTextModel, device) -> torch.Tensor:
    d = model.decoder
    return torch.tensor(sorted({d.pad_id, d.sot_id, d.mask_id}), device=device)


@torch.no_grad()
def score(model: ImageTextModel, images: torch.Tensor | None, texts: torch.Tensor, *, normalize: bool = False,
          prefix_len: int | torch.Tensor = 0, batch: int | None = None, per_image: bool = False) -> torch.Tensor:
    """Log-likelihood of each text given each image: [B,C] for images [B,3,H,W] and token ids [C,L].

    The sum over the text's tokens including <eot>, padding excluded (the CapPa zero-shot protocol).
    `prefix_len` tokens after <sot> (a prompt, per text or for all) are read but not scored; `normalize`
    divides by the number of scored tokens. Each image is encoded once, the text-only layers run once.
    `per_image`: texts [B*k,L] are image i's own k texts at rows i*k..(i+1)*k-1, each scored against its
    image only -> [B,k] (questions with a few options per image, in one call for many images).
    For a blind decoder `images` may be None (pass `batch` for the number of rows wanted).
    """
    d = model.decoder
    # trailing padding columns change no scored position (causal rows never read later keys): drop them
    texts = texts[:, : max(2, int((texts != d.pad_id).sum(1).max()))]
    memory = _memory(model, images)
    n_img = memory.shape[0] if memory is not None else (images.shape[0] if images is not None else batch or 1)
    c = texts.shape[0]
    if per_image and c % n_img:
        raise ValueError(f"per_image scoring needs the same number of texts for each of {n_img} images, got {c}")
    x, _, _ = d._unimodal(texts, None)  # [C,n,W], image-independent
    targets = texts[:, 1:]
    keep = targets != d.pad_id
    prefix = torch.as_tensor(prefix_len, device=texts.device).reshape(-1, 1)
    keep &= torch.arange(targets.shape[1], device=texts.device)[None] >= prefix
    counts = keep.sum(1).clamp(min=1)

    def loglik(rows: torch.Tensor, mem: torch.Tensor | None) -> torch.Tensor:
        """The summed log-likelihood of text rows `rows` (indices into texts); memory row j serves
        len(rows) / len(mem) consecutive rows."""
        logits = d.head(d.ln_final(d._run(d.multimodal, x[rows], None, mem))).float()
        logp = logits.log_softmax(-1).gather(-1, targets[rows][..., None])[..., 0]
        total = (logp * keep[rows]).sum(1)
        return total / counts[rows] if normalize else total

    every = torch.arange(c, device=texts.device)
    if memory is None:
        return loglik(every, None).view(n_img, -1) if per_image else loglik(every, None).expand(n_img, c).clone()
    width = c // n_img if per_image else c  # texts per image
    per = max(1, SCORE_ELEMENTS // (width * targets.shape[1] * d.head.out_features))  # images per block
    out = []
    for i in range(0, n_img, per):
        mem = memory[i : i + per]
        rows = every[i * width : (i + len(mem)) * width] if per_image else every.repeat(len(mem))
        out.append(loglik(rows, mem).view(len(mem), width))  # image i serves its rows without a copy per text
    return torch.cat(out)


@torch.no_grad()
def generate(model: ImageTextModel, images: torch.Tensor | None, *, method: str = "beam", beam_width: int = 6,
             max_tokens: int = 30, min_tokens: int = 1, length_penalty: float = 0.0, top_p: float = 0.9,
             temperature: float = 1.0, generator: torch.Generator | None = None,
             batch: int | None = None) -> list[list[int]]:
    """Captions for images [B,3,H,W] (uint8 or 0-255 floats) as token ids, without <sot>/<eot>.

    Between `min_tokens` and `max_tokens` tokens before the <eot> (an empty caption is never an answer: a
    barely trained model's likeliest first token is often <eot>). Beam search ranks finished captions by
    sum log p / length**length_penalty (length counts the <eot>); 0 = plain sum. A blind decoder takes
    images=None and `batch` (how many captions).
    """
    if method not in METHODS:
        raise UsageError(f"unknown generation method {method!r}; choose one of {', '.join(METHODS)}")
    d = model.decoder
    limit = d.context_length - 2
    if not 0 < max_tokens <= limit:
        raise UsageError(f"max_tokens={max_tokens} must be in 1..{limit} (this model's context of "
                         f"{d.context_length} tokens minus <sot> and <eot>)")
    if not 0 <= min_tokens <= max_tokens:
        raise UsageError(f"min_tokens={min_tokens} must be in 0..max_tokens={max_tokens}")
    memory = _memory(model, images)
    n = memory.shape[0] if memory is not None else (images.shape[0] if images is not None else batch or 1)
    device = next(model.parameters()).device
    if method == "beam":
        return _beam(model, memory, n, beam_width, (min_tokens, max_tokens), length_penalty, device)
    return _sample(model, memory, n, method, (min_tokens, max_tokens), top_p, temperature, generator, device)


def _next_logp(model, logits: torch.Tensor, banned: torch.Tensor, t: int, lengths: tuple[int, int],
               temperature: float = 1.0) -> torch.Tensor:
    """The model's log-probabilities for word t (not renormalised, so scores stay true likelihoods), with
    banned tokens removed; before `min_tokens` words <eot> may not come, after `max_tokens` only <eot>."""
    logp = (logits.float() / temperature).log_softmax(-1)
    logp[:, banned] = float("-inf")
    if t < lengths[0]:
        logp[:, model.decoder.eot_id] = float("-inf")
    if t == lengths[1]:
        eot = logp[:, model.decoder.eot_id].clone()
        logp.fill_(float("-inf"))
        logp[:, model.decoder.eot_id] = eot
    return logp


def _sample(model, memory, n, method, lengths, top_p, temperature, generator, device) -> list[list[int]]:
    d = model.decoder
    banned = _banned(model, device)
    dtype = next(model.parameters()).dtype
    cache = d.start(memory, n, device, dtype)
    logits = d.step(torch.full((n, 1), d.sot_id, device=device), cache)
    rows = torch.arange(n, device=device)  # which captions are still being written
    out: list[list[int]] = [[] for _ in range(n)]
    for t in range(lengths[1] + 1):
        logp = _next_logp(model, logits, banned, t, lengths, temperature if method == "nucleus" else 1.0)
        if method == "greedy":
            tok = logp.argmax(-1)
        else:  # nucleus: sample from the smallest set of tokens whose probability reaches top_p
            probs, order = logp.softmax(-1).sort(-1, descending=True)
            drop = probs.cumsum(-1) - probs >= top_p
            probs = probs.masked_fill(drop, 0)
            tok = order.gather(-1, torch.multinomial(probs, 1, generator=generator))[:, 0]
        for r, k in zip(rows.tolist(), tok.tolist()):
            if k != d.eot_id:
                out[r].append(k)
        alive = tok != d.eot_id
        if not alive.any():
            break
        if not alive.all():
            cache.reorder(alive.nonzero()[:, 0], alive.nonzero()[:, 0])
            rows, tok = rows[alive], tok[alive]
        logits = d.step(tok[:, None], cache)
    return out


def _beam(model, memory, n, k, lengths, length_penalty, device) -> list[list[int]]:
    """Batched beam search; an image leaves the batch once no live beam can beat its k-th finished caption."""
    d = model.decoder
    banned = _banned(model, device)
    dtype = next(model.parameters()).dtype
    cache = d.start(memory, n * k, device, dtype)  # image i's keys/values serve its beams, rows i*k..i*k+k-1
    logits = d.step(torch.full((n * k, 1), d.sot_id, device=device), cache)
    scores = torch.full((n, k), float("-inf"), device=device)
    scores[:, 0] = 0  # all beams start identical: expand only the first
    seqs = torch.empty(n, k, 0, dtype=torch.long, device=device)
    images = list(range(n))  # image of each row of the batch still searching
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
    norm = lambda s, length: s / length**length_penalty  # noqa: E731
    max_tokens = lengths[1]
    for t in range(max_tokens + 1):
        b = len(images)
        logp = _next_logp(model, logits, banned, t, lengths).view(b, k, -1)
        v = logp.shape[-1]
        cand, idx = (scores[:, :, None] + logp).view(b, -1).topk(2 * k, dim=1)
        parent, tok = idx // v, idx % v
        is_eot = tok == d.eot_id
        # finished captions: <eot> candidates among the top k of each image
        for i, j in (is_eot[:, :k] & (cand[:, :k] > float("-inf"))).nonzero().tolist():
            words = seqs[i, parent[i, j]].tolist()
            finished[images[i]].append((norm(cand[i, j].item(), t + 1), words))
        # live beams: the best k candidates that do not end (at most k of 2k can end)
        live = ~is_eot & ((~is_eot).cumsum(1) <= k)
        parent, tok, scores = parent[live].view(b, k), tok[live].view(b, k), cand[live].view(b, k)
        seqs = torch.cat([seqs.gather(1, parent[..., None].expand(-1, -1, seqs.shape[2])), tok[..., None]], 2)
        if t == max_tokens:
            break
        # an image is done when k captions are finished and no live beam can still beat the k-th best
        best_live = scores.max(1).values.tolist()
        keep = []
        for i, img in enumerate(images):
            done = sorted(finished[img], key=lambda f: -f[0])[:k]
            finished[img] = done
            bound = norm(best_live[i], max_tokens + 1 if length_penalty > 0 else t + 1)
            keep.append(not (len(done) >= k and done[-1][0] >= bound))
        keep_t = torch.tensor(keep, device=device)
        if not keep_t.all():
            if not keep_t.any():
                break
            sel = keep_t.nonzero()[:, 0]
            images = [images[i] for i in sel.tolist()]
            parent, tok, scores, seqs = parent[sel], tok[sel], scores[sel], seqs[sel]
            rows = (sel[:, None] * k + parent).reshape(-1)
            cache.reorder(rows, sel)
        else:
            cache.reorder((torch.arange(b, device=device)[:, None] * k + parent).reshape(-1))
        logits = d.step(tok.reshape(-1, 1), cache)
    return [max(f, key=lambda x: x[0])[1] for f in finished]
