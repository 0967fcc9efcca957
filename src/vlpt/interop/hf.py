"""HF transformers `CLIPModel` folders <-> vlpt CLIP models (needs `pip install transformers`).

What maps: a ViT with a linear patch stem (HF: conv without bias) and class-token pooling, a causal text
tower pooled at <eot>, linear projections without bias, exact GELU, LayerNorm eps 1e-5. vlpt's fused qkv
is HF's q/k/v_proj stacked by rows; vlpt's `ln_post` over all tokens then the class token equals HF's
`post_layernorm` on the pooled class token. vlpt normalises uint8 images inside the tower; HF takes
normalised `pixel_values`, made by the CLIPImageProcessor config written beside the weights.

Text pooling: HF reads `eos_token_id == 2` as an old config and pools at the argmax of the input ids, but
vlpt's <eot> id is 2. The export therefore gives <eot> the last id of the vocabulary (swapping it with the
token there, in the embedding table and in tokenizer.json): both HF paths, first-<eot> and argmax, then
pool where vlpt does.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from vlpt.interop.common import (
    Entry, Imported, MappingError, attach_tokenizer, block_entries, build_module, clip_config, grow_vocab, remap,
    swap_ids, unmap,
)
from vlpt.models.vision import MEAN, STD

V, T = "model.visual", "model.text"
BLOCK = {"ln1": "layer_norm1", "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "attn.proj": "self_attn.out_proj", "ln2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
LOG_SCALE = "objectives.contrastive.log_scale"
EMBED = f"{T}.token_embed.weight"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MappingError("the HF format needs transformers: pip install 'transformers>=4.45'") from None
    return transformers


def entries(vision_depth: int, text_depth: int) -> list[Entry]:
    """vlpt parameter <- HF CLIPModel parameter(s)."""
    e = [Entry(f"{V}.patch_embed.weight", ("vision_model.embeddings.patch_embedding.weight",)),
         Entry(f"{V}.cls_token", ("vision_model.embeddings.class_embedding",)),
         Entry(f"{V}.pos_embed", ("vision_model.embeddings.position_embedding.weight",)),
         *block_entries(V, "vision_model", {"ln_pre": "pre_layrnorm", "ln_post": "post_layernorm"}),
         Entry(EMBED, ("text_model.embeddings.token_embedding.weight",)),
         Entry(f"{T}.pos_embed", ("text_model.embeddings.position_embedding.weight",)),
         *block_entries(T, "text_model", {"ln_final": "final_layer_norm"}),
         Entry("model.image_proj.weight", ("visual_projection.weight",)),
         Entry("model.text_proj.weight", ("text_projection.weight",))]
    for tower, hf, depth in ((V, "vision_model", vision_depth), (T, "text_model", text_depth)):
        for i in range(depth):
            e += block_entries(f"{tower}.transformer.blocks.{i}", f"{hf}.encoder.layers.{i}", BLOCK)
    return e


def check_exportable(cfg, model) -> None:
    """Raises MappingError naming the first part of a vlpt model that HF CLIPModel cannot hold."""
    v = cfg.model.vision
    if v.stem != "patch":
        raise MappingError(f"model.vision.stem={v.stem} does not map: HF CLIPVisionModel embeds patches with a "
                           "single linear patch convolution (stem=patch)")
    if v.pool != "cls":
        raise MappingError(f"model.vision.pool={v.pool} does not map: HF CLIPVisionModel pools the class token (pool=cls)")
    if cfg.model.text.kind != "transformer":
        raise MappingError(f"model.text.kind={cfg.model.text.kind} does not map: HF CLIPTextModel is a causal transformer")
    for part, what in (("decoder", "a caption decoder"), ("con_pool", "a contrastive attention pooler"),
                       ("gen_pool", "a generative attention pooler")):
        if getattr(model, part, None) is not None:
            raise MappingError(f"the model has {what} (CoCa/Cap); HF CLIPModel holds only the two contrastive towers")
    if getattr(model, "visual", None) is None or getattr(model, "text", None) is None:
        raise MappingError("HF CLIPModel needs both an image tower and a CLIP text tower; this model lacks one")


def _log_scale(cfg, state: dict) -> float:
    """CLIP's logit scale, clamped as vlpt's loss clamps it (HF does not clamp)."""
    if "contrastive" in cfg.objectives:
        cap = math.log(cfg.objectives["contrastive"].options.get("max_scale", 100.0))
        return min(float(state[LOG_SCALE]), cap)
    if "sigmoid" in cfg.objectives:
        warnings.warn("HF CLIPModel has no logit bias: the sigmoid objective's bias is not exported "
                      "(embeddings are exact; logits lack the bias)")
        return float(state["objectives.sigmoid.log_scale"])
    return math.log(1 / 0.07)


def hf_config(cfg, vocab_size: int, sot_id: int, eot_id: int, pad_id: int, log_scale: float):
    v, t = cfg.model.vision, cfg.model.text
    common = {"hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": cfg.model.embed_dim}
    return _transformers().CLIPConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": t.width, "intermediate_size": int(t.width * t.mlp_ratio),
                     "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
                     "max_position_embeddings": t.context_length, "bos_token_id": sot_id, "eos_token_id": eot_id,
                     "pad_token_id": pad_id, **common},
        vision_config={"hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
                       "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "num_channels": 3,
                       "image_size": v.image_size, "patch_size": v.patch_size, **common},
        projection_dim=cfg.model.embed_dim, logit_scale_init_value=log_scale)


def image_processor_config(image_size: int) -> dict:
    """CLIPImageProcessor: shorter side to the size (bicubic), centre crop, /255, CLIP mean/std (as vlpt does)."""
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"shortest_edge": image_size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD)}


def export_hf(run: str | Path, out_dir: str | Path) -> Path:
    """A vlpt run / checkpoint folder -> an HF folder: config.json, model.safetensors, tokenizer.json (+ its
    config) and preprocessor_config.json. `CLIPModel.from_pretrained(out_dir)` gives vlpt's embeddings."""
    from tokenizers import Tokenizer, processors

    from vlpt.inference import load_pretrainer

    tf = _transformers()
    cfg, tok, module, _ = load_pretrainer(run)
    check_exportable(cfg, module.model)
    state = {k: v for k, v in module.state_dict().items() if k.startswith("model.")}
    log_scale = _log_scale(cfg, module.state_dict())

    vocab, tok_json = state[EMBED].shape[0], tok.to_str()
    if tok.eot_id != vocab - 1:  # see the module docstring: <eot> becomes the highest id
        rows = torch.arange(vocab)
        rows[[tok.eot_id, vocab - 1]] = rows[[vocab - 1, tok.eot_id]]
        state[EMBED] = state[EMBED][rows]
        tok_json = swap_ids(tok_json, tok.eot_id, vocab - 1)
    hf_tok = Tokenizer.from_str(tok_json)
    sot, eot, pad = (hf_tok.token_to_id(t) for t in ("<sot>", "<eot>", "<pad>"))
    hf_tok.post_processor = processors.TemplateProcessing(single="<sot> $A <eot>", special_tokens=[("<sot>", sot), ("<eot>", eot)])

    model = tf.CLIPModel(hf_config(cfg, vocab, sot, eot, pad, log_scale)).eval()
    shapes = {k: v.shape for k, v in model.state_dict().items() if k != "logit_scale"}
    hf_state = unmap(state, entries(cfg.model.vision.depth, cfg.model.text.depth), shapes)
    model.load_state_dict({**hf_state, "logit_scale": torch.tensor(log_scale)}, strict=True)

    out = Path(out_dir)
    model.save_pretrained(out)
    hf_tok.save(str(out / "tokenizer.json"))
    _write_tokenizer_config(out, tok_json, cfg.model.text.context_length)
    (out / "preprocessor_config.json").write_text(json.dumps(image_processor_config(cfg.model.vision.image_size), indent=2))
    return out


