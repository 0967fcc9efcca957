"""Prompt templates for zero-shot classification.

`IMAGENET_TEMPLATES` is the 80-prompt ensemble published with CLIP (Radford et al., 2021, the
"Prompt Engineering for ImageNet" notebook); `SIMPLE_TEMPLATES` is a short set for quick checks.
Every template contains one "{}" that is replaced by the class name.
"""
from __future__ import annotations

from typing import Sequence

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SIMPLE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a blurry photo of a {}.",
    "itap of a {}.",
    "a {}.",
)

NAMED_TEMPLATES = {"imagenet80": IMAGENET_TEMPLATES, "simple": SIMPLE_TEMPLATES}


def get_templates(name_or_list: str | Sequence[str]) -> list[str]:
    """A template list by name ("imagenet80", "simple") or a list of strings each containing "{}"."""
    if isinstance(name_or_list, str):
        if name_or_list not in NAMED_TEMPLATES:
            raise ValueError(
                f"unknown template set {name_or_list!r}; choose one of {sorted(NAMED_TEMPLATES)} "
                "or pass a list of strings containing '{}'"
            )
        return list(NAMED_TEMPLATES[name_or_list])
    templates = list(name_or_list)
    if not templates:
        raise ValueError("empty template list")
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise ValueError(f"every template must be a string containing '{{}}'; these are not: {bad}")
    return templates


def fill(template: str, classname: str) -> str:
    """The prompt for one class (plain substitution, so braces in class names are harmless)."""
    return template.replace("{}", classname)
