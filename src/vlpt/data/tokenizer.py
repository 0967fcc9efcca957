"""Byte-level BPE (HF `tokenizers`) trained on the training captions; any tokenizer.json loads instead.

A text becomes `<sot> tokens <eot> <pad>...` of fixed length (with a BERT vocabulary: `[CLS] tokens [SEP]
[PAD]...`); over-long texts are cut so that `<eot>` is always present (the CLIP text tower pools at it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, SOT, EOT, MASK, UNK = "<pad>", "<sot>", "<eot>", "<mask>", "<unk>"
SPECIALS = [PAD, SOT, EOT, MASK, UNK]
# A BERT WordPiece vocabulary (MiniLM's) has its own pad, start, end and mask tokens, which its pretrained
# embeddings know: they take the roles above, and no token is added
BERT_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class Vocab:
    """The vocabulary size and special ids that models and objectives are built with."""

    size: int
    pad: int = 0
    sot: int = 1
    eot: int = 2
    mask: int = 3


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, context_length: int):
        names = BERT_SPECIALS if all(tokenizer.token_to_id(t) is not None for t in BERT_SPECIALS) else SPECIALS[:4]
        missing = [t for t in SPECIALS if tokenizer.token_to_id(t) is None]
        if missing and names is not BERT_SPECIALS:  # a foreign tokenizer.json: give it the special tokens vlpt needs
            tokenizer.add_special_tokens(missing)
        tokenizer.no_padding()  # a tokenizer.json may pad or cut every text itself (MiniLM's: to 128); vlpt does
        tokenizer.no_truncation()
        self.tok = tokenizer
        self.context_length = context_length
        self.pad_id, self.sot_id, self.eot_id, self.mask_id = (tokenizer.token_to_id(t) for t in names)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, context_length: int) -> "TextTokenizer":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, context_length)

    @classmethod
    def from_str(cls, json_str: str, context_length: int) -> "TextTokenizer":
        return cls(Tokenizer.from_str(json_str), context_length)

    @classmethod
    def from_file(cls, path: str | Path, context_length: int) -> "TextTokenizer":
        return cls(Tokenizer.from_file(str(path)), context_length)

    def to_str(self) -> str:
        return self.tok.to_str()

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def vocab(self) -> Vocab:
        return Vocab(self.vocab_size, self.pad_id, self.sot_id, self.eot_id, self.mask_id)

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        """Token ids [N, context_length] (int64)."""
        if isinstance(texts, str):
            texts = [texts]
        body = self.context_length - 2
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int64)
        for row, enc in zip(out, self.tok.encode_batch(list(texts), add_special_tokens=False)):
            ids = enc.ids[:body]
            row[0] = self.sot_id
            row[1 : 1 + len(ids)] = ids
            row[1 + len(ids)] = self.eot_id
        return torch.from_numpy(out)

    def after_prompt(self, prompt: str, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of each text read after `prompt` (joined by one space, as in "a photo of a" + "cat"),
        and how many tokens of each belong to the prompt. The text's tokens are exactly the ones it has in
        that sentence: tokenising the prompt alone would count a trailing space token ("a photo of a ")
        that the sentence does not have, and plain concatenation merges words ("a photo of acat")."""
        head = prompt.rstrip()
        if not head:
            return self(texts), torch.zeros(len(texts), dtype=torch.long)
        sentences = [f"{head} {t.lstrip()}" for t in texts]
        encodings = self.tok.encode_batch(sentences, add_special_tokens=False)
        # pre-tokenisation splits at the space, so every token lies in the prompt or in the text
        in_prompt = [sum(start < len(head) for start, _ in e.offsets) for e in encodings]
        return self(sentences), torch.tensor([min(n, self.context_length - 2) for n in in_prompt])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids up to the first <eot>, specials dropped."""
        kept = []
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                break
            if i not in (self.pad_id, self.sot_id, self.mask_id):
                kept.append(i)
        return self.tok.decode(kept).strip()