def _write_tokenizer_config(out: Path, tok_json: str, context_length: int) -> None:
    """What AutoTokenizer needs beside tokenizer.json (a PreTrainedTokenizerFast with vlpt's specials)."""
    specials = {"bos_token": "<sot>", "eos_token": "<eot>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
               "padding_side": "right", "clean_up_tokenization_spaces": False,
               "model_input_names": ["input_ids", "attention_mask"], **specials}
    prefix = _prefix_space(json.loads(tok_json).get("pre_tokenizer"))
    if prefix is not None:  # transformers 4.x resets the pre-tokenizer's prefix space unless told
        tok_cfg["add_prefix_space"] = prefix
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))


def _prefix_space(node) -> bool | None:
    """The pre-tokenizer's add_prefix_space (ByteLevel), also inside a Sequence; None if it has none."""
    if isinstance(node, dict) and "add_prefix_space" in node:
        return bool(node["add_prefix_space"])
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return next((f for f in map(_prefix_space, children) if f is not None), None)


# ------------------------------------------------------------------------------------------------ import
def _special(folder: Path, key: str) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.is_file():
            value = json.loads(f.read_text()).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                return value
    return None


def import_hf(src: str | Path, tokenizer: str | Path | None = None) -> Imported:
    """An HF CLIPModel folder -> vlpt model + contrastive objective (+ tokenizer: `tokenizer`, else the
    folder's tokenizer.json, else none)."""
    tf = _transformers()
    src = Path(src)
    model_type = tf.AutoConfig.from_pretrained(src).model_type
    if model_type != "clip":
        raise MappingError(f"{src} holds a '{model_type}' model; only CLIPModel (model_type 'clip') maps")
    model = tf.CLIPModel.from_pretrained(src)
    tok_file = Path(tokenizer) if tokenizer else src / "tokenizer.json"
    tok_json = tok_file.read_text() if tok_file.is_file() else None
    tok_folder = tok_file.parent
    names = (_special(tok_folder, "bos_token"), _special(tok_folder, "eos_token"))
    return import_hf_state(model.state_dict(), model.config, tok_json, names, source=str(src))


