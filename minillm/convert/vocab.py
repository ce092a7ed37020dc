"""Byte-level BPE vocabularies as Hugging Face and GGUF store them -> the ranks tiktoken runs.

Everything we accept is byte-level BPE, which tiktoken runs from `mergeable_ranks` (token bytes ->
rank, the rank being the token id). A Hugging Face or GGUF vocab maps *printable* strings to ids
(GPT-2's byte table, tokenizer.token_to_bytes undoes it) and lists the merges. tiktoken merges the
adjacent pair whose merged bytes have the lowest rank, Hugging Face the pair that comes first in the
merge list; these agree when merge products appear in id order, which `ranks_from_vocab` checks.
Added/special tokens become tiktoken special tokens. Special-token strings found in text are encoded
as the special token (`BPETokenizer.encode(allow_special=True)`, our default, as Hugging Face does);
pass allow_special=False to encode such text literally. SentencePiece tokenizers (Llama 2,
TinyLlama) are refused with a clear error by the readers.
"""

from __future__ import annotations

from ..tokenizer import token_to_bytes
from .source import ConvertError

# Llama 3's pre-tokenizer (tiktoken cl100k-style): case-insensitive contractions, letters with one
# leading non-letter, numbers in groups of up to 3 digits, punctuation runs, newlines, spaces.
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's (tokenizer.json's Split regex, llama.cpp's `qwen2` pre-tokenizer): Llama 3's with single digits.
QWEN2_PAT = LLAMA3_PAT.replace(r"\p{N}{1,3}", r"\p{N}")


def ranks_from_vocab(vocab: dict[str, int], merges: list, special: dict[str, int], name: str) -> dict[bytes, int]:
    """Byte-level BPE vocab (printable strings -> ids) + merge list -> tiktoken ranks (bytes -> id).

    `special` tokens are left out (tiktoken matches them in text instead). Checks what tiktoken needs to
    reproduce Hugging Face's merges exactly: all 256 bytes are tokens, and merge products have
    increasing ids in merge order (tiktoken applies the pair whose product has the lowest id)."""
    special_ids = set(special.values())
    ranks: dict[bytes, int] = {}
    for tok, i in vocab.items():
        if i in special_ids or tok in special:
            continue
        try:
            b = token_to_bytes(tok)
        except ValueError as e:
            raise ConvertError(f"tokenizer {name!r}: {e}") from None
        if b in ranks:
            raise ConvertError(f"tokenizer {name!r}: two tokens have the same bytes {b!r} (ids {ranks[b]} and {i})")
        ranks[b] = i
    missing = [x for x in range(256) if bytes([x]) not in ranks]
    if len(missing) > 32:  # SmolLM2 lacks 21 bytes (6 rare control characters and bytes UTF-8 never uses)
        raise ConvertError(f"tokenizer {name!r}: {len(missing)} single bytes have no token (e.g. byte {missing[0]}); "
                           f"not a byte-level BPE")
    last = -1
    for n, m in enumerate(merges):
        pair = m.split(" ", 1) if isinstance(m, str) else m
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise ConvertError(f"tokenizer {name!r}: merge #{n} {m!r} is not two tokens separated by a space")
        a, b = pair
        rid = vocab.get(a + b)
        if rid is None:
            raise ConvertError(f"tokenizer {name!r}: merge #{n} {a!r} + {b!r} makes a token that is not in the vocab")
        if rid <= last:
            raise ConvertError(f"tokenizer {name!r}: merge #{n} ({a!r} + {b!r}) makes id {rid}, not after the previous "
                               f"merge's id {last}; tiktoken ranks cannot reproduce this merge order")
        last = rid
    return ranks
