"""Tokenizers: characters, or byte-level BPE through tiktoken; and a UTF-8-safe streaming decoder.

Both kinds describe themselves completely with `to_dict()`, which the checkpoint stores as JSON, so
a model file needs no tokenizer file beside it. `tokenizer_from_dict` rebuilds either kind.
"""

from __future__ import annotations

import base64
import os
import unicodedata
from collections import Counter
from pathlib import Path

import regex  # tiktoken's own dependency; unlike re it knows \p{N}
import tiktoken
import tiktoken.load

# tiktoken's pattern for GPT-2 (r50k_base): contractions, letters, numbers, other symbols, spaces.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = "<|endoftext|>"
DIGIT_SPLIT = regex.compile(r"(\p{N})")  # capturing, so split() keeps each digit as its own piece
NORMAL_FORMS = (None, "NFC", "NFKC", "NFD", "NFKD")  # BPETokenizer.normalize: unicodedata's forms


class CharTokenizer:
    """One id per character of the training text's alphabet (sorted), as nanoGPT's shakespeare_char."""

    kind = "char"
    bos_id: int | None = None
    eos_id: int | None = None
    chat_template: str | None = None

    def __init__(self, chars: str | list[str]):
        self.chars: list[str] = sorted(set(chars))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eos_ids: set[int] = set()  # a char model has no end-of-text token

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = list(dict.fromkeys(c for c in text if c not in self.stoi))
            raise ValueError(f"characters not in this model's vocabulary (built from its training text): "
                             f"{', '.join(map(repr, unknown))}") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in map(self._check, ids))

    def token_bytes(self, id: int) -> bytes:
        return self.chars[self._check(id)].encode("utf-8")

    def _check(self, id) -> int:
        id = int(id)
        if not 0 <= id < len(self.chars):  # a negative id would silently index from the end
            raise ValueError(f"token id {id} is outside this char vocabulary (size {len(self.chars)})")
        return id

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": "".join(self.chars)}


