"""Named model sizes. A preset fills `model.*`; explicit `model.vision.*` / `model.text.*` keys override it."""


def _preset(image_size, patch, width, depth, heads, text_width, text_depth, text_heads, embed, context=32, stem="patch"):
    return {
        "vision": {"image_size": image_size, "patch_size": patch, "width": width, "depth": depth, "heads": heads,
                   "stem": stem},
        "text": {"context_length": context, "width": text_width, "depth": text_depth, "heads": text_heads},
        "embed_dim": embed,
    }


PRESETS = {
    # CPU-sized: the tests and the demo. `tiny` has a convolutional stem: trained from scratch on little
    # data, a plain ViT learns colour at once but shape barely (docs/results.md), the conv stem both.
    "micro": _preset(32, 8, 64, 2, 2, 64, 2, 2, 64, context=24),
    "tiny": _preset(64, 8, 128, 4, 4, 128, 4, 4, 128, stem="conv"),
    # the shapes of ../shared/peers/open_clip/configs/tiny-clip.json, for side-by-side comparisons
    "tiny-clip": _preset(64, 8, 256, 4, 4, 256, 4, 4, 256),
    # the CLIP paper's shapes
    "vit-s16": _preset(224, 16, 384, 12, 6, 384, 12, 6, 384, context=77),
    "vit-b16": _preset(224, 16, 768, 12, 12, 512, 12, 8, 512, context=77),
    "vit-l14": _preset(224, 14, 1024, 24, 16, 768, 12, 12, 768, context=77),
}
