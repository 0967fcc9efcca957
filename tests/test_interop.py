"""Weight formats: HF CLIPModel export/import and open_clip import give the same embeddings as the source
model's own forward (HF's and open_clip's code, or an independent reference forward), to 1e-4."""
import json
import math
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers  # a test dependency (pyproject extra `test`)
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from vlpt import config, inference
from vlpt.cli import main as cli_main
from vlpt.data.tokenizer import TextTokenizer
from vlpt.interop import MappingError, export_hf, import_hf, import_hf_state, import_open_clip, save_run
from vlpt.interop.common import Imported
from vlpt.train.pretrainer import build

PEER = Path("/tmp/peer-openclip/bin/python")  # ../shared/peers/open_clip/setup.sh: open_clip + transformers 4.x
needs_peer = pytest.mark.skipif(not PEER.exists(), reason="open_clip peer venv absent (../shared/peers/open_clip/setup.sh)")
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
CAPTIONS = ["a red cube on the left", "two blue balls", "a green cone next to a yellow cube", "a photo of a cat"]
TEXTS = ["a red cube", "two blue balls on the left of a green cone", "cat"]


def perturbed(module):
    """Every parameter moved off its init, so a swapped or dropped tensor shows in the outputs."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module.eval()


def make_run(path, *overrides):
    cfg = config.resolve("clip", ["model=micro", "train.steps=1", *overrides])
    tok = TextTokenizer.train(CAPTIONS * 5, 300, cfg.model.text.context_length)
    save_run(Imported(cfg, tok, perturbed(build(cfg, tok.vocab))), path)
    return path


def images(b=3, size=32):
    return torch.randint(0, 256, (b, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def features(out):
    """transformers 5 returns a model output with the projected features as pooler_output; 4.x a tensor."""
    return F.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("vlpt") / "run")


@pytest.fixture(scope="module")
def hf_dir(run, tmp_path_factory):
    return export_hf(run, tmp_path_factory.mktemp("hf") / "clip")


# ------------------------------------------------------------------------------------------------ HF
def test_hf_export_gives_vlpt_embeddings(run, hf_dir):
    enc = inference.load(run)
    assert {p.name for p in hf_dir.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"}
    hf = transformers.CLIPModel.from_pretrained(hf_dir).eval()
    proc = transformers.CLIPImageProcessor.from_pretrained(hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    imgs = images()
    pixels = proc(images=[im.permute(1, 2, 0).numpy() for im in imgs], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, (imgs.float() / 255 - MEAN) / STD, atol=1e-5, rtol=0)

    ids = tok(TEXTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    vocab = enc.tokenizer.vocab_size
    swapped = enc.tokenizer(TEXTS).clone()  # <eot> (2) moved to the last id, and that token to 2
    swapped[enc.tokenizer(TEXTS) == 2], swapped[enc.tokenizer(TEXTS) == vocab - 1] = vocab - 1, 2
    assert torch.equal(ids["input_ids"], swapped)
    short = tok(TEXTS, padding=True, return_tensors="pt")  # HF-style dynamic padding, attention mask and all
    with torch.no_grad():
        img_hf = features(hf.get_image_features(pixel_values=pixels))
        txt_hf = features(hf.get_text_features(**ids))
        txt_short = features(hf.get_text_features(**short))
    torch.testing.assert_close(img_hf, enc.encode_images(imgs), atol=1e-4, rtol=0)
    torch.testing.assert_close(txt_hf, enc.encode_texts(TEXTS), atol=1e-4, rtol=0)
    torch.testing.assert_close(txt_short, txt_hf, atol=1e-4, rtol=0)
    _, _, module, _ = inference.load_pretrainer(run)
    assert math.isclose(hf.logit_scale.exp().item(), module.objectives["contrastive"].scale().item(), rel_tol=1e-6)
    assert hf.config.text_config.eos_token_id == vocab - 1 != 2  # HF's argmax legacy path is never taken


def test_hf_import_gives_back_the_same_model(run, hf_dir):
    _, _, original, _ = inference.load_pretrainer(run)
    back = import_hf(hf_dir)
    a, b = original.state_dict(), back.module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if k != "model.text.token_embed.weight":
            torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)
    rows = a["model.text.token_embed.weight"]
    assert torch.equal(b["model.text.token_embed.weight"], torch.cat([rows[:2], rows[-1:], rows[3:-1], rows[2:3]]))
    with torch.no_grad():
        torch.testing.assert_close(back.module.model.encode_text(back.tokenizer(TEXTS)),
                                   original.model.encode_text(inference.load(run).tokenizer(TEXTS)), atol=1e-6, rtol=0)
    assert back.tokenizer.decode(back.tokenizer(TEXTS)[1]) == TEXTS[1]


def test_cli_export_then_import_gives_the_same_encoder(run, tmp_path):
    assert cli_main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert cli_main(["import-weights", str(tmp_path / "hf"), str(tmp_path / "back"), "--from", "hf"]) == 0
    a, b = inference.load(run), inference.load(tmp_path / "back")
    torch.testing.assert_close(b.encode_texts(TEXTS), a.encode_texts(TEXTS), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.encode_images(images()), a.encode_images(images()), atol=1e-6, rtol=0)
    assert cli_main(["import-weights", str(tmp_path / "hf"), str(tmp_path / "back"), "--from", "hf"]) == 2  # no overwrite


@needs_peer
def test_hf_export_loads_in_transformers_4(run, hf_dir, tmp_path):
    """The exported folder in the other major version of transformers (the peer venv has 4.x)."""
    script = textwrap.dedent(f"""
        import torch, transformers
        from safetensors.torch import save_file
        m = transformers.CLIPModel.from_pretrained("{hf_dir}").eval()
        tok = transformers.AutoTokenizer.from_pretrained("{hf_dir}")
        ids = tok({TEXTS!r}, padding=True, return_tensors="pt")
        with torch.no_grad():
            t = m.get_text_features(**ids)
        save_file({{"text": t}}, "{tmp_path}/out.safetensors")
    """)
    done = subprocess.run([str(PEER), "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = F.normalize(load_file(tmp_path / "out.safetensors")["text"], dim=-1)
    torch.testing.assert_close(got, inference.load(run).encode_texts(TEXTS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("override,named", [("model.vision.stem=conv", "model.vision.stem=conv"),
                                            ("model.vision.pool=gap", "model.vision.pool=gap")])
def test_export_refuses_what_hf_clip_cannot_hold(tmp_path, capsys, override, named):
    run = make_run(tmp_path / "run", override)
    with pytest.raises(MappingError, match=named):
        export_hf(run, tmp_path / "hf")
    assert cli_main(["export", str(run), str(tmp_path / "hf2"), "--format", "hf"]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists()


def openai_style_tokenizer() -> str:
    """A byte-level BPE with OpenAI CLIP's special tokens at the two highest ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.train_from_iterator(CAPTIONS * 5, trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    return tok.to_str()


