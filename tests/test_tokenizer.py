"""Char and GPT-2 BPE tokenizers, their JSON round trip, and the UTF-8-safe streaming decoder."""

import json

import pytest
import tiktoken
from hypothesis import given, settings, strategies as st

from minillm.tokenizer import (BYTE_ENCODER, GPT2_PAT, BPETokenizer, CharTokenizer, IncrementalDecoder, bytes_to_token,
                               merges_from_ranks, token_to_bytes, tokenizer_from_dict)


@pytest.fixture(scope="module")
def gpt2(data_dir):
    return BPETokenizer.gpt2(str(data_dir / "gpt2" / "gpt2.tiktoken"))


def test_char_roundtrip_and_vocab(shakespeare_text):
    tok = CharTokenizer.from_text(shakespeare_text)
    assert tok.vocab_size == 65 and tok.encode("\n !") == [0, 1, 2]  # sorted: id = index
    ids = tok.encode(shakespeare_text)
    assert len(ids) == len(shakespeare_text) and tok.decode(ids) == shakespeare_text
    assert tok.eos_ids == set() and isinstance(tok.eos_ids, set) and tok.eos_id is None and tok.bos_id is None
    assert tok.token_bytes(tok.encode("a")[0]) == b"a"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])


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
    ids = gpt2.encode("a<|endoftext|>", allow_special=False)
    assert 50256 not in ids and gpt2.decode(ids) == "a<|endoftext|>"
    assert gpt2.eos_ids == {50256} and isinstance(gpt2.eos_ids, set) and gpt2.eos_id == 50256 and gpt2.bos_id is None
    assert gpt2.vocab_size == 50257 and gpt2.token_bytes(50256) == b"<|endoftext|>"


def test_gpt2_file_lookup(monkeypatch, tmp_path, data_dir):
    monkeypatch.setenv("MINILLM_DATA_DIR", str(data_dir))
    assert BPETokenizer.gpt2().encode("Hello world") == [15496, 995]
    with pytest.raises(FileNotFoundError, match="r50k_base"):
        BPETokenizer.gpt2(str(tmp_path / "missing.tiktoken"))
    monkeypatch.setenv("MINILLM_DATA_DIR", str(tmp_path))  # no file there: falls back to tiktoken's download

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match=r"no network.*r50k_base.*MINILLM_DATA_DIR/gpt2/gpt2\.tiktoken"):
        BPETokenizer.gpt2()


def test_gpt2_whole_shakespeare(gpt2, shakespeare_text):
    assert len(gpt2.encode(shakespeare_text)) == 338_025


@pytest.mark.parametrize("make", ["char", "gpt2"])
def test_json_roundtrip(make, gpt2, shakespeare_text):
    tok = CharTokenizer.from_text(shakespeare_text) if make == "char" else gpt2
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    sample = shakespeare_text[:3000]
    assert again.encode(sample) == tok.encode(sample) and again.decode(tok.encode(sample)) == sample
    assert again.vocab_size == tok.vocab_size


def test_duplicate_ids_rejected():
    ranks = {bytes([b]): b for b in range(256)}
    with pytest.raises(ValueError, match=r"more than one token: \[7\]"):
        BPETokenizer("t", GPT2_PAT, ranks, {"<s>": 7})


def test_non_contiguous_ranks_roundtrip():
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 300}
    tok = BPETokenizer("t", GPT2_PAT, ranks, {"<s>": 400}, bos_token="<s>", add_bos=True)
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.encode("abc") == tok.encode("abc") == [400, 300, ord("c")]
    assert again.vocab_size == 401


def test_ascii_bytes_missing_from_vocab_are_dropped():
    ranks = {bytes([b]): i for i, b in enumerate(b for b in range(256) if b not in (0x04, 0x13))}
    tok = BPETokenizer("gappy", GPT2_PAT, ranks, {})
    assert tok.decode(tok.encode("a\x04b\x13c")) == "abc"  # tiktoken alone panics on these bytes


