"""CLIP's Figure 2 baselines: bag-of-words prediction (target, loss, zero-shot head) and bag-of-words
contrastive (the order-free text tower), and both recipes learning colour on scenes."""
import math
import types

import pytest
import torch
import torch.nn.functional as F

from vlpt import config
from vlpt.data.tokenizer import Vocab
from vlpt.models.model import ImageTextModel
from vlpt.models.text import TextBag
from vlpt.objectives.bow import BowPrediction, bag_of_words
from vlpt.typed import ConfigError

PAD, SOT, EOT, MASK = 0, 1, 2, 3
VOCAB = Vocab(10, PAD, SOT, EOT, MASK)


def test_target_is_the_normalised_set_of_the_captions_words():
    text = torch.tensor([[SOT, 5, 6, 5, EOT, PAD, PAD],
                         [SOT, 7, 7, 7, EOT, PAD, PAD],
                         [SOT, 4, 5, 6, 8, EOT, PAD],
                         [SOT, EOT, PAD, PAD, PAD, PAD, PAD]])
    expected = torch.zeros(4, 10)
    expected[0, [5, 6]] = 0.5  # 5 twice, counted once
    expected[1, 7] = 1.0
    expected[2, [4, 5, 6, 8]] = 0.25
    target = bag_of_words(text, VOCAB)
    assert torch.equal(target, expected)
    assert torch.equal(target[:3].sum(1), torch.ones(3))  # a distribution per caption with words
    assert not target[:, [PAD, SOT, EOT]].any()


def test_loss_is_the_cross_entropy_against_the_bag_averaged_over_captions_with_words():
    cfg = config.resolve("bow-prediction", ["model=micro"])
    objective = BowPrediction({}, cfg.model, VOCAB)
    width = cfg.model.vision.width
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        objective.head.weight.copy_(torch.randn(10, width, generator=g))
        objective.head.bias.copy_(torch.randn(10, generator=g))
    feats = torch.randn(3, width, generator=g) / width**0.5
    text = torch.tensor([[SOT, 5, 6, 5, EOT, PAD], [SOT, 9, EOT, PAD, PAD, PAD], [SOT, EOT, PAD, PAD, PAD, PAD]])
    loss, metrics = objective({"image_pooled": feats}, {"text": text})

    def nll(row, words):  # -(1/n) sum over the n distinct words of log softmax, by hand
        logits = [sum(objective.head.weight[v, k].item() * feats[row, k].item() for k in range(width))
                  + objective.head.bias[v].item() for v in range(10)]
        log_z = math.log(sum(math.exp(x) for x in logits))
        return -sum(logits[w] - log_z for w in words) / len(words)

    # the caption without words (row 2) adds nothing and is not counted
    assert loss.item() == pytest.approx((nll(0, [5, 6]) + nll(1, [9])) / 2, rel=1e-5)
    assert 0 <= metrics["top1_in_caption"].item() <= 1
    loss.backward()
    assert objective.head.weight.grad.abs().sum() > 0


def bag_model(context=8, seed=0):
    torch.manual_seed(seed)
    cfg = config.resolve("bow-contrastive", ["model=micro", f"model.text.context_length={context}"])
    return ImageTextModel(cfg.model, VOCAB, frozenset({"image_embed", "text_embed"})).eval()


