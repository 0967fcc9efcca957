"""open_clip CLIP state dicts -> vlpt models, by name (open_clip itself is not needed).

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
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from vlpt.interop.common import (
    Entry, Imported, MappingError, attach_tokenizer, block_entries, build_module, clip_config, grow_vocab, remap,
)
from vlpt.models.vision import MEAN, STD

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
UNSET = ["timm_model_name", "hf_model_name", "ls_init_value", "act_kwargs", "norm_kwargs", "qk_norm",
         "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"]


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


def check_config(config: dict) -> None:
    """Raises MappingError naming the first open_clip option that vlpt's towers cannot reproduce."""
    if config.get("quick_gelu"):
        raise MappingError("quick_gelu=true does not map: vlpt's MLP uses exact GELU (the embeddings would differ)")
    for section in ("vision_cfg", "text_cfg"):
        sub = config.get(section, {})
        if isinstance(sub.get("layers"), (list, tuple)):
            raise MappingError(f"{section}.layers={sub['layers']}: a ModifiedResNet image tower does not map")
        for key in UNSET:
            if sub.get(key) not in (None, False):
                raise MappingError(f"{section}.{key}={sub[key]} does not map to vlpt's towers")
        if sub.get("block_type") not in (None, "default"):
            raise MappingError(f"{section}.block_type={sub['block_type']} does not map to vlpt's towers")
    for section, key, ok in MAPPABLE:
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
    """An open_clip CLIP state dict (or a file of one) -> vlpt model + contrastive objective (sigmoid when
    the weights have a logit_bias). `config`: the open_clip model config (dict or JSON file), optional."""
    sd = load_state_dict(src) if not isinstance(src, dict) else dict(src)
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    config = config or {}
    check_config(config)
    if "visual.conv1.weight" not in sd:
        raise MappingError("the image tower is not open_clip's ViT (no visual.conv1.weight): timm and ResNet towers do not map")
    if "text.cls_emb" in sd or any(k.startswith("text_decoder.") for k in sd):
        raise MappingError(
            "open_clip CoCa does not map onto vlpt's CoCa: each of its decoder layers is two residual blocks "
            "(self-attention + MLP, then cross-attention + MLP with a LayerNorm on the image tokens) where vlpt's "
            "has one; the first query of its single attentional pooler is the contrastive feature (vlpt: separate "
            "poolers, no LayerNorm after them); its [CLS] follows all L text tokens (vlpt: L-1)")
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

    scale = {k: sd.pop(k) for k in ("logit_scale", "logit_bias") if k in sd}
    sd[f"{tp}token_embedding.weight"] = grow_vocab(sd[f"{tp}token_embedding.weight"], size)
    own = {k: v.shape for k, v in module.state_dict().items() if k.startswith("model.")}
    mapped = remap(sd, entries(vision["depth"], text["depth"], tp), own, ignore=("attn_mask",))
    if "logit_scale" in scale:
        mapped[f"objectives.{objective}.log_scale"] = scale["logit_scale"].reshape(()).float()
    if "logit_bias" in scale:
        mapped["objectives.sigmoid.bias"] = scale["logit_bias"].reshape(()).float()
    module.load_state_dict(mapped, strict=False)  # remap filled every model tensor; a missing scale keeps its init
    return Imported(cfg, tok, module.eval(), str(src) if not isinstance(src, dict) else "open_clip state dict")