def test_bytes_missing_from_vocab_are_dropped_after_the_split(gpt2_ranks_512):
    """As Hugging Face (and llama.cpp) do: the regex splits the text first, then each piece loses the
    bytes that have no token, then BPE merges the rest. "a\\x04b" is three pieces, so "a", "b" (not the
    token "ab", which deleting \\x04 first gave); "-\\x04-" is one piece, so "--" merges. A lead byte
    without a token (SmolLM2 lacks 0xF1, 0xF2) leaves its continuation bytes, and no panic."""
    ranks = {b: r for b, r in gpt2_ranks_512.items() if b not in (b"\x04", b"\xf1")}
    tok = BPETokenizer("gappy", GPT2_PAT, ranks, {"<|x|>": 600})
    r = gpt2_ranks_512
    assert b"ab" in r and tok.encode("a\x04b") == [r[b"a"], r[b"b"]]
    assert tok.encode("-\x04-") == [r[b"--"]]
    assert tok.encode("x\U00040000y") == [r[b"x"], r[b"\x80"], r[b"\x80"], r[b"\x80"], r[b"y"]]
    assert tok.encode("\x04<|x|>\x04", allow_special=True) == [600]
    assert tok.encode("\ud800\x04") == tok.encode("\ufffd")  # a lone surrogate: U+FFFD, as tiktoken does


# ----------------------------------------------------------------------------- against Hugging Face, any text
# The reference is Hugging Face's `tokenizers` (what transformers runs): SmolLM2 from the GGUF as transformers
# loads it, with the Digits step its own tokenizer.json has (transformers' GGUF loader leaves it out, see
# test_convert_gguf._hf_digit_tokenizer); GPT-2 from vocab and merges derived from gpt2.tiktoken's ranks.

SMOLLM2_GAPS = ["\x04", "\x06", "\x13", "\x14", "\x16", "\x1d", "\U00040000", "\U0007ffff", "\U00080000",
                "\U000bffff", "!", "-", " ", "  ", "a", "ab", "7", "\n", "é", "<|im_start|>", "<|endoftext|>"]
ANY_TEXT = st.text() | st.lists(st.text(max_size=4) | st.sampled_from(SMOLLM2_GAPS), max_size=12).map("".join)


@pytest.fixture(scope="session")
def smollm2_pair(smollm2_ours, smollm2_hf_tokenizer):
    from tokenizers import Tokenizer, pre_tokenizers
    hf = Tokenizer.from_str(smollm2_hf_tokenizer.backend_tokenizer.to_str())  # a copy: the fixture stays as it is
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return smollm2_ours.tokenizer, hf


@pytest.fixture(scope="session")
def gpt2_pair(data_dir):
    tokenizers = pytest.importorskip("tokenizers")
    ours = BPETokenizer.gpt2(str(data_dir / "gpt2" / "gpt2.tiktoken"))
    vocab = {bytes_to_token(b): r for b, r in ours.ranks.items()}
    merges = [(bytes_to_token(a), bytes_to_token(b)) for a, b in merges_from_ranks(ours.ranks)]
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.add_special_tokens([tokenizers.AddedToken("<|endoftext|>", special=True, normalized=False)])
    return ours, hf


@settings(max_examples=500, deadline=None)
@given(text=ANY_TEXT)
def test_smollm2_encodes_any_text_as_hugging_face(smollm2_pair, text):
    ours, hf = smollm2_pair
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids


@settings(max_examples=500, deadline=None)
@given(text=ANY_TEXT)
def test_gpt2_encodes_any_text_as_hugging_face(gpt2_pair, text):
    ours, hf = gpt2_pair
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == text  # every byte has a token: nothing is lost


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(exclude_categories=())))  # lone surrogates too, which Hugging Face refuses
def test_no_text_crashes_the_smollm2_tokenizer(smollm2_pair, text):
    ours, _ = smollm2_pair
    ids = ours.encode(text) + ours.encode(text, allow_special=False)
    assert all(0 <= i < ours.vocab_size for i in ids)


def test_pre_split_digits(gpt2):
    assert [gpt2.decode([i]) for i in gpt2.encode(" 12345")] == [" 123", "45"]  # without: merged
    ranks = gpt2.ranks | {b"  ": 50257}  # a double-space token, as SmolLM2 has
    tok = BPETokenizer("digits", GPT2_PAT, ranks, {"<|r12|>": 50258}, pre_split_digits=True)
    pieces = lambda text, **kw: [tok.decode([i]) for i in tok.encode(text, **kw)]
    assert pieces(" 12345 x9") == [" ", "1", "2", "3", "4", "5", " x", "9"]
    assert pieces("a  1") == ["a", "  ", "1"]  # the regex runs on "a  " alone, so \s++$ takes both spaces
    assert pieces("7<|r12|>8") == ["7", "<|r12|>", "8"]  # specials are cut out before digits
    assert "<|r12|>" not in pieces("<|r12|>", allow_special=False)
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.pre_split_digits and again.encode("x 2024<|r12|>") == tok.encode("x 2024<|r12|>")