def _pool_id(text_cfg) -> int:
    # HF treats eos_token_id == 2 as an old config and pools at the argmax of the ids: first-<eot> pooling
    # is the same when <eot> is the highest id, as in OpenAI's vocabulary
    return text_cfg.vocab_size - 1 if text_cfg.eos_token_id == 2 else text_cfg.eos_token_id


def import_hf_state(state: dict, config, tokenizer_json: str | None = None,
                    special_names: tuple[str | None, str | None] = (None, None), source: str = "") -> Imported:
    """A CLIPModel state dict and its CLIPConfig (or config dict) -> vlpt. `special_names`: the tokenizer's
    start and end tokens (default: <sot>/<|startoftext|>, <eot>/<|endoftext|>)."""
    tf = _transformers()
    if isinstance(config, dict):
        config = tf.CLIPConfig(**config)
    vc, tc = config.vision_config, config.text_config
    for name, c in (("vision_config", vc), ("text_config", tc)):
        if c.hidden_act != "gelu":
            raise MappingError(f"{name}.hidden_act={c.hidden_act} does not map: vlpt's MLP uses exact GELU ('gelu'); "
                               "OpenAI's CLIP weights use quick_gelu and would give other embeddings")
        if abs(c.layer_norm_eps - 1e-5) > 1e-12:
            raise MappingError(f"{name}.layer_norm_eps={c.layer_norm_eps} does not map: vlpt's LayerNorm eps is 1e-5")
        if int(c.hidden_size * (c.intermediate_size / c.hidden_size)) != c.intermediate_size:
            raise MappingError(f"{name}.intermediate_size={c.intermediate_size} is not expressible as a vlpt mlp_ratio")
    if getattr(vc, "num_channels", 3) != 3:
        raise MappingError(f"vision_config.num_channels={vc.num_channels}: vlpt's image tower takes RGB")
    vision = {"image_size": vc.image_size, "patch_size": vc.patch_size, "width": vc.hidden_size,
              "depth": vc.num_hidden_layers, "heads": vc.num_attention_heads,
              "mlp_ratio": vc.intermediate_size / vc.hidden_size, "pool": "cls", "stem": "patch"}
    text = {"context_length": tc.max_position_embeddings, "width": tc.hidden_size, "depth": tc.num_hidden_layers,
            "heads": tc.num_attention_heads, "mlp_ratio": tc.intermediate_size / tc.hidden_size}
    cfg = clip_config(vision, text, config.projection_dim)

    eot_id, tok = _pool_id(tc), None
    if tokenizer_json is not None:
        tok = attach_tokenizer(tokenizer_json, eot_id, text["context_length"], special_names)
    vocab = max(tc.vocab_size, tok.vocab_size if tok else 0)
    module = build_module(cfg, vocab, tok, eot_id)

    state = dict(state)
    key = "text_model.embeddings.token_embedding.weight"
    state[key] = grow_vocab(state[key], vocab)
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    mapped = remap({k: v for k, v in state.items() if k != "logit_scale"}, entries(vision["depth"], text["depth"]),
                   {k: s for k, s in shapes.items() if k != LOG_SCALE}, ignore=("position_ids",))
    mapped[LOG_SCALE] = state["logit_scale"].detach().reshape(()).float()
    module.load_state_dict(mapped, strict=True)
    return Imported(cfg, tok, module.eval(), source or "hf state dict")