def test_bag_text_tower_is_order_free_and_ignores_padding():
    model = bag_model()
    assert isinstance(model.text, TextBag) and not any("pos" in n for n, _ in model.text.named_parameters())
    with torch.no_grad():
        model.text.token_embed.weight[PAD] = 100.0  # padding that leaked into the mean would dominate it
    caption = torch.tensor([[SOT, 5, 6, 7, 7, EOT, PAD, PAD]])
    shuffled = torch.tensor([[SOT, 7, 5, 7, 6, EOT, PAD, PAD]])
    longer = torch.tensor([[SOT, 5, 6, 7, 7, EOT, PAD, PAD, PAD, PAD, PAD, PAD]])  # same words, more padding
    other = torch.tensor([[SOT, 5, 6, 8, 7, EOT, PAD, PAD]])
    emb = model.encode_text(caption)
    torch.testing.assert_close(model.encode_text(shuffled), emb)
    torch.testing.assert_close(model.encode_text(longer), emb)
    assert (model.encode_text(other) - emb).abs().max() > 1e-3  # the words do matter
    # by hand: mean of the five token embeddings -> LayerNorm -> projection -> unit norm
    ln, e = model.text.ln_final, model.text.token_embed.weight
    mean = e[[SOT, 5, 6, 7, 7, EOT]].mean(0)
    hand = F.normalize(model.text_proj(F.layer_norm(mean, mean.shape, ln.weight, ln.bias)), dim=-1)
    torch.testing.assert_close(emb[0], hand)


def test_bag_text_tower_config_errors():
    with pytest.raises(ConfigError, match="model.text.kind='bags': choose transformer, bag or minilm"):
        config.resolve("clip", ["model.text.kind=bags"])
    with pytest.raises(ConfigError, match="model.text.kind=bag shapes the text tower, which this recipe does not"):
        config.resolve("cap", ["model.text.kind=bag"])
    from vlpt.interop.common import MappingError
    from vlpt.interop.hf import check_exportable

    checkpointed = config.resolve("bow-contrastive", ["model=micro", "model.grad_checkpointing=true"])
    ImageTextModel(checkpointed.model, VOCAB, frozenset({"text_embed"}))  # a tower without blocks to checkpoint
    cfg = config.resolve("bow-contrastive", ["model.vision.stem=patch"])
    with pytest.raises(MappingError, match="model.text.kind=bag does not map"):
        check_exportable(cfg, bag_model())


class HandSetHead:
    """The evaluation contract of a BoW-prediction model with a hand-set head: image i (its first pixel holds
    i) gets the vocabulary log-probabilities `logp[i]`; class names are looked up in `ids`."""

    image_size = 4
    abilities = frozenset({"image_features", "bow_logits"})

    def __init__(self, logp, ids):
        self.logp, self.ids = logp, ids

    def ability(self, name, images):
        assert name == "bow_logits"
        return self.logp[images[:, 0, 0, 0].long()] + 3.0  # logits: a shift leaves the softmax as it is

    def token_ids(self, texts):
        return [self.ids[t] for t in texts]


def test_zero_shot_picks_the_class_whose_name_tokens_are_likeliest(monkeypatch):
    from vlpt.eval import bow
    from vlpt.eval.registry import EvalOptions

    ids = {"red circle": [5, 6], "red square": [5, 7], "blue": [8]}  # words: red 5, circle 6, square 7, blue 8
    p = {0: [.30, .10, .02, .08],  # red circle: mean log p -1.75 vs -2.56 and -2.53 (a SUM would pick blue)
         1: [.30, .02, .10, .08],  # red square
         2: [.05, .05, .05, .40],  # blue
         3: [.45, .01, .02, .10]}  # "red" is the likeliest word, yet blue wins: -2.30 vs -2.36 and -2.70
    probs = torch.full((4, 12), 1e-9)
    for i, row in p.items():
        probs[i, [5, 6, 7, 8]] = torch.tensor(row)
        probs[i, 11] = 1 - probs[i].sum() + probs[i, 11]
    model = HandSetHead(probs.log(), ids)
    images = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(4, dtype=torch.uint8)

    means = bow.name_means(model.token_ids(list(ids)), list(ids))
    scores = bow.bow_scores(model.ability("bow_logits", images), means)
    hand = [[(math.log(r[0]) + math.log(r[1])) / 2, (math.log(r[0]) + math.log(r[2])) / 2, math.log(r[3])]
            for r in p.values()]
    torch.testing.assert_close(scores, torch.tensor(hand), atol=1e-5, rtol=0)
    assert scores.argmax(1).tolist() == [0, 1, 2, 2]
    assert torch.equal(bow.name_means([[8, 8], [8]], ["blue blue", "blue"])[0], means[2, :9])  # a word once

    ds = types.SimpleNamespace(name="hand", labels=[0, 1, 2, 1], classnames=list(ids))
    monkeypatch.setattr(bow, "load_decoded", lambda data, size, options: (images, ds))
    assert bow.ZeroShotBow()(model, "hand", EvalOptions(batch_size=3)) == {"top1": 75.0}  # image 3 is not blue
    with pytest.raises(ValueError, match="class name 'blue' has no tokens"):
        bow.name_means([[5, 6], []], ["red circle", "blue"])


