"""The training data of a run: images (decoded once, or per batch), the run's tokenizer and token ids."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from vlpt.config import Config, ConfigError
from vlpt.data.tokenizer import TextTokenizer
from vlpt.models import minilm
from vlpt.train import distributed


def open_training_data(cfg: Config):
    """(set, sampling weights or None): metadata only, so a bad spec, too much bad input or a batch larger
    than the data fails before the run writes anything."""
    from vlpt.data.sources import check_issues, open_data

    data, weights = open_data(cfg.data.source)
    check_issues(data, cfg.data.max_bad_fraction)
    if weights is None:  # a mixture samples with replacement; a plain set's epoch must hold one batch
        check_batch_fits(len(data), cfg.train.batch_size, cfg.data.source)
    return data, weights


def check_batch_fits(captions: int, batch_size: int, name: str) -> None:
    if captions < batch_size:
        fit = 1 << (captions.bit_length() - 1) if captions else 0
        raise ConfigError(f"train.batch_size={batch_size} is larger than the data ({captions} captions in {name}); "
                          f"set train.batch_size={fit} or less" + (", or use more data" if fit < 8 else ""))


def decode_training_data(cfg: Config, data, weights, progress: bool):
    """(set, decoded images or None, sampling weights or None, bad image names); too many bad images raise."""
    from vlpt.data.sources import decode_all

    images, bad = None, []
    if cfg.data.cache_images:
        images, kept, bad = decode_all(data, cfg.model.vision.image_size, cfg.data.max_bad_fraction, progress=progress)
        if weights is not None and bad:  # keep the weights of the captions whose images survived
            good = {id(ref) for ref in kept.images}
            weights = weights[torch.tensor([id(data.images[i]) in good for i in data.caption_image])]
        data = kept
        if weights is None:
            check_batch_fits(len(data), cfg.train.batch_size, cfg.data.source)
    return data, images, weights, bad


def tokenize(tokenizer: TextTokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, L] as `tokenizer(captions)` gives them, and which captions were cut to fit L (bool [N])."""
    n = tokenizer.context_length
    longer = TextTokenizer(tokenizer.tok, n + 1)(captions)
    cut = longer[:, n] == tokenizer.eot_id  # with one more position, a caption that did not fit ends there
    tokens = longer[:, :n].clone()
    tokens[cut, n - 1] = tokenizer.eot_id
    return tokens, cut


def inherited_tokenizer(cfg: Config) -> str | None:
    """The tokenizer JSON of the run a text tower or decoder starts from (model.init.text / .decoder):
    its token embeddings only mean something with that vocabulary. None when no such tower is inherited."""
    from vlpt.train.towers import source_metadata

    for tower in ("text", "decoder"):
        path = getattr(cfg.model.init, tower)
        if path is not None:
            tok = source_metadata(path).get("tokenizer")
            if tok is None:
                raise ConfigError(f"model.init.{tower}={path} carries no tokenizer; give the one its weights were "
                                  f"trained with as tokenizer.path=...")
            return tok
    return None


def make_tokenizer(cfg: Config, captions: list[str], run_dir: Path) -> TextTokenizer:
    """The run's tokenizer.json (a resumed run reuses it), made by the main process; every rank waits for it
    (deciding by the file's existence on each rank would let a late rank skip the barrier).

    In order: tokenizer.path, the tokenizer of an inherited text tower or decoder, MiniLM's (a
    model.text.kind=minilm tower), one trained on `captions`.
    """
    path = run_dir / "tokenizer.json"
    ctx = cfg.model.text.context_length
    if distributed.is_main() and not path.exists():
        inherited = None if cfg.tokenizer.path else inherited_tokenizer(cfg)
        if cfg.tokenizer.path:
            tok = TextTokenizer.from_file(cfg.tokenizer.path, ctx)
        elif inherited is not None:
            tok = TextTokenizer.from_str(inherited, ctx)
        elif cfg.model.text.kind == "minilm":
            tok = TextTokenizer.from_file(minilm.tokenizer_file(), ctx)
        else:
            tok = TextTokenizer.train(captions, cfg.tokenizer.vocab_size, ctx)
        tmp = path.with_suffix(".tmp")
        tok.save(tmp)
        os.replace(tmp, path)  # whole or absent, like a checkpoint
    distributed.barrier()
    return TextTokenizer.from_file(path, ctx)