def openai_style_ids(tok_json: str, texts, length=24):
    tok = Tokenizer.from_str(tok_json)
    sot, eot = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    ids = torch.zeros(len(texts), length, dtype=torch.long)  # OpenAI's tokenizer pads with 0
    for row, enc in zip(ids, tok.encode_batch(texts, add_special_tokens=False)):
        body = enc.ids[: length - 2]  # cut as vlpt's tokenizer cuts: <eot> always present
        row[: len(body) + 2] = torch.tensor([sot, *body, eot])
    return ids


def test_hf_import_of_an_openai_style_folder(tmp_path):
    """eos_token_id=2 (HF's legacy argmax pooling), <|startoftext|>/<|endoftext|> at the top of the vocabulary."""
    tok_json = openai_style_tokenizer()
    vocab = Tokenizer.from_str(tok_json).get_vocab_size()
    common = {"hidden_act": "gelu", "projection_dim": 32}
    cfg = transformers.CLIPConfig(
        text_config={"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 24, "eos_token_id": 2, "bos_token_id": 0,
                     "pad_token_id": 1, **common},
        vision_config={"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 3,
                       "image_size": 32, "patch_size": 16, **common},
        projection_dim=32)
    torch.manual_seed(0)
    hf = perturbed(transformers.CLIPModel(cfg))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(tok_json)
    imp = import_hf(tmp_path / "hf")

    ids = openai_style_ids(tok_json, TEXTS)
    mine = imp.tokenizer(TEXTS)
    assert torch.equal(mine[:, 0], torch.full((3,), vocab - 2)) and (mine == vocab - 1).sum() == 3
    assert imp.tokenizer.vocab_size == vocab + 3  # <pad>, <mask>, <unk> added after the vocabulary
    imgs = images()
    with torch.no_grad():
        torch.testing.assert_close(imp.module.model.encode_text(mine), features(hf.get_text_features(input_ids=ids)), atol=1e-4, rtol=0)
        torch.testing.assert_close(imp.module.model.encode_image(imgs),
                                   features(hf.get_image_features(pixel_values=(imgs.float() / 255 - MEAN) / STD)), atol=1e-4, rtol=0)
    assert imp.cfg.model.vision.mlp_ratio == 4.0 and imp.cfg.model.text.mlp_ratio == 2.0

    cfg.text_config.hidden_act = "quick_gelu"
    with pytest.raises(MappingError, match="hidden_act=quick_gelu"):
        import_hf_state(hf.state_dict(), cfg)


