"""vlpt: vision-language pre-training."""
__version__ = "0.1.0"


def load(path, device: str = "cpu"):
    """A trained run folder / checkpoint -> `vlpt.inference.Model` (encode_image, encode_text, score_captions,
    generate). Imported lazily so `import vlpt` stays light."""
    from vlpt.inference import load as _load

    return _load(path, device)