def test_unicode_normalization(gpt2):
    """normalize="NFC" (Qwen2's tokenizer.json): the text between special tokens is NFC-normalized first."""
    tok = BPETokenizer("nfc", GPT2_PAT, gpt2.ranks, {"<|x|>": 50257}, normalize="NFC")
    nfd, nfc = "cafe\u0301 \u212b", "caf\u00e9 \u00c5"  # e + combining acute, the Angstrom sign
    assert tok.encode(nfd) == tok.encode(nfc) == gpt2.encode(nfc) != gpt2.encode(nfd)
    assert tok.encode(f"<|x|>{nfd}", allow_special=False) == gpt2.encode(f"<|x|>{nfc}", allow_special=False)
    assert tok.decode(tok.encode(f"a<|x|>{nfd}")) == f"a<|x|>{nfc}"
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.normalize == "NFC" and again.encode(nfd) == tok.encode(nfd)
    assert tokenizer_from_dict(gpt2.to_dict()).normalize is None
    with pytest.raises(ValueError, match="normalize must be one of"):
        BPETokenizer("bad", GPT2_PAT, gpt2.ranks, {}, normalize="NFX")


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
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)
       | st.text(alphabet="aé日本🤖👍🏽\u0301 \n", max_size=30))
def test_streamed_char_pieces(text):
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_partial_character_is_held_back(gpt2):
    ids = gpt2.encode("🤖")
    assert len(ids) > 1
    dec = IncrementalDecoder(gpt2)
    assert [dec.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.feed(ids[-1]) == "🤖"


# ----------------------------------------------------------------------------- byte-level BPE as text

def test_byte_table_is_printable_and_invertible():
    assert len(set(BYTE_ENCODER.values())) == 256 and all(c.isprintable() and not c.isspace() for c in BYTE_ENCODER.values())
    assert bytes_to_token(b" hello\n") == "Ġhello" + chr(266) and bytes_to_token(b"A\xff") == "Aÿ"
    every_byte = bytes(range(256))
    assert token_to_bytes(bytes_to_token(every_byte)) == every_byte
    with pytest.raises(ValueError, match="not byte-level BPE"):
        token_to_bytes("▁hello")  # SentencePiece's space marker is outside the table


def test_merges_from_ranks_rebuilds_every_token(gpt2_ranks_512):
    """Each multi-byte token comes from exactly one merge of two lower-ranked tokens, in rank order."""
    merges = merges_from_ranks(gpt2_ranks_512)
    assert len(merges) == len(gpt2_ranks_512) - 256
    ranks = [gpt2_ranks_512[a + b] for a, b in merges]
    assert ranks == sorted(ranks)
    assert all(gpt2_ranks_512[a] < gpt2_ranks_512[a + b] and gpt2_ranks_512[b] < gpt2_ranks_512[a + b] for a, b in merges)
    with pytest.raises(ValueError, match="cannot be built"):
        merges_from_ranks({b"a": 0, b"b": 1, b"abc": 2})


def test_same_tokenizer_rule_looks_at_what_ids_mean_only(data_dir):
    """Two copies of one vocabulary pass whatever their name, chat template or stop set; another
    vocabulary or another special-token id is refused, naming both models."""
    from minillm.tokenizer import check_same_tokenizer
    base = BPETokenizer.gpt2(str(data_dir / "gpt2" / "gpt2.tiktoken"))
    d = base.to_dict()
    renamed = BPETokenizer.from_dict({**d, "name": "other", "chat_template": "{{ messages }}", "eos_tokens": []})
    check_same_tokenizer(base, renamed)
    moved = BPETokenizer.from_dict({**d, "special_tokens": {"<|endoftext|>": 50257}})
    with pytest.raises(ValueError, match="draft .* different tokenizers"):
        check_same_tokenizer(base, moved, "the target", "the draft")
    with pytest.raises(ValueError, match="different tokenizers"):
        check_same_tokenizer(CharTokenizer("abc"), CharTokenizer("abd"))
