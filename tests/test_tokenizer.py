import torch

from vlpt.data.tokenizer import TextTokenizer

CAPTIONS = ["a red circle to the left of a blue square", "a small green triangle", "two dogs run on the beach"] * 20


def test_layout_sot_tokens_eot_pad():
    tok = TextTokenizer.train(CAPTIONS, vocab_size=300, context_length=16)
    ids = tok(["a red circle", "a small green triangle"])
    assert ids.shape == (2, 16) and ids.dtype == torch.int64
    for row in ids.tolist():
        assert row[0] == tok.sot_id
        e = row.index(tok.eot_id)
        assert all(t == tok.pad_id for t in row[e + 1 :])
    assert tok.decode(ids[0]) == "a red circle"


def test_overlong_text_keeps_eot():
    tok = TextTokenizer.train(CAPTIONS, vocab_size=300, context_length=8)
    ids = tok(" ".join(CAPTIONS[:5]))
    assert ids[0, -1].item() == tok.eot_id


def test_round_trip_through_json_and_lowercase():
    tok = TextTokenizer.train(CAPTIONS, vocab_size=300, context_length=16)
    again = TextTokenizer.from_str(tok.to_str(), 16)
    assert torch.equal(tok(CAPTIONS[:3]), again(CAPTIONS[:3]))
    assert torch.equal(tok(["A Red Circle"]), tok(["a red circle"]))


def test_foreign_tokenizer_json_gets_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    foreign = Tokenizer(models.WordLevel({"a": 0, "cat": 1, "[UNK]": 2}, unk_token="[UNK]"))
    foreign.pre_tokenizer = pre_tokenizers.Whitespace()
    foreign.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.from_file(tmp_path / "tokenizer.json", 8)
    ids = tok(["a cat"])[0].tolist()
    assert ids[:4] == [tok.sot_id, 0, 1, tok.eot_id]
