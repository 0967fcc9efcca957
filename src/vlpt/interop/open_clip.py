"""open_clip CLIP and CoCa state dicts -> vlpt models, by name (open_clip itself is not needed).

open_clip's ViT CLIP is vlpt's CLIP up to names: `attn.in_proj_weight` is vlpt's fused qkv, `visual.proj`
and `text_projection` are applied as `x @ P` (the transpose of vlpt's Linear weights), the text tower pools
at the argmax of the ids (the end token is the highest id in OpenAI's vocabulary, so vlpt pools at id
vocab-1). Shapes come from the tensors; the head counts are not in them: they come from the open_clip model
config if given, else `width // 64` (open_clip's default head width), or from the arguments.

The activation is not in the tensors either: vlpt's MLP is exact GELU, as in open_clip configs without
`quick_gelu`. OpenAI's original weights (and open_clip's `*-quickgelu` models) use QuickGELU; pass their
config and the import refuses them instead of giving other embeddings.

Tokenizer: the weights carry only the vocabulary size. A vlpt run folder needs the matching tokenizer.json
(for OpenAI's vocabulary, e.g. the tokenizer.json of an HF CLIP repository); its start/end tokens become
vlpt's <sot>/<eot>.

CoCa (open_clip's coca_model.py: a `text_decoder.*` in the state dict) imports into vlpt's CoCa with
`model.decoder.style=open_clip` and `model.poolers.style=open_clip` (see config.py): open_clip's text tower
becomes the decoder's unimodal layers and [CLS], its attentional pooler vlpt's generative pooler (first
output = the contrastive feature), and its decoder's `text_projection` the output layer; the objectives are
contrastive + captioning (open_clip's CoCa loss weights 1 and 2). open_clip's text tower lets its [CLS]
read the first padding token, so vlpt's <pad> gets the embedding of open_clip's pad id (text_cfg.pad_id, 0);
vlpt's added tokens get output logits of -1e4 (never predicted). One difference stays: open_clip also masks
a real token equal to its pad id (OpenAI's vocabulary: id 0, "!") as padding; vlpt reads it as text.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import torch

from vlpt import config as config_lib
from vlpt.interop.common import (
    Entry, Imported, MappingError, attach_tokenizer, block_entries, build_module, clip_config, grow_vocab, remap,
    special_ids, validated, vlpt_tokenizer,
)
from vlpt.data.tokenizer import Vocab
from vlpt.models.vision import MEAN, STD
from vlpt.train.pretrainer import build

BLOCK = {"ln1": "ln_1", "attn.proj": "attn.out_proj", "ln2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
DEFAULT_HEAD_WIDTH = 64

# open_clip options with no vlpt counterpart: (section, key, value(s) that do map)
MAPPABLE = [
    ("vision_cfg", "pool_type", ("tok",)), ("vision_cfg", "attentional_pool", (False,)),
    ("vision_cfg", "final_ln_after_pool", (False,)), ("vision_cfg", "no_ln_pre", (False,)),
    ("text_cfg", "pool_type", ("argmax", "eos")), ("text_cfg", "no_causal_mask", (False,)),
    ("text_cfg", "final_ln_after_pool", (False,)), ("text_cfg", "proj_bias", (False,)),
    ("text_cfg", "proj_type", ("linear",)), ("text_cfg", "embed_cls", (False,)),
]
# what differs for CoCa: its text tower has a [CLS] (pool_type is then unused), its image tower a pooler
COCA_MAPPABLE = [
    ("vision_cfg", "pool_type", ("tok",)), ("vision_cfg", "attentional_pool", (True,)), ("vision_cfg", "no_ln_pre", (False,)),
    ("text_cfg", "embed_cls", (True,)), ("text_cfg", "no_causal_mask", (False,)), ("text_cfg", "proj_bias", (False,)),
    ("text_cfg", "proj_type", ("linear",)),
]
UNSET = ["timm_model_name", "hf_model_name", "ls_init_value", "act_kwargs", "norm_kwargs", "qk_norm",
         "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"]
ADDED_TOKEN_LOGIT = -1e4  # vlpt's tokens after open_clip's vocabulary: never predicted (finite: 0 x it stays 0)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a torch file of a state dict / an open_clip training checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # e.g. OpenAI's TorchScript archives
            raise MappingError(f"{path} is not a plain state dict ({type(err).__name__}); load it in open_clip "
                               "and save model.state_dict() first") from None
        sd = sd.get("state_dict", sd)
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def check_config(config: dict, coca: bool = False) -> None:
    """Raises MappingError naming the first open_clip option that vlpt's towers cannot reproduce."""
    if config.get("quick_gelu"):
        raise MappingError("quick_gelu=true does not map: vlpt's MLP uses exact GELU (the embeddings would differ)")
    for section in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        sub = config.get(section, {})
        if isinstance(sub.get("layers"), (list, tuple)):
            raise MappingError(f"{section}.layers={sub['layers']}: a ModifiedResNet image tower does not map")
        for key in UNSET:
            if sub.get(key) not in (None, False):
                raise MappingError(f"{section}.{key}={sub[key]} does not map to vlpt's towers")
        if sub.get("block_type") not in (None, "default"):
            raise MappingError(f"{section}.block_type={sub['block_type']} does not map to vlpt's towers")
    for section, key, ok in COCA_MAPPABLE if coca else MAPPABLE:
        value = config.get(section, {}).get(key)
        if value is not None and value not in ok:
            raise MappingError(f"{section}.{key}={value} does not map to vlpt's towers (supported: {', '.join(map(str, ok))})")
    pre = config.get("preprocess_cfg", {})
    for key, ref in (("mean", MEAN), ("std", STD)):
        if key in pre and any(abs(a - b) > 1e-6 for a, b in zip(pre[key], ref)):
            raise MappingError(f"preprocess_cfg.{key}={pre[key]}: vlpt's image tower normalises with CLIP's {ref}")


