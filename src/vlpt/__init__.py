"""vlpt: vision-language pre-training."""
from vlpt.errors import CheckpointError, DataError, RunError, UsageError, VlptError

__version__ = "0.1.0"
__all__ = ["load", "VlptError", "UsageError", "DataError", "CheckpointError", "RunError"]


def load(path, device: str = "cpu"):
    """A trained run folder / checkpoint -> `vlpt.inference.Model` (encode_image, encode_text, score_captions,
    generate). Imported lazily so `import vlpt` stays light."""
    from vlpt.inference import load as _load

    return _load(path, device)