MICRO = ["model=micro", "train.batch_size=32", "train.warmup_steps=5", "train.log_every=10", "train.lr=2e-3",
         "train.steps=100"]


@pytest.mark.parametrize("recipe,task", [("bow-prediction", "zeroshot_bow:scenes:colour"),
                                         ("bow-contrastive", "zeroshot:scenes:colour")])
def test_baselines_learn_colour_in_100_steps(tmp_path, capsys, recipe, task):
    import json

    from vlpt.cli import main as cli_main
    from vlpt.inference import load
    from vlpt.train.loop import train
    from vlpt.train.pretrainer import abilities

    cfg = config.resolve(recipe, MICRO + [f"eval.tasks=[{task}]"])
    top1 = train(cfg, tmp_path, progress=False)[f"{task}/top1"]  # the run's own final evaluation
    assert top1 > 30.0, top1  # chance: 12.5% (8 colours); seeds 0-2 gave 61-81% (prediction), ~94% (contrastive)
    assert load(tmp_path).abilities == abilities(cfg)  # what the run's tasks were checked against before training
    capsys.readouterr()
    assert cli_main(["eval", str(tmp_path), "--task", task, "--json"]) == 0  # the saved head, reloaded
    assert json.loads(capsys.readouterr().out)[f"{task}/top1"] == pytest.approx(top1)


def test_auto_suite_and_errors_of_a_bow_prediction_model():
    from vlpt.eval.defaults import SCENES_SUITE, resolve_tasks
    from vlpt.eval.registry import TaskError, check_task
    from vlpt.train.pretrainer import abilities

    bow = abilities(config.resolve("bow-prediction"))
    assert bow == {"image_tokens", "image_features", "bow_logits"}  # no text tower, no embeddings
    assert resolve_tasks(["auto"], "scenes", bow) == [t.replace("zeroshot:", "zeroshot_bow:")
                                                      for t in SCENES_SUITE if t.startswith("zeroshot:")]
    assert resolve_tasks(["auto"], "cifar10:train", bow) == ["zeroshot_bow:cifar10:test"]
    assert resolve_tasks(["auto"], "flickr8k:train", bow) == []
    assert resolve_tasks(["auto"], "scenes", abilities(config.resolve("bow-contrastive"))) == SCENES_SUITE
    with pytest.raises(TaskError, match="needs a bag-of-words head"):
        check_task("zeroshot_bow:scenes:colour", abilities(config.resolve("clip")))
    with pytest.raises(TaskError, match="needs a text embedding"):
        check_task("zeroshot:scenes:colour", bow)


@pytest.mark.parametrize("suffix", ["", "-flickr8k"])
def test_baseline_recipes_differ_from_clip_only_in_their_method(suffix):
    clip, pred, con = (config.to_dict(config.resolve(r + suffix)) for r in ("clip", "bow-prediction", "bow-contrastive"))
    for d in (clip, pred, con):
        d.pop("recipe")
    assert pred.pop("objectives") == {"bow_prediction": {"weight": 1.0}} and clip.pop("objectives") == con.pop("objectives")
    if suffix:  # Flickr8k has no classes: BoW prediction's zero-shot is on CIFAR-10
        assert pred.pop("eval")["tasks"] == ["zeroshot_bow:cifar10:test"] and clip.pop("eval") == con.pop("eval")
    assert pred == clip
    assert con["model"]["text"].pop("kind") == "bag" and clip["model"]["text"].pop("kind") == "transformer"
    assert con == clip