# ------------------------------------------------------------------------------------------------ open_clip
def open_clip_state(v_width=64, v_depth=2, patch=8, grid=4, t_width=48, t_depth=2, ctx=24, vocab=282, embed=40):
    """A CLIP state dict with open_clip's names (src/open_clip/transformer.py: VisionTransformer, TextTransformer)."""
    shapes = {"visual.conv1.weight": (v_width, 3, patch, patch), "visual.class_embedding": (v_width,),
              "visual.positional_embedding": (grid * grid + 1, v_width), "visual.proj": (v_width, embed),
              "token_embedding.weight": (vocab, t_width), "positional_embedding": (ctx, t_width),
              "text_projection": (t_width, embed), "logit_scale": ()}
    for ln, w in (("visual.ln_pre", v_width), ("visual.ln_post", v_width), ("ln_final", t_width)):
        shapes |= {f"{ln}.weight": (w,), f"{ln}.bias": (w,)}
    for prefix, w, depth in (("visual.", v_width, v_depth), ("", t_width, t_depth)):
        for i in range(depth):
            shapes |= resblock_shapes(f"{prefix}transformer.resblocks.{i}.", w)
    return random_state(shapes)


def resblock_shapes(b: str, w: int) -> dict:
    """open_clip's ResidualAttentionBlock (torch MultiheadAttention, fused in_proj)."""
    return {b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "attn.in_proj_weight": (3 * w, w),
            b + "attn.in_proj_bias": (3 * w,), b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
            b + "ln_2.weight": (w,), b + "ln_2.bias": (w,), b + "mlp.c_fc.weight": (4 * w, w),
            b + "mlp.c_fc.bias": (4 * w,), b + "mlp.c_proj.weight": (w, 4 * w), b + "mlp.c_proj.bias": (w,)}


def random_state(shapes: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * (0.3 if len(s) > 1 else 0.1) for k, s in shapes.items()}
    for k in sd:
        if ".ln" in k or k.startswith("ln"):  # LayerNorm gains near 1
            sd[k] = sd[k] + (1.0 if k.endswith("weight") else 0.0)
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return sd


