"""Bring other people's checkpoints into our format: Hugging Face (GPT-2, LLaMA-style) and GGUF.

    from minillm.convert import convert
    convert("path/to/hf_dir" | "hub/id" | "model.gguf", "weights/NAME.safetensors", dtype="float32")

Every source is read into a `Source`: a ModelConfig, a tokenizer, and an explicit map from each of
our tensor names to a small function that produces it (read, transpose, split, dequantize, un-permute)
together with the shape it will have. Nothing is read before the whole map has been checked
against the config: every tensor we need must be there with the shape the config implies, and every
tensor the source holds must be used (or be on a short, documented ignore list). Only then are the
tensors produced one at a time and streamed into a temp file beside the output, which is renamed
into place at the end: peak memory is the largest single tensor, not the whole model, and a failure
at any point leaves no output file.

Tokenizers. Everything we accept is byte-level BPE, which tiktoken runs from `mergeable_ranks`
(token bytes -> rank, the rank being the token id). A Hugging Face vocab maps *printable* strings to
ids: GPT-2 wrote each byte as a printable unicode character (`bytes_to_unicode` below) so vocab and
merges are text; we undo that table to get the bytes. tiktoken merges the adjacent pair whose merged
bytes have the lowest rank, Hugging Face the pair that comes first in the merge list; these agree
when merge products appear in id order, which `ranks_from_vocab` checks. Added/special tokens become
tiktoken special tokens. Special-token strings found in text are encoded as the special token
(`BPETokenizer.encode(allow_special=True)`, our default, as Hugging Face does); pass
allow_special=False to encode such text literally. SentencePiece tokenizers (Llama 2, TinyLlama) are
refused with a clear error.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import FORMAT, expected_shapes
from ..config import ModelConfig
from ..tokenizer import GPT2_PAT, BPETokenizer, tokenizer_from_dict

__all__ = ["convert", "ConvertError", "Source", "Tensor", "write_checkpoint", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint8: "U8", torch.int8: "I8"}

# Llama 3's pre-tokenizer (tiktoken cl100k-style): case-insensitive contractions, letters with one
# leading non-letter, numbers in groups of up to 3 digits, punctuation runs, newlines, spaces.
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# GGUF `tokenizer.ggml.pre` (llama.cpp's pre-tokenizer names) -> (regex, split digits one per token first)
GGUF_PRE = {
    "gpt2": (GPT2_PAT, False),
    "smollm": (GPT2_PAT, True),  # llama.cpp: digits one per token, then the GPT-2 regex
    "llama-bpe": (LLAMA3_PAT, False),
    "llama3": (LLAMA3_PAT, False),
}


class ConvertError(ValueError):
    """The source cannot be converted: unreadable, unsupported, or inconsistent. Nothing was written."""


@dataclass
class Tensor:
    """How to make one of our tensors: `shape` is known without reading; `load()` reads it (float)."""
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    source: str  # the source tensor name(s), for messages
    kind: str = ""  # the source's storage type (GGUF: "Q4_1", "F32", ...), for reports
    codes: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    # codes: a block-quantized source's own int4 codes (q (N, K) in [0, 15], scale, zero (N, K/32)) with
    # W = (q - 8) * scale + zero, as quantize.py stores them: lets --keep-quant skip the float round trip


@dataclass
class Entry:
    """One tensor of the file being written: shape and dtype known up front, `load()` makes it."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    source: str


@dataclass
class Source:
    config: ModelConfig
    tokenizer: BPETokenizer
    tensors: dict[str, Tensor]  # our name -> recipe
    provenance: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- byte-level BPE helpers

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


def token_to_bytes(token: str) -> bytes:
    try:
        return bytes(BYTE_DECODER[c] for c in token)
    except KeyError as e:
        raise ConvertError(f"token {token!r} is not byte-level BPE (character {e.args[0]!r} is outside GPT-2's "
                           f"byte table); only byte-level BPE tokenizers are supported") from None


