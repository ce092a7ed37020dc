"""`convert --keep-quant`: write a quantized checkpoint (minillm.quantize's format) straight from a GGUF file.

A GGUF file is already quantized. Converting it to float and then running `minillm.quantize` would
quantize twice: our int4 quantizer picks each group's scale from the min and max of the dequantized
values, which puts the grid somewhere else whenever a block did not use all 16 codes. Q4_0, Q4_1 and
Q4_K blocks are our int4 group-32 scheme already (one scale and one offset per 32 inputs of a row;
Q4_K derives them from 6-bit sub-block scales and minimums times its super-block's float16 d and dmin,
blocks.py has the layouts and the algebra), so their codes are copied as they are; only the scale and
zero are rounded from float32 to bf16, the dtype our kernels take them in (a relative error of at most
2^-9 on each; the codes are exact).

Where the math does not allow a copy, the tensor goes through float and our own quantizer, and the
provenance says so: tensors counted by kind ("keep_quant": {"Q4_K -> int4 codes kept": 168,
"Q6_K -> int4 from float": 28, ...}) and named ("keep_quant_tensors": {"Q6_K -> int4 from float":
["blocks.0.mlp.down_proj.weight", ...], ...}):
    Q8_0 (32 inputs per float16 scale) -> int8 per output channel: our int8 kernel takes one scale per
        row, and a row of a Q8_0 matrix has K/32 different scales.
    Q5_0, Q5_K, Q6_K, F16, F32, ... -> int4 group 32 or int8, from the dequantized floats.
The scheme: int4 group 32 for the Linear layers when most of the source's Linear weights are Q4_0/Q4_1/Q4_K,
else int8; the token embedding and output head int8 (minillm.quantize's default, and what llama.cpp's Q4
files do too). Norms and biases are stored in bf16, as minillm.quantize stores them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

from ..checkpoint import empty_model, model_tensors
from ..quantize import (COMPUTE_DTYPE, Int4Linear, Int8Linear, QuantEmbedding, make_spec, pack_nibbles,
                        quantize_int4, quantize_int8)
from .source import Entry

KEEP_GROUP = 32  # the block size of Q4_0 / Q4_1, and of a Q4_K sub-block


def choose_spec(src) -> dict:
    """int4 group 32 if most Linear weights of `src` are Q4_0/Q4_1/Q4_K blocks (their codes can be kept), else int8."""
    linear = [t for name, t in src.tensors.items() if name.endswith("_proj.weight")]
    keepable = sum(t.codes is not None for t in linear)
    return make_spec(4 if keepable * 2 > len(linear) else 8, KEEP_GROUP, 8)


def quantized_entries(src, spec: dict) -> tuple[dict[str, Entry], dict[str, list[str]]]:
    """Every tensor of the quantized checkpoint for `spec`, in the order to write them, and the plan:
    {"Q4_1 -> int4 codes kept": [our names of those tensors], "Q8_0 -> int8 from float": [...], ...}."""
    model = empty_model(src.config, spec)  # meta: names, shapes and dtypes of the quantized state dict
    want = model_tensors(model)
    report: dict[str, list[str]] = defaultdict(list)
    quantized = {}  # module name -> bits
    for mname, m in model.named_modules():
        if isinstance(m, QuantEmbedding):
            quantized[mname] = m.bits
        elif isinstance(m, (Int4Linear, Int8Linear)) and not m.tied:
            quantized[mname] = 4 if isinstance(m, Int4Linear) else 8

    made: dict[str, dict[str, torch.Tensor]] = {}  # module -> its tensors not yet written (one module at a time)

    def how(mname: str) -> str:
        rec, bits = src.tensors[mname + ".weight"], quantized[mname]
        if bits == 4 and rec.codes is not None and spec["group_size"] == KEEP_GROUP:
            return "int4 codes kept"
        return f"int{bits} from float"

    def quantize_module(mname: str) -> dict[str, torch.Tensor]:
        rec = src.tensors[mname + ".weight"]
        what = how(mname)
        if what == "int4 codes kept":
            q, scale, zero = rec.codes()
        elif what == "int4 from float":
            q, scale, zero = quantize_int4(rec.load(), spec["group_size"], rec.source)
        else:
            qw, s = quantize_int8(rec.load())
            return {"weight": qw, "scales": s}
        return {"weight": pack_nibbles(q), "scales": scale.to(COMPUTE_DTYPE), "zeros": zero.to(COMPUTE_DTYPE)}

    def make(name: str) -> Callable[[], torch.Tensor]:
        mname, leaf = name.rsplit(".", 1)
        if mname in quantized and leaf in ("weight", "scales", "zeros"):
            def load():
                if mname not in made:
                    made[mname] = quantize_module(mname)
                t = made[mname].pop(leaf)
                if not made[mname]:
                    del made[mname]
                return t
            return load
        rec = src.tensors[name]  # norms, biases, a gpt2 position embedding: float, stored in bf16
        return lambda: rec.load().to(COMPUTE_DTYPE)

    entries = {}
    for name, t in want.items():
        dtype = COMPUTE_DTYPE if t.dtype.is_floating_point else t.dtype
        source = src.tensors.get(name.rsplit(".", 1)[0] + ".weight", src.tensors.get(name))
        entries[name] = Entry(tuple(t.shape), dtype, make(name), source.source if source else name)
    for name, rec in src.tensors.items():
        mname = name.rsplit(".", 1)[0]
        what = how(mname) if mname in quantized and name == mname + ".weight" else "bf16"
        report[f"{rec.kind or 'float'} -> {what}"].append(name)
    return entries, dict(sorted(report.items()))
