"""What objectives can read from the model, and which towers and abilities that implies.

An objective names what it reads as `OUTPUT` or `OUTPUT@VIEW`:
  image_tokens   the image encoder's tokens after its final LN (no [CLS])       [B,N,W]
  image_pooled   the pooled, unprojected image feature (model.vision.pool; what probes read)  [B,W]
  image_embed    the pooled feature projected to the shared space, unit norm  [B,D]
  text_tokens    the text tower's tokens after its final LN                    [B,L,Wt]
  text_features  the text tower's feature at <eot> (a CoCa decoder: its [CLS]) [B,Wt]
  text_embed     the text feature projected to the shared space, unit norm    [B,D]
  caption_logits the caption decoder's next-token logits [B,L-1,V]
  caption_hidden its final hidden states [B,L-1,W] (after the final LN), with caption_head, the output layer
                 (nn.Linear): a loss applies it itself, in chunks, without all the logits at once
                 (either caption output comes with caption_mask [B,L-1], the real target tokens)
  joint_tokens   one transformer, the image encoder, over [CLS (pool=cls); image patches; text tokens]
                 (vlpt.models.joint), after its final LN, no [CLS]: patch tokens, then text tokens  [B,N+L,W]
and the views: none (batch["image"], batch["text"]); `image_views` / `text_views` (the recipe's extra views,
batch[VIEW] [V,B,...]; outputs gain the leading V); `masked` (image outputs of only the patches
batch["image_keep"] [B,K] keeps, which an objective's `prepare` chooses; joint_tokens also keeps only the
text positions batch["text_keep"] [B,Kt] names, every one if it is absent).
"""
from __future__ import annotations

import functools

# `cfg` below is a vlpt.config.ModelConfig; this module imports nothing of vlpt, since config imports it to check recipes

IMAGE_OUTPUTS = frozenset({"image_tokens", "image_pooled", "image_embed"})
TEXT_OUTPUTS = frozenset({"text_tokens", "text_features", "text_embed"})
CAPTION_OUTPUTS = frozenset({"caption_logits", "caption_hidden"})
OUTPUTS = IMAGE_OUTPUTS | TEXT_OUTPUTS | CAPTION_OUTPUTS | {"joint_tokens"}
VIEWS = {None: OUTPUTS, "image_views": IMAGE_OUTPUTS, "masked": IMAGE_OUTPUTS | {"joint_tokens"},
         "text_views": TEXT_OUTPUTS}
CONTRASTIVE = frozenset({"image_embed", "text_embed"})
TOWER_MODULES = {"vision": "visual", "text": "text", "decoder": "decoder"}  # tower -> ImageTextModel attribute


class NeedError(ValueError):
    """An objective asked for an output or view that does not exist."""


def split_need(need: str) -> tuple[str, str | None]:
    """"image_embed@image_views" -> ("image_embed", "image_views"); a plain name has view None."""
    name, _, view = need.partition("@")
    view = view or None
    if name not in OUTPUTS:
        raise NeedError(f"unknown model output '{name}'; outputs: {', '.join(sorted(OUTPUTS))}")
    if view not in VIEWS:
        raise NeedError(f"unknown view '{view}' in '{need}'; views: {', '.join(v for v in VIEWS if v)}")
    if name not in VIEWS[view]:
        raise NeedError(f"'{need}': the view {view} has only {', '.join(sorted(VIEWS[view]))}")
    return name, view


@functools.lru_cache(maxsize=None)  # the model asks at every forward pass, with the same few sets
def by_view(needs: frozenset[str]) -> tuple[tuple[str | None, frozenset[str]], ...]:
    """The output names of `needs` grouped by view: ((view, names), ...), in a fixed order of passes."""
    groups: dict[str | None, set[str]] = {}
    for need in sorted(needs):
        name, view = split_need(need)
        groups.setdefault(view, set()).add(name)
    return tuple((view, frozenset(names)) for view, names in groups.items())


def text_from_decoder(cfg, names: set[str]) -> bool:
    """A decoder with unimodal layers is the text tower too (CoCa): its [CLS] output is the text feature."""
    return bool(names & CAPTION_OUTPUTS) and cfg.decoder.unimodal_depth > 0


def towers_of(cfg, needs: frozenset[str]) -> set[str]:
    """The towers (vision, text, decoder) a model with these needs has."""
    names = {split_need(n)[0] for n in needs}
    towers = set()
    if names & IMAGE_OUTPUTS or "joint_tokens" in names or (names & CAPTION_OUTPUTS and not cfg.decoder.blind):
        towers.add("vision")
    if names & CAPTION_OUTPUTS:
        towers.add("decoder")
    if names & TEXT_OUTPUTS and not text_from_decoder(cfg, names):
        towers.add("text")
    return towers


def abilities_of(cfg, needs: frozenset[str]) -> frozenset[str]:
    """What evaluators may ask of such a model: image_tokens, image_features (pooled), image_embed,
    text_embed (both: a contrastive model), caption (a caption decoder)."""
    names = {split_need(n)[0] for n in needs}
    towers = towers_of(cfg, needs)
    out = set(names & CONTRASTIVE)
    if "vision" in towers:
        out |= {"image_tokens", "image_features"}
    if "decoder" in towers:
        out.add("caption")
    return frozenset(out)


def output_width(cfg, name: str) -> int:
    """The last dimension of an output, for objectives that build heads on it."""
    name = split_need(name)[0]
    if name in ("image_embed", "text_embed"):
        return cfg.embed_dim
    if name == "image_pooled" and cfg.poolers.contrastive == "first" and cfg.poolers.style == "open_clip":
        return cfg.embed_dim
    if name in IMAGE_OUTPUTS or name == "joint_tokens":
        return cfg.vision.width
    if name in TEXT_OUTPUTS:  # a decoder with unimodal layers is the text tower of a captioning recipe (CoCa)
        return cfg.decoder.width if cfg.decoder.unimodal_depth > 0 else cfg.text.width
    if name == "caption_hidden":
        return cfg.decoder.width
    raise NeedError(f"'{name}' has no fixed width")
