"""Stream a checked `Source` into our .safetensors format, one tensor in memory at a time, atomically.

Nothing is read before the whole tensor map has been checked against the config (checkpoint's one
rule: every tensor the config implies, with its shape, and no other). Then the tensors are produced
one at a time and streamed into a temp file beside the output, which checkpoint.atomic_write renames
into place at the end: peak memory is the largest single tensor, not the whole model, and a failure
at any point leaves no output file.

The safetensors layout is simple enough to write incrementally: 8 bytes little-endian header size,
a JSON header (every tensor's dtype, shape, byte range, and the string metadata), then the raw
tensor bytes back to back. All shapes are known before any tensor is read, so the header goes first.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..checkpoint import FORMAT, CheckpointError, atomic_write, check_tensor_set, expected_shapes
from ..config import ModelConfig
from ..tokenizer import tokenizer_from_dict
from .quantized import choose_spec, quantized_entries
from .source import ConvertError, Entry, Source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint8: "U8", torch.int8: "I8"}


def write_checkpoint(src: Source, out: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True,
                     keep_quant: bool = False) -> Path:
    """Write `src` to our format at `out` (see the top). keep_quant: a quantized checkpoint instead
    (quantized.py: GGUF Q4_0/Q4_1/Q4_K codes copied, the rest quantized by us); what happens to each kind
    of source tensor goes into the provenance ("keep_quant", "keep_quant_tensors")."""
    out = Path(out)
    if not out.parent.is_dir():
        raise ConvertError(f"cannot write {out}: directory {out.parent} does not exist")
    if dtype not in DTYPES.values():
        raise ConvertError(f"unsupported dtype {dtype}; choose from {sorted(DTYPES)}")
    _check_source(src)
    entries, metadata, quantization = _plan(src, dtype, keep_quant)
    header = _header(entries, metadata)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            _write_tensors(f, entries, desc=f"writing {out.name}", progress=progress)
        _validate_written(tmp, src.config, quantization)

    return atomic_write(out, write)


def _check_source(src: Source) -> None:
    """Every tensor the config needs, with the config's shape, and nothing else; a vocabulary that fits."""
    try:
        check_tensor_set({name: t.shape for name, t in src.tensors.items()}, expected_shapes(src.config), "source")
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    if src.tokenizer.vocab_size > src.config.vocab_size:
        raise ConvertError(f"tokenizer has {src.tokenizer.vocab_size} ids but the model's vocab_size is "
                           f"{src.config.vocab_size}")


def _plan(src: Source, dtype: torch.dtype, keep_quant: bool) -> tuple[dict[str, Entry], dict[str, str], dict | None]:
    """Every tensor of the output file in writing order, the file's metadata, and its quantization (or None)."""
    metadata = {"format": FORMAT, "config": src.config.to_json(), "tokenizer": json.dumps(src.tokenizer.to_dict())}
    provenance, quantization = dict(src.provenance), None
    if keep_quant:
        quantization = choose_spec(src)
        entries, plan = quantized_entries(src, quantization)
        provenance["keep_quant"] = {what: len(names) for what, names in plan.items()}  # counts, then the names
        provenance["keep_quant_tensors"] = plan
        metadata["quantization"] = json.dumps(quantization)
    else:
        entries = {name: Entry(tuple(src.tensors[name].shape), dtype, src.tensors[name].load, src.tensors[name].source)
                   for name in expected_shapes(src.config)}
    metadata["provenance"] = json.dumps(provenance)
    return entries, metadata, quantization


def _header(entries: dict[str, Entry], metadata: dict[str, str]) -> bytes:
    """The safetensors header: its size (8 bytes, little-endian), then JSON naming every tensor's
    dtype, shape and byte range in the data that follows, padded so that the data starts 8-byte aligned."""
    header, offset = {}, 0
    for name, e in entries.items():
        nbytes = torch.empty((), dtype=e.dtype).element_size() * math.prod(e.shape)
        header[name] = {"dtype": _ST_DTYPE[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def _write_tensors(f: BinaryIO, entries: dict[str, Entry], desc: str, progress: bool) -> None:
    """Make each entry's tensor, check its shape against the header's, and append its raw bytes."""
    for name in tqdm(entries, desc=desc, unit="tensor", disable=not progress):
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


def _validate_written(path: Path, cfg: ModelConfig, quantization: dict | None) -> None:
    """Reopen what we wrote with the safetensors library: header, names, shapes and metadata (no data read)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    check_tensor_set(found, expected_shapes(cfg, quantization), str(path))
    assert ModelConfig.from_dict(json.loads(meta["config"])) == cfg
    tokenizer_from_dict(json.loads(meta["tokenizer"]))
