"""Char and GPT-2 BPE tokenizers, their JSON round trip, and the UTF-8-safe streaming decoder."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from minillm.tokenizer import GPT2_PAT, BPETokenizer, CharTokenizer, IncrementalDecoder, tokenizer_from_dict


@pytest.fixture(scope="module")
def gpt2(data_dir):
    return BPETokenizer.gpt2(str(data_dir / "gpt2" / "gpt2.tiktoken"))


def test_char_roundtrip_and_vocab(shakespeare_text):
    tok = CharTokenizer.from_text(shakespeare_text)
    assert tok.vocab_size == 65
    ids = tok.encode(shakespeare_text[:5000])
    assert tok.decode(ids) == shakespeare_text[:5000]


def test_char_unknown_characters_listed(shakespeare_text):
    tok = CharTokenizer.from_text(shakespeare_text)
    with pytest.raises(ValueError, match=r"not in this model's vocabulary.*'é', '€'$"):
        tok.encode("café €é")


@pytest.mark.parametrize("text, ids", [("Hello world", [15496, 995]), (", ", [11, 220]),
                                       ("Hello, world!", [15496, 11, 995, 0]), (" the", [262]),
                                       ("<|endoftext|>", [50256])])
def test_gpt2_ids(gpt2, text, ids):
    assert gpt2.encode(text) == ids and gpt2.decode(ids) == text


def test_gpt2_special_as_text(gpt2):
    assert 50256 not in gpt2.encode("<|endoftext|>", allow_special=False)
    assert gpt2.eos_ids == {50256} and gpt2.vocab_size == 50257


def test_gpt2_whole_shakespeare(gpt2, shakespeare_text):
    assert len(gpt2.encode(shakespeare_text)) == 338_025


@pytest.mark.parametrize("make", ["char", "gpt2"])
def test_json_roundtrip(make, gpt2, shakespeare_text):
    tok = CharTokenizer.from_text(shakespeare_text) if make == "char" else gpt2
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    sample = shakespeare_text[:3000]
    assert again.encode(sample) == tok.encode(sample) and again.decode(tok.encode(sample)) == sample
    assert again.vocab_size == tok.vocab_size


def test_non_contiguous_ranks_roundtrip():
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 300}
    tok = BPETokenizer("t", GPT2_PAT, ranks, {"<s>": 400}, bos_token="<s>", add_bos=True)
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.encode("abc") == tok.encode("abc") == [400, 300, ord("c")]
    assert again.vocab_size == 401


def test_pre_split_digits(gpt2):
    tok = BPETokenizer("digits", GPT2_PAT, gpt2.ranks, gpt2.special_tokens, pre_split_digits=True)
    pieces = [tok.decode([i]) for i in tok.encode(" 12345 x9")]
    assert pieces == [" ", "1", "2", "3", "4", "5", " x", "9"]


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'"):
        tokenizer_from_dict({"kind": "sentencepiece"})


def stream(tok, ids):
    dec = IncrementalDecoder(tok)
    pieces = [dec.feed(i) for i in ids]
    return pieces + [dec.flush()]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)
       | st.text(alphabet="aé日本🤖👍🏽\u0301 \n", max_size=30))
def test_streamed_pieces_join_to_full_decode(gpt2, text):
    ids = gpt2.encode(text, allow_special=False)
    pieces = stream(gpt2, ids)
    assert "".join(pieces) == gpt2.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="abc日本🤖\n", max_size=40))
def test_streamed_char_pieces(text):
    tok = CharTokenizer("abc日本🤖\n")
    assert "".join(stream(tok, tok.encode(text))) == text


def test_partial_character_is_held_back(gpt2):
    ids = gpt2.encode("🤖")
    assert len(ids) > 1
    dec = IncrementalDecoder(gpt2)
    assert [dec.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.feed(ids[-1]) == "🤖"