class BPETokenizer:
    """Byte-level BPE: merge ranks + a pre-tokenizer regex + special tokens, run by tiktoken.

    Ids need not be contiguous (GGUF vocabularies have holes); vocab_size is max id + 1.
    pre_split_digits=True is SmolLM2's "smollm" pre-tokenizer (Hugging Face's Digits(individual)
    then ByteLevel): special tokens are cut out first, then every digit (Unicode category N) becomes
    a piece of its own, and pat_str runs on each stretch between digits separately (so "$" in it
    means that stretch's end). A pat_str branch for digits would not do: " 12" must give " ", "1", "2".
    normalize ("NFC", "NFKC", "NFD" or "NFKD"; Qwen2's tokenizer.json has NFC): the Unicode
    normalization Hugging Face's normalizer applies to the text between special tokens before the regex.
    """

    kind = "bpe"

    def __init__(self, name: str, pat_str: str, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int],
                 bos_token: str | None = None, eos_tokens: list[str] | None = None, add_bos: bool = False,
                 chat_template: str | None = None, pre_split_digits: bool = False, normalize: str | None = None):
        if normalize not in NORMAL_FORMS:
            raise ValueError(f"tokenizer {name!r}: normalize must be one of {NORMAL_FORMS}, got {normalize!r}")
        self.normalize = normalize
        self.name, self.pat_str, self.ranks, self.special_tokens = name, pat_str, mergeable_ranks, special_tokens
        self.bos_token, self.eos_tokens, self.add_bos = bos_token, list(eos_tokens or []), add_bos
        self.chat_template, self.pre_split_digits = chat_template, pre_split_digits
        for tok in [bos_token, *self.eos_tokens]:
            if tok is not None and tok not in special_tokens:
                raise ValueError(f"tokenizer {name!r}: {tok!r} is named as BOS/EOS but is not a special token")
        self._id_bytes = {i: t for t, i in mergeable_ranks.items()}
        self._id_bytes.update({i: t.encode("utf-8") for t, i in special_tokens.items()})
        n_ids = len(mergeable_ranks) + len(special_tokens)
        if len(self._id_bytes) != n_ids:  # tiktoken would panic (in Rust) or silently shadow a token
            counts = Counter([*mergeable_ranks.values(), *special_tokens.values()])
            dups = sorted(i for i, c in counts.items() if c > 1)
            raise ValueError(f"tokenizer {name!r}: ids used by more than one token: {dups[:10]}")
        self._vocab_size = max(self._id_bytes) + 1
        # explicit_n_vocab makes tiktoken check the count, which only holds when the ids are 0..n-1
        contiguous = self._vocab_size == n_ids
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                     special_tokens=special_tokens, explicit_n_vocab=n_ids if contiguous else None)
        self.bos_id = special_tokens[bos_token] if bos_token else None
        self.eos_ids: set[int] = {special_tokens[t] for t in self.eos_tokens}
        self.eos_id = special_tokens[self.eos_tokens[0]] if self.eos_tokens else None
        longest_first = "|".join(regex.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
        self._special_split = regex.compile(f"({longest_first})") if special_tokens else None
        # Bytes without a token of their own (SmolLM2 lacks 6 ASCII controls and the UTF-8 lead bytes
        # 0xF1, 0xF2 of U+40000..U+BFFFF): tiktoken panics on them, Hugging Face drops them (see _encode_piece).
        self._missing = bytes(b for b in range(256) if bytes([b]) not in mergeable_ranks)
        self._pat = regex.compile(pat_str) if self._missing else None

    @classmethod
    def gpt2(cls, path: str | None = None) -> "BPETokenizer":
        """GPT-2's BPE: ranks from `path`, else $MINILLM_DATA_DIR/gpt2/gpt2.tiktoken, else tiktoken's own
        download (cached by tiktoken)."""
        if path is None and os.environ.get("MINILLM_DATA_DIR"):
            local = Path(os.environ["MINILLM_DATA_DIR"]) / "gpt2" / "gpt2.tiktoken"
            path = str(local) if local.is_file() else None
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"GPT-2 rank file not found: {path} (it is tiktoken's r50k_base.tiktoken)")
            ranks = tiktoken.load.load_tiktoken_bpe(path)
        else:
            try:
                ranks = tiktoken.get_encoding("gpt2")._mergeable_ranks
            except Exception as e:
                raise RuntimeError(f"could not load GPT-2's BPE ranks ({e}). Pass tiktoken's r50k_base rank file "
                                   f"as a path, or put it at $MINILLM_DATA_DIR/gpt2/gpt2.tiktoken") from e
        return cls("gpt2", GPT2_PAT, ranks, {GPT2_EOT: 50256}, eos_tokens=[GPT2_EOT])

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Special-token strings in the text become their ids (as Hugging Face tokenizers do);
        allow_special=False encodes them as plain text instead. add_bos prepends bos_id.
        Bytes the vocabulary has no token for are dropped as Hugging Face drops them (_encode_piece)."""
        if not self.pre_split_digits and not self.normalize and not self._lacks_bytes(text):  # all in tiktoken (Rust)
            ids = self.enc.encode(text, allowed_special="all") if allow_special else self.enc.encode_ordinary(text)
        else:
            ids = []
            # split() with a capturing group alternates: plain text, special, plain text, ...
            parts = self._special_split.split(text) if allow_special and self._special_split else [text]
            for k, part in enumerate(parts):
                if k % 2:
                    ids.append(self.special_tokens[part])
                    continue
                if self.normalize:
                    part = unicodedata.normalize(self.normalize, part)
                for piece in DIGIT_SPLIT.split(part) if self.pre_split_digits else [part]:
                    if piece:
                        ids += self._encode_piece(piece)
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def _lacks_bytes(self, text: str) -> bool:
        """Whether the text's UTF-8 holds a byte that has no token (never, for most vocabularies)."""
        if not self._missing:
            return False
        b = text.encode("utf-8", "surrogatepass")
        return len(b.translate(None, self._missing)) != len(b)

    def _encode_piece(self, text: str) -> list[int]:
        """Text without special tokens (or digits, with pre_split_digits) -> ids. Where the vocabulary
        lacks some of its bytes, Hugging Face's way: the regex splits the text as it is, then each
        piece loses the bytes that have no token, then BPE merges what is left ("a\\x04b" is "a", "b"
        when \\x04 has no token; "!\\x04!" is "!!"). tiktoken would panic on such a byte instead."""
        if not self._lacks_bytes(text):
            return self.enc.encode_ordinary(text)
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # lone surrogates: U+FFFD, as tiktoken
        ids = []
        for m in self._pat.finditer(text):
            piece = m.group().encode("utf-8").translate(None, self._missing)
            if piece:
                ids += self.enc._encode_single_piece(piece)  # BPE on the bytes of one piece, no regex
        return ids

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.token_bytes(int(i)) for i in ids)

    def token_bytes(self, id: int) -> bytes:
        try:
            return self._id_bytes[id]
        except KeyError:
            raise ValueError(f"token id {id} is not in tokenizer {self.name!r}") from None

    def to_dict(self) -> dict:
        ordered = sorted(self.ranks.items(), key=lambda kv: kv[1])
        return {"kind": "bpe", "name": self.name, "pat_str": self.pat_str,
                "ranks": [base64.b64encode(t).decode("ascii") for t, _ in ordered],
                "rank_ids": None if all(r == i for i, (_, r) in enumerate(ordered)) else [r for _, r in ordered],
                "special_tokens": self.special_tokens, "bos_token": self.bos_token, "eos_tokens": self.eos_tokens,
                "add_bos": self.add_bos, "chat_template": self.chat_template, "pre_split_digits": self.pre_split_digits,
                "normalize": self.normalize}

    @classmethod
    def from_dict(cls, d: dict) -> "BPETokenizer":
        rank_ids = d.get("rank_ids") or range(len(d["ranks"]))
        ranks = {base64.b64decode(t): r for t, r in zip(d["ranks"], rank_ids)}
        return cls(d["name"], d["pat_str"], ranks, d["special_tokens"], d.get("bos_token"), d.get("eos_tokens"),
                   d.get("add_bos", False), d.get("chat_template"), d.get("pre_split_digits", False),
                   d.get("normalize"))


