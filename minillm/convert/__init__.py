"""Bring other people's checkpoints into our format: Hugging Face (GPT-2; LLaMA-style: Llama, Mistral,
Qwen2, Qwen3) and GGUF (llama, qwen2, qwen3).

    from minillm.convert import convert
    convert("path/to/hf_dir" | "hub/id" | "model.gguf", "weights/NAME.safetensors", dtype="float32")

A reader turns the source into a `Source` (source.py): a ModelConfig, a tokenizer, and a recipe for
each of our tensors, every one checked for presence and shape before anything is read. The writer
(writer.py) then streams it into our format, atomically. The package, one idea per file:

    source.py     Source, Tensor, ConvertError, and TensorMap (the presence-and-shape check)
    vocab.py      Hugging Face / GGUF byte-level BPE vocabularies -> tiktoken ranks
    hf.py         Hugging Face directories and hub ids
    gguf.py       GGUF files (llama.cpp)
    rope.py       the one place where q/k rows are permuted between the two RoPE layouts
    blocks.py     GGUF Q4_0/Q4_1/Q4_K block layouts -> our int4 codes, scales and zeros
    quantized.py  --keep-quant: those codes straight into our int4 format
    writer.py     write_checkpoint: the streaming, atomic writer
    __main__.py   python -m minillm.convert
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..checkpoint import check_output, read_metadata
from .gguf import load_gguf
from .hf import download_hub, load_hf_dir
from .source import ConvertError, Source, Tensor
from .vocab import LLAMA3_PAT
from .writer import DTYPES, write_checkpoint

__all__ = ["convert", "load_source", "ConvertError", "Source", "Tensor", "write_checkpoint", "DTYPES", "LLAMA3_PAT"]


# ----------------------------------------------------------------------------- entry point

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _is_gguf(p: Path) -> bool:
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return p.suffix == ".gguf" or f.read(4) == b"GGUF"


def _is_ours(p: Path) -> bool:
    """Whether `p` is a minillm checkpoint (a garbled file is not: convert then says what it is not)."""
    try:
        return read_metadata(p).get("format", "").startswith("minillm/")
    except ValueError:  # CheckpointError
        return False


def load_source(src: str | Path) -> Source:
    """A .gguf file, a local Hugging Face directory, or a hub id -> Source (nothing read but headers)."""
    p = Path(src).expanduser()
    if p.is_file():
        if _is_gguf(p):
            return load_gguf(p)
        if p.suffix == ".safetensors" and _is_ours(p):
            raise ConvertError(f"{src}: already a minillm checkpoint: sample.py and the other commands take it as it is")
        raise ConvertError(f"{src}: not a .gguf file; for Hugging Face weights pass the model's directory")
    if p.is_dir():
        return load_hf_dir(p)
    if p.suffix in (".gguf", ".safetensors", ".bin"):  # a file name, not a hub id
        raise ConvertError(f"{src}: no such file")
    if _HUB_ID.match(str(src)) and not str(src).startswith((".", "~")):
        return load_hf_dir(download_hub(str(src)))
    raise ConvertError(f"{src}: no such file or directory")


def _check_out(out: Path, inputs: list[Path]) -> None:
    """checkpoint.check_output's rules for --out (a writable folder, not one of the source's files), as a ConvertError."""
    try:
        check_output(out, "--out", inputs=tuple(inputs))
    except OSError as e:
        raise ConvertError(str(e)) from None


def convert(src: str | Path, out: str | Path, dtype: str | torch.dtype = "float32", progress: bool = True,
            keep_quant: bool = False) -> Path:
    """Convert `src` (HF dir, hub id, or .gguf) to our format at `out`; returns the output path.
    keep_quant (GGUF only): a quantized checkpoint keeping the file's Q4_0/Q4_1/Q4_K codes (quantized.py)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConvertError(f"unsupported --dtype {dtype!r}; choose from {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    out = Path(out)
    _check_out(out, [Path(src).expanduser()])  # fail before reading anything
    if keep_quant and not _is_gguf(Path(src).expanduser()):
        raise ConvertError(f"{src}: --keep-quant needs a GGUF source (its blocks are what is kept); "
                           f"to quantize a float model use: python -m minillm.quantize CKPT --out OUT --bits 4")
    source = load_source(src)
    _check_out(out, source.files)  # a Hugging Face directory's own weights, config, tokenizer
    source.provenance = {**source.provenance, "converted_by": "minillm.convert",
                         "dtype": "quantized" if keep_quant else str(dtype).removeprefix("torch.")}
    return write_checkpoint(source, out, dtype, progress, keep_quant)