def reference_forward(sd, imgs, text, v_heads, t_heads):
    """open_clip's CLIP forward written out with torch's multi-head attention (as open_clip's blocks use)."""
    def block(x, p, heads, mask=None):
        w = x.shape[-1]
        h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]).transpose(0, 1)
        a = F.multi_head_attention_forward(h, h, h, w, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"],
                                           None, None, False, 0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"],
                                           training=False, need_weights=False, attn_mask=mask)[0]
        x = x + a.transpose(0, 1)
        h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        return x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])

    x = F.conv2d((imgs.float() / 255 - MEAN) / STD, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = ln(x, "visual.ln_pre")
    for i in range(2):
        x = block(x, f"visual.transformer.resblocks.{i}.", v_heads)
    img = ln(x, "visual.ln_post")[:, 0] @ sd["visual.proj"]
    n = text.shape[1]
    x = sd["token_embedding.weight"][text] + sd["positional_embedding"][:n]
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i in range(2):
        x = block(x, f"transformer.resblocks.{i}.", t_heads, causal)
    x = ln(x, "ln_final")
    txt = x[torch.arange(len(text)), text.argmax(-1)] @ sd["text_projection"]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def test_open_clip_state_dict_gives_the_reference_embeddings():
    sd = open_clip_state()
    imp = import_open_clip(sd, config={"vision_cfg": {"width": 64, "head_width": 16}, "text_cfg": {"heads": 6}})
    m = imp.cfg.model
    assert (m.vision.image_size, m.vision.patch_size, m.vision.heads, m.text.heads, m.text.context_length, m.embed_dim) == (32, 8, 4, 6, 24, 40)
    tok_json = openai_style_tokenizer()
    ids = openai_style_ids(tok_json, TEXTS)
    imgs = images()
    with torch.no_grad():
        ref_img, ref_txt = reference_forward(sd, imgs, ids, 4, 6)
        torch.testing.assert_close(imp.module.model.encode_image(imgs), ref_img, atol=1e-4, rtol=0)
        torch.testing.assert_close(imp.module.model.encode_text(ids), ref_txt, atol=1e-4, rtol=0)
    assert imp.module.objectives["contrastive"].log_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert imp.tokenizer is None

    # CustomTextCLIP keeps the text tower under `text.`; a logit_bias makes it a SigLIP model
    custom = {(k if k.startswith(("visual.", "logit_")) else f"text.{k}"): v for k, v in sd.items()}
    imp = import_open_clip({**custom, "logit_bias": torch.tensor(-7.0)}, vision_heads=4, text_heads=6)
    with torch.no_grad():
        torch.testing.assert_close(imp.module.model.encode_text(ids), ref_txt, atol=1e-4, rtol=0)
    assert list(imp.cfg.objectives) == ["sigmoid"] and imp.module.objectives["sigmoid"].bias.item() == -7.0


def test_open_clip_mismatches_are_named():
    sd = open_clip_state()
    with pytest.raises(MappingError, match=r"visual\.transformer\.resblocks\.0\.ls_1\.gamma"):
        import_open_clip({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(64)}, vision_heads=4, text_heads=6)
    with pytest.raises(MappingError, match="ln_final.bias"):
        import_open_clip({k: v for k, v in sd.items() if k != "ln_final.bias"}, vision_heads=4, text_heads=6)
    with pytest.raises(MappingError, match="quick_gelu"):
        import_open_clip(sd, config={"quick_gelu": True})
    with pytest.raises(MappingError, match="text_cfg.pool_type=last"):
        import_open_clip(sd, config={"text_cfg": {"pool_type": "last"}})
    with pytest.raises(MappingError, match=r"\[CLS\] \(embed_cls\) and no caption decoder"):
        import_open_clip({**sd, "cls_emb": torch.ones(48)})
    with pytest.raises(MappingError, match="missing from the state dict: text.token_embedding"):  # a decoder: CoCa
        import_open_clip({**sd, "text_decoder.ln_final.weight": torch.ones(48)})
    with pytest.raises(MappingError, match="not open_clip's ViT"):
        import_open_clip({k.replace("visual.conv1", "visual.trunk.patch_embed"): v for k, v in sd.items()})


def test_open_clip_import_cli_makes_a_run_that_evaluates(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file(open_clip_state(), tmp_path / "oc.safetensors")
    tok_json = openai_style_tokenizer()
    (tmp_path / "tokenizer.json").write_text(tok_json)
    (tmp_path / "cfg.json").write_text(json.dumps({"embed_dim": 40, "vision_cfg": {"width": 64, "head_width": 16},
                                                   "text_cfg": {"heads": 6}}))
    out = tmp_path / "run"
    assert cli_main(["import-weights", str(tmp_path / "oc.safetensors"), str(out), "--from", "open_clip",
                     "--config", str(tmp_path / "cfg.json"), "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    enc = inference.load(out)
    direct = import_open_clip(tmp_path / "oc.safetensors", config=str(tmp_path / "cfg.json"))
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_texts(TEXTS), direct.module.model.encode_text(openai_style_ids(tok_json, TEXTS)),
                                   atol=1e-5, rtol=0)
    capsys.readouterr()
    assert cli_main(["eval", str(out), "--task", "zeroshot:scenes:shape", "--json"]) == 0
    assert "zeroshot:scenes:shape/top1" in json.loads(capsys.readouterr().out)
    assert cli_main(["import-weights", str(tmp_path / "oc.safetensors"), str(tmp_path / "notok"), "--from", "open_clip"]) == 2
    assert "tokenizer" in capsys.readouterr().err


@needs_peer
def test_open_clip_weights_give_open_clip_embeddings(tmp_path):
    """Against open_clip's own model and forward, run in its venv."""
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import save_file
        from open_clip.model import CLIP
        torch.manual_seed(0)
        V = 300
        m = CLIP(embed_dim=48, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                 text_cfg=dict(context_length=24, vocab_size=V, width=64, heads=2, layers=2)).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        img = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
        mean = torch.tensor({MEAN.flatten().tolist()}).view(1, 3, 1, 1)
        std = torch.tensor({STD.flatten().tolist()}).view(1, 3, 1, 1)
        text = torch.zeros(3, 24, dtype=torch.long)
        for i, n in enumerate((3, 10, 22)):
            text[i, 0], text[i, n + 1] = V - 2, V - 1
            text[i, 1:n + 1] = torch.randint(5, V - 2, (n,))
        with torch.no_grad():
            ie = m.encode_image((img.float() / 255 - mean) / std, normalize=True)
            te = m.encode_text(text, normalize=True)
        sd = {{"module." + k: v for k, v in m.state_dict().items()}}  # as open_clip's DDP training saves it
        torch.save({{"epoch": 1, "name": "micro", "state_dict": sd}}, "{tmp_path}/open_clip.pt")
        save_file({{"images": img, "text": text, "image_embed": ie, "text_embed": te}}, "{tmp_path}/ref.safetensors")
    """)
    done = subprocess.run([str(PEER), "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = load_file(tmp_path / "ref.safetensors")
    imp = import_open_clip(tmp_path / "open_clip.pt", config={"vision_cfg": {"width": 64, "head_width": 32}, "text_cfg": {"heads": 2}})
    with torch.no_grad():
        torch.testing.assert_close(imp.module.model.encode_image(ref["images"]), ref["image_embed"], atol=1e-4, rtol=0)
        torch.testing.assert_close(imp.module.model.encode_text(ref["text"]), ref["text_embed"], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ open_clip CoCa
COCA_CONFIG = {"vision_cfg": {"width": 64, "head_width": 16, "attn_pooler_heads": 4}, "text_cfg": {"heads": 4}}


def open_clip_coca_state(v_width=64, grid=4, width=48, ctx=12, vocab=282, queries=5, depth=2):
    """A CoCa state dict with open_clip's names (coca_model.py; transformer.py: VisionTransformer with
    attentional_pool=True, TextTransformer with embed_cls=True, MultimodalTransformer); embed_dim = width."""
    pool = "visual.attn_pool."
    shapes = {"visual.conv1.weight": (v_width, 3, 8, 8), "visual.class_embedding": (v_width,),
              "visual.positional_embedding": (grid * grid + 1, v_width), "visual.proj": (width, width),
              pool + "query": (queries, width), pool + "attn.q_proj_weight": (width, width),
              pool + "attn.k_proj_weight": (width, v_width), pool + "attn.v_proj_weight": (width, v_width),
              pool + "attn.in_proj_bias": (3 * width,), pool + "attn.out_proj.weight": (width, width),
              pool + "attn.out_proj.bias": (width,), "text.token_embedding.weight": (vocab, width),
              "text.positional_embedding": (ctx + 1, width), "text.cls_emb": (width,),
              "text.text_projection": (width, width), "text_decoder.text_projection": (width, vocab), "logit_scale": ()}
    for ln, w in (("visual.ln_pre", v_width), ("visual.ln_post", width), (pool + "ln_q", width), (pool + "ln_k", v_width),
                  ("text.ln_final", width), ("text_decoder.ln_final", width)):
        shapes |= {f"{ln}.weight": (w,), f"{ln}.bias": (w,)}
    for i in range(depth):
        shapes |= resblock_shapes(f"visual.transformer.resblocks.{i}.", v_width)
        shapes |= resblock_shapes(f"text.transformer.resblocks.{i}.", width)
        shapes |= resblock_shapes(f"text_decoder.resblocks.{i}.", width)
        cross = f"text_decoder.cross_attn.{i}."
        shapes |= resblock_shapes(cross, width) | {cross + "ln_1_kv.weight": (width,), cross + "ln_1_kv.bias": (width,)}
    return random_state(shapes)


def test_open_clip_coca_state_dict_maps_every_tensor():
    sd = open_clip_coca_state()
    imp = import_open_clip(sd, config=COCA_CONFIG)
    m = imp.cfg.model
    assert (m.decoder.style, m.poolers.style, m.poolers.contrastive, m.poolers.generative_queries, m.poolers.heads) == \
        ("open_clip", "open_clip", "first", 5, 4)
    assert (m.text.context_length, m.decoder.unimodal_depth, m.decoder.depth, m.vision.heads, m.embed_dim) == (12, 2, 2, 4, 48)
    assert list(imp.cfg.objectives) == ["contrastive", "captioning"]
    # where open_clip fuses what vlpt keeps apart, and x @ P (transposed)
    state, x, pool = imp.module.state_dict(), "text_decoder.cross_attn.1.", "visual.attn_pool.attn."
    pairs = [("model.decoder.multimodal.1.cross.q.weight", sd[x + "attn.in_proj_weight"][:48]),
             ("model.decoder.multimodal.1.cross.kv.bias", sd[x + "attn.in_proj_bias"][48:]),
             ("model.decoder.multimodal.1.cross.ln_kv.weight", sd[x + "ln_1_kv.weight"]),
             ("model.decoder.multimodal.1.mlp.fc2.weight", sd[x + "mlp.c_proj.weight"]),
             ("model.decoder.multimodal.1.sa_mlp.fc1.weight", sd["text_decoder.resblocks.1.mlp.c_fc.weight"]),
             ("model.gen_pool.kv.weight", torch.cat([sd[pool + "k_proj_weight"], sd[pool + "v_proj_weight"]])),
             ("model.gen_pool.q.bias", sd[pool + "in_proj_bias"][:48]), ("model.ln_pool.bias", sd["visual.ln_post.bias"]),
             ("model.decoder.head.weight", sd["text_decoder.text_projection"].T),
             ("model.decoder.ln_cls.weight", sd["text.ln_final.weight"])]
    for name, want in pairs:
        assert torch.equal(state[name], want), name
    assert torch.equal(state["model.decoder.head.bias"], torch.zeros(282))  # open_clip's output layer has none
    # every tensor has its place: one more, or one less, is named
    with pytest.raises(MappingError, match=r"1 source tensor.*text_decoder\.cross_attn\.0\.ls_2\.gamma"):
        import_open_clip({**sd, "text_decoder.cross_attn.0.ls_2.gamma": torch.ones(48)}, config=COCA_CONFIG)
    with pytest.raises(MappingError, match=r"missing.*text_decoder\.cross_attn\.1\.ln_1_kv\.bias"):
        import_open_clip({k: v for k, v in sd.items() if k != x + "ln_1_kv.bias"}, config=COCA_CONFIG)
    with pytest.raises(MappingError, match="attentional_pool=False"):  # CoCa needs its pooler
        import_open_clip(sd, config={"vision_cfg": {"attentional_pool": False}})
    with pytest.raises(MappingError, match="parallel/cascade"):
        import_open_clip({**sd, "visual.attn_pool_contrastive.query": torch.ones(1, 48)}, config=COCA_CONFIG)


def test_open_clip_coca_with_a_tokenizer_pads_as_open_clip(tmp_path):
    """vlpt's <pad> (a new id) must act as open_clip's pad id 0, which CoCa's [CLS] reads; vlpt's added ids
    are never predicted; and the CLI writes a run that captions."""
    from safetensors.torch import save_file

    sd = open_clip_coca_state()
    tok_json = openai_style_tokenizer()
    (tmp_path / "tokenizer.json").write_text(tok_json)
    plain = import_open_clip(sd, config=COCA_CONFIG)  # ids as open_clip's tokenizer pads them: with 0
    imp = import_open_clip(sd, config=COCA_CONFIG, tokenizer=tmp_path / "tokenizer.json")
    ids, mine = openai_style_ids(tok_json, TEXTS, 12), imp.tokenizer(TEXTS)
    assert imp.tokenizer.pad_id >= 282 and torch.equal(mine == imp.tokenizer.pad_id, ids == 0) and (ids == 0).any()
    batch = {"image": images(3), "text": mine}
    with torch.no_grad():
        got = imp.module.model(batch, imp.module.needs | {"caption_logits"})
        want = plain.module.model({"image": batch["image"], "text": ids}, plain.module.needs | {"caption_logits"})
    torch.testing.assert_close(got["text_embed"], want["text_embed"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["caption_logits"].log_softmax(-1)[..., :282], want["caption_logits"].log_softmax(-1),
                               atol=1e-5, rtol=0)

    save_file(sd, tmp_path / "coca.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps(COCA_CONFIG))
    assert cli_main(["import-weights", str(tmp_path / "coca.safetensors"), str(tmp_path / "run"), "--from", "open_clip",
                     "--config", str(tmp_path / "cfg.json"), "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    model = inference.load(tmp_path / "run")
    torch.testing.assert_close(model.encode_texts(TEXTS), got["text_embed"], atol=1e-6, rtol=0)
    assert len(model.caption(images(2), max_tokens=4)) == 2


@needs_peer
def test_open_clip_coca_gives_open_clip_embeddings_and_caption_logits(tmp_path):
    """Against open_clip's own CoCa forward, run in its venv: image tokens wider than (fused q/k/v: as wide
    as) the pooler; texts with padding and one filling the context (its [CLS] then sees itself)."""
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import save_file
        from open_clip.coca_model import CoCa
        V, L = 300, 12
        img = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
        mean = torch.tensor({MEAN.flatten().tolist()}).view(1, 3, 1, 1)
        std = torch.tensor({STD.flatten().tolist()}).view(1, 3, 1, 1)
        text = torch.zeros(3, L, dtype=torch.long)
        for i, n in enumerate((3, 7, L - 2)):
            text[i, 0], text[i, n + 1] = V - 2, V - 1
            text[i, 1:n + 1] = torch.randint(5, V - 2, (n,))
        out = {{"images": img, "text": text}}
        for v_width in (64, 48):
            torch.manual_seed(v_width)
            m = CoCa(embed_dim=48, multimodal_cfg=dict(context_length=L, vocab_size=V, width=48, heads=4, layers=2),
                     text_cfg=dict(context_length=L, vocab_size=V, width=48, heads=4, layers=2, embed_cls=True,
                                   output_tokens=True),
                     vision_cfg=dict(image_size=32, patch_size=8, width=v_width, layers=2, head_width=16,
                                     attentional_pool=True, attn_pooler_heads=4, attn_pooler_queries=5,
                                     output_tokens=True)).eval()
            with torch.no_grad():
                m.text_decoder.text_projection.normal_(std=0.2)  # open_clip leaves it torch.empty
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
                o = m((img.float() / 255 - mean) / std, text)
            for k in ("image_features", "text_features", "logits"):
                out[f"{{k}}_{{v_width}}"] = o[k]
            torch.save(m.state_dict(), f"{tmp_path}/coca_{{v_width}}.pt")
        save_file(out, "{tmp_path}/ref.safetensors")
    """)
    done = subprocess.run([str(PEER), "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = load_file(tmp_path / "ref.safetensors")
    assert (ref["text"] == 0).any() and not (ref["text"][2] == 0).any()
    for v_width in (64, 48):
        config = {"vision_cfg": {"width": v_width, "head_width": 16, "attn_pooler_heads": 4}, "text_cfg": {"heads": 4}}
        imp = import_open_clip(tmp_path / f"coca_{v_width}.pt", config=config)
        model = imp.module.model
        with torch.no_grad():
            out = model({"image": ref["images"], "text": ref["text"]}, imp.module.needs | {"caption_logits"})
            torch.testing.assert_close(model.encode_image(ref["images"]), ref[f"image_features_{v_width}"], atol=1e-4, rtol=0)
            torch.testing.assert_close(model.encode_text(ref["text"]), ref[f"text_features_{v_width}"], atol=1e-4, rtol=0)
        torch.testing.assert_close(out["image_embed"], ref[f"image_features_{v_width}"], atol=1e-4, rtol=0)
        torch.testing.assert_close(out["text_embed"], ref[f"text_features_{v_width}"], atol=1e-4, rtol=0)
        torch.testing.assert_close(out["caption_logits"], ref[f"logits_{v_width}"], atol=1e-4, rtol=0)