def _depth(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    return len({m.group(1) for k in sd if (m := pat.match(k))})


def _heads(width: int, given: int | None, what: str) -> int:
    heads = given or max(1, width // DEFAULT_HEAD_WIDTH)
    if width % heads:
        raise MappingError(f"{what} width {width} is not a multiple of {heads} heads; give the head count")
    return heads


def entries(vision_depth: int, text_depth: int, text_prefix: str) -> list[Entry]:
    """vlpt parameter <- open_clip CLIP parameter."""
    tp = text_prefix
    e = [Entry("model.visual.patch_embed.weight", ("visual.conv1.weight",)),
         Entry("model.visual.cls_token", ("visual.class_embedding",)),
         Entry("model.visual.pos_embed", ("visual.positional_embedding",)),
         *block_entries("model.visual", "visual", {"ln_pre": "ln_pre", "ln_post": "ln_post"}),
         Entry("model.image_proj.weight", ("visual.proj",), transpose=True),
         Entry("model.text.token_embed.weight", (f"{tp}token_embedding.weight",)),
         Entry("model.text.pos_embed", (f"{tp}positional_embedding",)),
         Entry("model.text.ln_final.weight", (f"{tp}ln_final.weight",)),
         Entry("model.text.ln_final.bias", (f"{tp}ln_final.bias",)),
         Entry("model.text_proj.weight", (f"{tp}text_projection",), transpose=True)]
    for mine, theirs, depth in (("model.visual", "visual.", vision_depth), ("model.text", tp, text_depth)):
        for i in range(depth):
            d, s = f"{mine}.transformer.blocks.{i}", f"{theirs}transformer.resblocks.{i}"
            e += block_entries(d, s, BLOCK)
            e += [Entry(f"{d}.attn.qkv.weight", (f"{s}.attn.in_proj_weight",)),
                  Entry(f"{d}.attn.qkv.bias", (f"{s}.attn.in_proj_bias",))]
    return e


def shapes(sd: dict, tp: str, config: dict, vision_heads: int | None, text_heads: int | None) -> tuple[dict, dict, int]:
    """vlpt's vision and text configs and the embedding width, read off the tensors (heads: see the module doc)."""
    def get(key):
        if key not in sd:
            raise MappingError(f"tensor missing from the state dict: {key}")
        return sd[key]

    vcfg, tcfg = config.get("vision_cfg", {}), config.get("text_cfg", {})
    vw, _, _, patch = get("visual.conv1.weight").shape
    vocab, tw = get(f"{tp}token_embedding.weight").shape
    vision_heads = vision_heads or (vw // vcfg["head_width"] if "head_width" in vcfg else None)
    vision = {"image_size": math.isqrt(get("visual.positional_embedding").shape[0] - 1) * patch, "patch_size": patch,
              "width": vw, "depth": _depth(sd, "visual."), "heads": _heads(vw, vision_heads, "vision"),
              "mlp_ratio": get("visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0] / vw, "pool": "cls", "stem": "patch"}
    text = {"context_length": get(f"{tp}positional_embedding").shape[0], "width": tw, "depth": _depth(sd, tp),
            "heads": _heads(tw, text_heads or tcfg.get("heads"), "text"),
            "mlp_ratio": get(f"{tp}transformer.resblocks.0.mlp.c_fc.weight").shape[0] / tw}
    return vision, text, get("visual.proj").shape[1]


def import_open_clip(src: str | Path | dict, config: dict | str | Path | None = None,
                     tokenizer: str | Path | None = None, vision_heads: int | None = None,
                     text_heads: int | None = None) -> Imported:
    """An open_clip CLIP or CoCa state dict (or a file of one) -> vlpt model + contrastive objective (sigmoid
    when the weights have a logit_bias; CoCa: + captioning). `config`: the open_clip model config (dict or
    JSON file), optional."""
    sd = load_state_dict(src) if not isinstance(src, dict) else dict(src)
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    config = config or {}
    coca = any(k.startswith("text_decoder.") for k in sd)
    check_config(config, coca)
    if "visual.conv1.weight" not in sd:
        raise MappingError("the image tower is not open_clip's ViT (no visual.conv1.weight): timm and ResNet towers do not map")
    name = str(src) if not isinstance(src, dict) else "open_clip state dict"
    if coca:
        return import_coca(sd, config, tokenizer, vision_heads, text_heads, name)
    if "text.cls_emb" in sd or "cls_emb" in sd:
        raise MappingError("a text tower with a [CLS] (embed_cls) and no caption decoder does not map")
    tp = "text." if "text.token_embedding.weight" in sd else ""  # open_clip's CustomTextCLIP keeps the text tower under text.

    vision, text, embed_dim = shapes(sd, tp, config, vision_heads, text_heads)
    objective = "sigmoid" if "logit_bias" in sd else "contrastive"
    cfg = clip_config(vision, text, embed_dim, objective)

    # argmax pooling = the first end token when it is the highest id; 'eos' pooling names its id
    tcfg, vocab = config.get("text_cfg", {}), sd[f"{tp}token_embedding.weight"].shape[0]
    eot_id = tcfg.get("eos_id", 2) if tcfg.get("pool_type") == "eos" else vocab - 1
    tok = attach_tokenizer(Path(tokenizer).read_text(), eot_id, text["context_length"]) if tokenizer else None
    size = max(vocab, tok.vocab_size if tok else 0)
    module = build_module(cfg, size, tok, eot_id)

    scale = _scales(sd, objective)
    sd[f"{tp}token_embedding.weight"] = grow_vocab(sd[f"{tp}token_embedding.weight"], size)
    own = {k: v.shape for k, v in module.state_dict().items() if k.startswith("model.")}
    mapped = remap(sd, entries(vision["depth"], text["depth"], tp), own, ignore=("attn_mask",))
    module.load_state_dict(mapped | scale, strict=False)  # remap filled every model tensor; a missing scale keeps its init
    return Imported(cfg, tok, module.eval(), name)


def _scales(sd: dict, objective: str) -> dict[str, torch.Tensor]:
    """Pops logit_scale / logit_bias -> the objective's parameters."""
    out = {}
    if "logit_scale" in sd:
        out[f"objectives.{objective}.log_scale"] = sd.pop("logit_scale").reshape(()).float()
    if "logit_bias" in sd:
        out["objectives.sigmoid.bias"] = sd.pop("logit_bias").reshape(()).float()
    return out


# ------------------------------------------------------------------------------------------------ CoCa
def _split(sd: dict, name: str, rows: int) -> tuple[str, str]:
    """Replaces a fused tensor by its first `rows` rows and the rest, under names that say so."""
    t = sd.pop(name)
    head, tail = f"{name}[:{rows}]", f"{name}[{rows}:]"
    sd[head], sd[tail] = t[:rows], t[rows:]
    return head, tail


def coca_entries(sd: dict, vision_depth: int, text_depth: int, decoder_depth: int, width: int, pool_width: int) -> list[Entry]:
    """vlpt parameter <- open_clip CoCa parameter; splits open_clip's fused q/k/v tensors in `sd` where vlpt
    keeps q apart from k/v (cross-attention, pooler)."""
    e = [Entry("model.visual.patch_embed.weight", ("visual.conv1.weight",)),
         Entry("model.visual.cls_token", ("visual.class_embedding",)),
         Entry("model.visual.pos_embed", ("visual.positional_embedding",)),
         *block_entries("model.visual", "visual", {"ln_pre": "ln_pre"}),
         *block_entries("model", "visual", {"ln_pool": "ln_post"}),
         Entry("model.image_proj.weight", ("visual.proj",), transpose=True),
         Entry("model.gen_pool.query", ("visual.attn_pool.query",)),
         *block_entries("model.gen_pool", "visual.attn_pool", {"ln_q": "ln_q", "ln_kv": "ln_k", "proj": "attn.out_proj"}),
         Entry("model.decoder.token_embed.weight", ("text.token_embedding.weight",)),
         Entry("model.decoder.pos_embed", ("text.positional_embedding",)),
         Entry("model.decoder.cls_token", ("text.cls_emb",)),
         *block_entries("model.decoder", "text", {"ln_cls": "ln_final"}),
         Entry("model.text_proj.weight", ("text.text_projection",), transpose=True),
         *block_entries("model.decoder", "text_decoder", {"ln_final": "ln_final"}),
         Entry("model.decoder.head.weight", ("text_decoder.text_projection",), transpose=True)]
    pool = "visual.attn_pool.attn."
    q_bias, kv_bias = _split(sd, pool + "in_proj_bias", pool_width)
    if pool + "in_proj_weight" in sd:  # token width == pool width: torch fuses the three projections
        q, kv = _split(sd, pool + "in_proj_weight", pool_width)
        q, kv = (q,), (kv,)
    else:
        q, kv = (pool + "q_proj_weight",), (pool + "k_proj_weight", pool + "v_proj_weight")
    e += [Entry("model.gen_pool.q.weight", q), Entry("model.gen_pool.q.bias", (q_bias,)),
          Entry("model.gen_pool.kv.weight", kv), Entry("model.gen_pool.kv.bias", (kv_bias,))]

    def self_block(dest: str, src: str, names: dict) -> list[Entry]:
        return [*block_entries(dest, src, names), Entry(f"{dest}.attn.qkv.weight", (f"{src}.attn.in_proj_weight",)),
                Entry(f"{dest}.attn.qkv.bias", (f"{src}.attn.in_proj_bias",))]

    for i in range(vision_depth):
        e += self_block(f"model.visual.transformer.blocks.{i}", f"visual.transformer.resblocks.{i}", BLOCK)
    for i in range(text_depth):
        e += self_block(f"model.decoder.unimodal.{i}", f"text.transformer.resblocks.{i}", BLOCK)
    for i in range(decoder_depth):
        d, x = f"model.decoder.multimodal.{i}", f"text_decoder.cross_attn.{i}"
        e += self_block(d, f"text_decoder.resblocks.{i}", {"ln1": "ln_1", "attn.proj": "attn.out_proj", "ln_sa_mlp": "ln_2",
                                                          "sa_mlp.fc1": "mlp.c_fc", "sa_mlp.fc2": "mlp.c_proj"})
        e += block_entries(d, x, {"ln_cross": "ln_1", "cross.ln_kv": "ln_1_kv", "cross.proj": "attn.out_proj", "ln2": "ln_2",
                                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"})
        for part in ("weight", "bias"):
            q, kv = _split(sd, f"{x}.attn.in_proj_{part}", width)
            e += [Entry(f"{d}.cross.q.{part}", (q,)), Entry(f"{d}.cross.kv.{part}", (kv,))]
    return e


def coca_config(sd: dict, config: dict, objective: str, vision_heads: int | None, text_heads: int | None) -> config_lib.Config:
    """vlpt's CoCa config for these tensors: open_clip's layout switches on, shapes from the tensors."""
    def get(key):
        if key not in sd:
            raise MappingError(f"tensor missing from the state dict: {key}")
        return sd[key]

    vision, text, embed_dim = shapes(sd, "text.", config, vision_heads, text_heads)
    text["context_length"] -= 1  # open_clip's [CLS] has a position of its own after the L tokens
    mcfg = config.get("multimodal_cfg", {})
    if mcfg.get("heads", text["heads"]) != text["heads"]:
        raise MappingError(f"multimodal_cfg.heads={mcfg['heads']} differs from the text tower's {text['heads']}: "
                           "vlpt's decoder layers share the text tower's head count")
    width = text["width"]
    if get("text_decoder.resblocks.0.mlp.c_fc.weight").shape[0] != text["mlp_ratio"] * width:
        raise MappingError("the decoder's MLP width differs from the text tower's: vlpt's decoder layers share one mlp_ratio")
    queries, pool_width = get("visual.attn_pool.query").shape
    if pool_width != embed_dim:
        raise MappingError(f"the pooler width {pool_width} is not embed_dim {embed_dim} (open_clip pools to embed_dim)")
    pool_heads = config.get("vision_cfg", {}).get("attn_pooler_heads", 8)  # open_clip's default
    depth = len({k.split(".")[2] for k in sd if k.startswith("text_decoder.cross_attn.")})
    recipe = config_lib.resolve("coca", {"train": {"steps": 1}} | ({"objectives": {"contrastive": False, "sigmoid": {}}}
                                                                   if objective == "sigmoid" else {}))
    model = config_lib.ModelConfig(
        preset="imported", vision=config_lib.VisionConfig(**vision), text=config_lib.TextConfig(**text), embed_dim=embed_dim,
        decoder=config_lib.DecoderConfig(depth=depth, width=width, heads=text["heads"], unimodal_depth=text["depth"],
                                         style="open_clip"),
        poolers=config_lib.PoolerConfig(generative_queries=queries, contrastive="first", heads=pool_heads, style="open_clip"))
    return validated(dataclasses.replace(recipe, model=model))


def import_coca(sd: dict, config: dict, tokenizer: str | Path | None, vision_heads: int | None,
                text_heads: int | None, name: str) -> Imported:
    """An open_clip CoCa state dict -> vlpt CoCa (contrastive + captioning), open_clip's layout switched on."""
    if any(k.startswith("visual.attn_pool_contrastive.") for k in sd):
        raise MappingError("open_clip's parallel/cascade attentional pooler (vision_cfg.attentional_pool as a string, "
                           "'untested WIP' there) does not map; its default single pooler does")
    objective = "sigmoid" if "logit_bias" in sd else "contrastive"
    cfg = coca_config(sd, config, objective, vision_heads, text_heads)
    m = cfg.model
    vocab = sd["text.token_embedding.weight"].shape[0]
    pad = config.get("text_cfg", {}).get("pad_id", 0)
    if tokenizer:
        tok_json = Path(tokenizer).read_text()
        tok = vlpt_tokenizer(tok_json, *special_ids(tok_json), m.text.context_length)
        if tok.pad_id < vocab and tok.pad_id != pad:
            raise MappingError(f"the tokenizer pads with id {tok.pad_id}, the model was trained padding with id {pad} "
                               "(text_cfg.pad_id), which its [CLS] reads")
        ids = tok
    else:  # ids as open_clip's tokenizer makes them for OpenAI's vocabulary (<sot>, <eot> = the last two ids)
        tok, ids = None, SimpleNamespace(vocab_size=vocab, pad_id=pad, sot_id=vocab - 2, eot_id=vocab - 1, mask_id=pad)
    size = max(vocab, ids.vocab_size)
    module = build(cfg, Vocab(size, ids.pad_id, ids.sot_id, ids.eot_id, ids.mask_id))
    scale = _scales(sd, objective)
    embed = grow_vocab(sd["text.token_embedding.weight"], size)
    if ids.pad_id != pad:  # vlpt's <pad> (a new id) must look like open_clip's: the [CLS] reads one
        embed[ids.pad_id] = embed[pad]
    sd["text.token_embedding.weight"] = embed
    sd["text_decoder.text_projection"] = grow_vocab(sd["text_decoder.text_projection"].T, size).T
    own = {k: v.shape for k, v in module.state_dict().items() if k.startswith("model.") and k != "model.decoder.head.bias"}
    mapped = remap(sd, coca_entries(sd, m.vision.depth, m.decoder.unimodal_depth, m.decoder.depth, m.text.width,
                                    m.embed_dim), own, ignore=("attn_mask",))
    bias = torch.zeros(size)
    bias[vocab:] = ADDED_TOKEN_LOGIT  # open_clip's output layer has no bias
    module.load_state_dict(mapped | scale | {"model.decoder.head.bias": bias}, strict=False)
    return Imported(cfg, tok, module.eval(), name)