def bytes_to_token(b: bytes) -> str:
    return "".join(BYTE_ENCODER[x] for x in b)


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
        b = token_to_bytes(tok)
        if b in ranks:
            raise ConvertError(f"tokenizer {name!r}: two tokens have the same bytes {b!r} (ids {ranks[b]} and {i})")
        ranks[b] = i
    missing = [x for x in range(256) if bytes([x]) not in ranks]
    if len(missing) > 32:  # SmolLM2 lacks 21 bytes (6 rare control characters and bytes UTF-8 never uses)
        raise ConvertError(f"tokenizer {name!r}: {len(missing)} single bytes have no token (e.g. byte {missing[0]}); "
                           f"not a byte-level BPE")
    last = -1
    for n, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rid = vocab.get(a + b)
        if rid is None:
            raise ConvertError(f"tokenizer {name!r}: merge #{n} {a!r} + {b!r} makes a token that is not in the vocab")
        if rid <= last:
            raise ConvertError(f"tokenizer {name!r}: merge #{n} ({a!r} + {b!r}) makes id {rid}, not after the previous "
                               f"merge's id {last}; tiktoken ranks cannot reproduce this merge order")
        last = rid
    return ranks


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The inverse, for export: each multi-byte token's merge pair, in rank order. A token's pair is what
    BPE leaves when it runs on the token's own bytes using only lower ranks (two parts remain)."""
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
            raise ConvertError(f"token {tok!r} (rank {rank}) cannot be built by merging lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


# ----------------------------------------------------------------------------- writing

def _check_source(src: Source) -> None:
    """Every tensor the config needs, with the config's shape, and nothing else."""
    cfg = src.config
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(src.tensors))
    extra = sorted(set(src.tensors) - set(want))
    if missing:
        raise ConvertError(f"missing tensor for {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise ConvertError(f"tensor {extra[0]!r} ({src.tensors[extra[0]].source}) is not used by the config")
    for name, shape in want.items():
        got = tuple(src.tensors[name].shape)
        if got != tuple(shape):
            raise ConvertError(f"tensor {src.tensors[name].source} has shape {got} as {name!r}, but the config implies "
                               f"{tuple(shape)}: config and weights disagree")
    if src.tokenizer.vocab_size > cfg.vocab_size:
        raise ConvertError(f"tokenizer has {src.tokenizer.vocab_size} ids but the model's vocab_size is {cfg.vocab_size}")


def write_checkpoint(src: Source, out: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True,
                     keep_quant: bool = False) -> Path:
    """Stream `src` into our .safetensors format at `out`, one tensor in memory at a time, atomically.
    keep_quant: a quantized checkpoint instead (quantized.py: GGUF Q4_0/Q4_1 codes copied, the rest
    quantized by us); what happens to each kind of source tensor goes into the provenance ("keep_quant").

    The safetensors layout is simple enough to write incrementally: 8 bytes little-endian header size,
    a JSON header (every tensor's dtype, shape, byte range, and the string metadata), then the raw
    tensor bytes back to back. All shapes are known before any tensor is read, so the header goes first."""
    out = Path(out)
    if not out.parent.is_dir():
        raise ConvertError(f"cannot write {out}: directory {out.parent} does not exist")
    _check_source(src)
    if dtype not in DTYPES.values():
        raise ConvertError(f"unsupported dtype {dtype}; choose from {sorted(DTYPES)}")
    metadata = {"format": FORMAT, "config": src.config.to_json(), "tokenizer": json.dumps(src.tokenizer.to_dict())}
    provenance, quantization = dict(src.provenance), None
    if keep_quant:
        from .quantized import choose_spec, quantized_entries
        quantization = choose_spec(src)
        entries, provenance["keep_quant"] = quantized_entries(src, quantization)
        metadata["quantization"] = json.dumps(quantization)
    else:
        entries = {name: Entry(tuple(src.tensors[name].shape), dtype, src.tensors[name].load, src.tensors[name].source)
                   for name in expected_shapes(src.config)}
    metadata["provenance"] = json.dumps(provenance)
    header, offset = {}, 0
    for name, e in entries.items():
        nbytes = torch.empty((), dtype=e.dtype).element_size() * math.prod(e.shape)
        header[name] = {"dtype": _ST_DTYPE[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned

    from tqdm.auto import tqdm
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name in tqdm(entries, desc=f"writing {out.name}", unit="tensor", disable=not progress):
                e = entries[name]
                try:
                    t = e.load()
                except ConvertError:
                    raise
                except Exception as err:
                    raise ConvertError(f"cannot read tensor {e.source} ({type(err).__name__}: {err}); "
                                       f"the file may be truncated or corrupt") from err
                t = t.to(e.dtype).contiguous()
                if tuple(t.shape) != tuple(e.shape):
                    raise ConvertError(f"tensor {e.source} read with shape {tuple(t.shape)} for {name!r}, header said {e.shape}")
                f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
                del t
        _validate_written(tmp, src.config, quantization)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it owner-only; give it a normal file's mode
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _validate_written(path: str, cfg: ModelConfig, quantization: dict | None = None) -> None:
    """Reopen what we wrote with the safetensors library: header, names, shapes and metadata (no data read)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        want = expected_shapes(cfg, quantization)
        assert set(f.keys()) == set(want), "written tensor names differ from the config's"
        for k in want:
            assert tuple(f.get_slice(k).get_shape()) == tuple(want[k]), f"written shape of {k} is wrong"
    assert ModelConfig.from_dict(json.loads(meta["config"])) == cfg
    tokenizer_from_dict(json.loads(meta["tokenizer"]))


# ----------------------------------------------------------------------------- entry point

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _is_gguf(p: Path) -> bool:
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return p.suffix == ".gguf" or f.read(4) == b"GGUF"


def load_source(src: str | Path) -> Source:
    """A .gguf file, a local Hugging Face directory, or a hub id -> Source (nothing read but headers)."""
    p = Path(src).expanduser()
    if p.is_file():
        if _is_gguf(p):
            from .gguf import load_gguf
            return load_gguf(p)
        raise ConvertError(f"{src}: not a .gguf file; for Hugging Face weights pass the model's directory")
    if p.is_dir():
        from .hf import load_hf_dir
        return load_hf_dir(p)
    if _HUB_ID.match(str(src)) and not str(src).startswith((".", "~")):
        from .hf import download_hub, load_hf_dir
        return load_hf_dir(download_hub(str(src)))
    raise ConvertError(f"{src}: no such file or directory")


def convert(src: str | Path, out: str | Path, dtype: str | torch.dtype = "float32", progress: bool = True,
            keep_quant: bool = False) -> Path:
    """Convert `src` (HF dir, hub id, or .gguf) to our format at `out`; returns the output path.
    keep_quant (GGUF only): a quantized checkpoint keeping the file's Q4_0/Q4_1 codes (quantized.py)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConvertError(f"unsupported --dtype {dtype!r}; choose from {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    out = Path(out)
    if not out.parent.is_dir():  # fail before reading anything
        raise ConvertError(f"cannot write {out}: directory {out.parent} does not exist")
    if keep_quant and not _is_gguf(Path(src).expanduser()):
        raise ConvertError(f"{src}: --keep-quant needs a GGUF source (its blocks are what is kept); "
                           f"to quantize a float model use: python -m minillm.quantize CKPT --out OUT --bits 4")
    source = load_source(src)
    source.provenance = {**source.provenance, "converted_by": "minillm.convert",
                         "dtype": "quantized" if keep_quant else str(dtype).removeprefix("torch.")}
    return write_checkpoint(source, out, dtype, progress, keep_quant)
