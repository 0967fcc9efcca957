"""What every weight format shares: name maps between state dicts, building the vlpt model for imported
shapes, adapting a foreign tokenizer.json, and writing an imported model as a vlpt run folder."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import yaml

from vlpt import config as config_lib
from vlpt.data.tokenizer import TextTokenizer, Vocab
from vlpt.errors import UsageError
from vlpt.train import checkpoint
from vlpt.train.pretrainer import Pretrainer, build


class MappingError(UsageError):
    """A part of a model that has no counterpart in the other format; the message names it."""


# One parameter of the destination: the source tensors it is made of (concatenated along dim 0 when several,
# as vlpt's fused qkv is from separate q/k/v projections) and whether it is the transpose (x @ P vs Linear).
@dataclasses.dataclass(frozen=True)
class Entry:
    dest: str
    src: tuple[str, ...]
    transpose: bool = False


def remap(src: dict[str, torch.Tensor], entries: list[Entry], dest_shapes: dict[str, torch.Size],
          ignore: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Builds the destination state dict; every destination tensor must be made and every source tensor
    used (names in `ignore`, e.g. non-persistent buffers of old checkpoints, excepted)."""
    out, used = {}, set()
    missing = sorted({s for e in entries for s in e.src if s not in src})
    if missing:
        raise MappingError(f"tensors missing from the source: {_few(missing)}")
    for e in entries:
        parts = [src[s] for s in e.src]
        t = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        t = t.T if e.transpose else t
        if t.numel() != dest_shapes[e.dest].numel():
            raise MappingError(f"{'+'.join(e.src)} has shape {tuple(t.shape)}; {e.dest} needs {tuple(dest_shapes[e.dest])}")
        out[e.dest] = t.reshape(dest_shapes[e.dest]).detach().clone().float()
        used.update(e.src)
    left = [k for k in src if k not in used and not any(k.endswith(i) for i in ignore)]
    _complete(left, set(dest_shapes) - set(out), "source tensor(s) have no counterpart in this architecture",
              "nothing in the source for")
    return out


def unmap(state: dict[str, torch.Tensor], entries: list[Entry], their_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The same map run backwards: a vlpt state dict -> the other format's (fused tensors are split by rows)."""
    out = {}
    for e in entries:
        t = state[e.dest].T if e.transpose else state[e.dest]
        for name, part in zip(e.src, t.chunk(len(e.src), 0)):
            out[name] = part.reshape(their_shapes[name]).detach().clone().float()
    _complete(set(state) - {e.dest for e in entries}, set(their_shapes) - set(out),
              "vlpt tensor(s) have no counterpart in the other format", "nothing in the vlpt model for")
    return out


def _complete(left, unmade, left_msg: str, unmade_msg: str) -> None:
    """A mapping is exact: no tensor left over on one side, none missing on the other."""
    if left:
        raise MappingError(f"{len(left)} {left_msg}: {_few(sorted(left))}")
    if unmade:
        raise MappingError(f"{unmade_msg} {_few(sorted(unmade))}")


def block_entries(dest: str, src: str, names: dict[str, str | tuple[str, ...]]) -> list[Entry]:
    """Weight and bias entries for modules under `dest` / `src`: `names` maps vlpt module names to the other
    format's (a tuple: the row blocks of one fused vlpt module)."""
    out = []
    for mine, theirs in names.items():
        parts = theirs if isinstance(theirs, tuple) else (theirs,)
        out += [Entry(f"{dest}.{mine}.{p}", tuple(f"{src}.{t}.{p}" for t in parts)) for p in ("weight", "bias")]
    return out


def _few(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


# ------------------------------------------------------------------------------------------------ models
@dataclasses.dataclass
class Imported:
    """A model brought in from another format: config, tokenizer (None if none was given), model+objective."""

    cfg: config_lib.Config
    tokenizer: TextTokenizer | None
    module: Pretrainer
    source: str = ""


def clip_config(vision: dict, text: dict, embed_dim: int, objective: str = "contrastive") -> config_lib.Config:
    """A resolved CLIP (or SigLIP) config with these exact tower shapes."""
    recipe = {"contrastive": "clip", "sigmoid": "siglip"}[objective]
    cfg = config_lib.resolve(recipe, {"train": {"steps": 1}})
    model = config_lib.ModelConfig(preset="imported", vision=config_lib.VisionConfig(**vision),
                                   text=config_lib.TextConfig(**text), embed_dim=embed_dim)
    return validated(dataclasses.replace(cfg, model=model))


def validated(cfg: config_lib.Config) -> config_lib.Config:
    """`cfg` if vlpt can build it; otherwise a MappingError saying why the imported shapes do not fit."""
    try:
        config_lib.validate(cfg)
    except config_lib.ConfigError as err:
        raise MappingError(f"the imported shapes do not make a valid vlpt model: {err}") from None
    return cfg


def build_module(cfg: config_lib.Config, vocab_size: int, tokenizer: TextTokenizer | None, eot_id: int) -> Pretrainer:
    """build() reads the size and special ids of a tokenizer; here the embedding table may be larger than
    the tokenizer, or there may be no tokenizer (then only <eot>, where the text tower pools, matters)."""
    if tokenizer is None:
        return build(cfg, Vocab(vocab_size, eot=eot_id))
    return build(cfg, Vocab(vocab_size, tokenizer.pad_id, tokenizer.sot_id, eot_id, tokenizer.mask_id))


def grow_vocab(token_embed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Zero rows for ids the tokenizer added (vlpt's <pad>/<mask>/<unk> after a foreign vocabulary): padding
    follows <eot> and attention is causal, so they never reach a text embedding."""
    extra = vocab_size - token_embed.shape[0]
    return torch.cat([token_embed, token_embed.new_zeros(extra, token_embed.shape[1])]) if extra > 0 else token_embed


# ------------------------------------------------------------------------------------------------ tokenizers
def rename_tokens(tok_json: str, names: dict[str, str]) -> str:
    """Renames special tokens (vocabulary keys and every exact-match string) in a tokenizer.json."""
    def walk(node):
        if isinstance(node, dict):
            return {names.get(k, k): walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return names.get(node, node) if isinstance(node, str) else node

    return json.dumps(walk(json.loads(tok_json)), ensure_ascii=False)


def swap_ids(tok_json: str, a: int, b: int) -> str:
    """Exchanges the ids of two tokens (vocabulary and added tokens); the post-processor is dropped."""
    d = json.loads(tok_json)
    swap = {a: b, b: a}
    vocab = d["model"].get("vocab")
    if isinstance(vocab, dict):
        d["model"]["vocab"] = {k: swap.get(v, v) for k, v in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: the id is the position
        vocab[a], vocab[b] = vocab[b], vocab[a]
    for t in d.get("added_tokens", []):
        t["id"] = swap.get(t["id"], t["id"])
    d["added_tokens"] = sorted(d.get("added_tokens", []), key=lambda t: t["id"])
    d["post_processor"] = None
    return json.dumps(d, ensure_ascii=False)


def vlpt_tokenizer(tok_json: str, sot_id: int, eot_id: int, context_length: int) -> TextTokenizer:
    """A foreign tokenizer.json as a vlpt tokenizer: the tokens at sot_id / eot_id become <sot> / <eot>
    (vlpt frames every text with them); missing <pad>/<mask>/<unk> are added after the vocabulary."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    names = {}
    for want, i in (("<sot>", sot_id), ("<eot>", eot_id)):
        have = tok.id_to_token(i)
        if have is None:
            raise MappingError(f"the tokenizer has no token with id {i} (needed as {want})")
        if have != want:
            names[have] = want
    return TextTokenizer.from_str(rename_tokens(tok_json, names) if names else tok_json, context_length)


def special_ids(tok_json: str, names: tuple[str | None, str | None] = (None, None)) -> tuple[int, int]:
    """Ids of a tokenizer's start and end tokens: `names` if given, else vlpt's or OpenAI CLIP's names."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    ids = []
    for name, fallbacks in zip(names, (("<sot>", "<|startoftext|>"), ("<eot>", "<|endoftext|>"))):
        found = [tok.token_to_id(c) for c in (name, *fallbacks) if c and tok.token_to_id(c) is not None]
        if not found:
            raise MappingError(f"cannot tell the tokenizer's start/end tokens (tried {', '.join(filter(None, (name, *fallbacks)))})")
        ids.append(found[0])
    return ids[0], ids[1]


def attach_tokenizer(tok_json: str, eot_id: int, context_length: int,
                     names: tuple[str | None, str | None] = (None, None)) -> TextTokenizer:
    """The tokenizer that goes with imported weights whose text tower pools at `eot_id`."""
    sot, eot = special_ids(tok_json, names)
    if eot != eot_id:
        raise MappingError(f"the tokenizer's end token has id {eot} but the model pools at id {eot_id}")
    return vlpt_tokenizer(tok_json, sot, eot, context_length)


# ------------------------------------------------------------------------------------------------ run folders
def save_run(imp: Imported, out_dir: str | Path) -> Path:
    """Writes a run folder (config.yaml, tokenizer.json, checkpoints/step-00000000/) that `vlpt eval`,
    `vlpt export` and `vlpt.inference.load` read. It holds no optimizer state: it is not a run to resume."""
    if imp.tokenizer is None:
        raise MappingError("a vlpt run folder needs a tokenizer: give the tokenizer.json that belongs to these weights")
    out = Path(out_dir)
    if checkpoint.latest(out / "checkpoints") is not None:
        raise MappingError(f"{out} already holds a run; pick another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_lib.dump(imp.cfg))
    imp.tokenizer.save(out / "tokenizer.json")
    (out / "imported.yaml").write_text(yaml.safe_dump({"source": imp.source}))
    meta = {"config": json.dumps(config_lib.to_dict(imp.cfg)), "tokenizer": imp.tokenizer.to_str(), "step": "0"}
    return checkpoint.save(out / "checkpoints", 0, imp.module.state_dict(), meta, {"step": 0, "imported_from": imp.source}, keep=1)