def tokenizer_from_dict(d: dict) -> CharTokenizer | BPETokenizer:
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "bpe":
        return BPETokenizer.from_dict(d)
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'char' or 'bpe')")


ID_MEANING = ("kind", "chars", "ranks", "rank_ids", "special_tokens")  # the parts of to_dict() that map ids to text


def tokenizer_identity(tokenizer) -> dict:
    """What decides which text each token id stands for: the vocabulary and the special tokens. Two
    models that exchange ids need only this; a name, a chat template, the stop set or how text is split
    before merging may differ between two copies of one vocabulary without changing what an id means."""
    return {k: v for k, v in tokenizer.to_dict().items() if k in ID_MEANING}


def check_same_tokenizer(tok_a, tok_b, name_a: str = "model", name_b: str = "other model", purpose: str = "") -> None:
    """The one rule for two models that exchange token ids (speculative and contrastive decoding,
    distillation): every id must mean the same text in both. A ValueError names both when they differ."""
    if tokenizer_identity(tok_a) != tokenizer_identity(tok_b):
        need = f"{purpose} needs" if purpose else "both must have"
        raise ValueError(f"{name_a} and {name_b} have different tokenizers ({tok_a.kind}, {tok_a.vocab_size} ids vs "
                         f"{tok_b.kind}, {tok_b.vocab_size} ids); {need} one tokenizer: the same token ids for the same text")


class IncrementalDecoder:
    """Turn a stream of token ids into text pieces without ever splitting a UTF-8 character.

    A byte-level BPE token can end in the middle of a multi-byte character (an emoji is often two
    or three tokens). Bytes are buffered until they form complete characters; only those are emitted."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.buffer = b""

    def feed(self, token_id: int) -> str:
        self.buffer += self.tokenizer.token_bytes(token_id)
        cut = complete_utf8_prefix(self.buffer)
        text, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return text.decode("utf-8", errors="replace")

    def flush(self) -> str:
        text, self.buffer = self.buffer.decode("utf-8", errors="replace"), b""
        return text


def complete_utf8_prefix(b: bytes) -> int:
    """Length of the longest prefix of b that does not end inside an unfinished UTF-8 sequence."""
    for back in range(1, min(4, len(b)) + 1):  # look at most 4 bytes back for a lead byte
        byte = b[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: a lead (or ASCII) byte
            need = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4 if byte < 0xF8 else 1
            return len(b) if back >= need else len(b) - back
    return len(b)  # only continuation bytes: invalid anyway, emit (as U+FFFD)


# ----------------------------------------------------------------------------- byte-level BPE as text
# Hugging Face and GGUF vocabularies map *printable* strings to ids: GPT-2 wrote each byte as a
# printable unicode character so that vocab and merges are text. tiktoken (and BPETokenizer) work
# on the bytes themselves; these helpers go between the two.

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table byte -> printable character: printable Latin-1 bytes map to themselves, the other
    68 bytes (controls, space, ...) to chr(256), chr(257), ... in byte order (so space is 'Ġ' = chr(288))."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


def bytes_to_token(b: bytes) -> str:
    """Token bytes -> the printable string a Hugging Face / GGUF vocabulary holds."""
    return "".join(BYTE_ENCODER[x] for x in b)


def token_to_bytes(token: str) -> bytes:
    """The inverse of bytes_to_token; a ValueError for a string outside GPT-2's byte table."""
    try:
        return bytes(BYTE_DECODER[c] for c in token)
    except KeyError as e:
        raise ValueError(f"token {token!r} is not byte-level BPE (character {e.args[0]!r} is outside GPT-2's "
                         f"byte table); only byte-level BPE tokenizers are supported") from None


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that tiktoken ranks imply: each multi-byte token's merge pair, in rank order. A
    token's pair is what BPE leaves when it runs on the token's own bytes using only lower ranks (two
    parts remain). A ValueError for a token that no merge of lower-ranked tokens builds."""
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        parts = [tok[i:i + 1] for i in range(len(tok))]
        while len(parts) > 2:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {tok!r} (rank {rank}) cannot be built by merging lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges
