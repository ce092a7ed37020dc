"""python -m minillm.quantize CKPT --out OUT --bits 8|4 [--group-size G] [--embedding-bits 8|4]"""

from __future__ import annotations

import sys
from pathlib import Path

from ..checkpoint import load_model, save_model
from ..flags import Parser, add_input, add_output, add_threads, fail
from . import BITS, GROUP_SIZES, quantize_model


def make_parser() -> Parser:
    ap = Parser(prog="python -m minillm.quantize",
                description="Quantize a minillm checkpoint's weights to int8 (per channel) or int4 (group-wise).")
    add_input(ap, "input", help="a float minillm checkpoint (.safetensors)")
    add_output(ap, "--out", required=True, help="where to write the quantized checkpoint")
    ap.add_argument("--bits", type=int, required=True, choices=BITS)
    ap.add_argument("--group-size", type=int, default=32, choices=GROUP_SIZES,
                    help="int4 only: inputs sharing one scale and zero (smaller: more accurate, larger file; default 32)")
    ap.add_argument("--embedding-bits", type=int, default=8, choices=BITS,
                    help="bits for the token embedding and the output head (default 8, also with --bits 4)")
    add_threads(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        model, loaded = _quantize(args)
        provenance = {**loaded.provenance, "quantized_from": str(args.input), "quantization": model.quantization}
        save_model(args.out, model, loaded.tokenizer, provenance)
    except (ValueError, OSError) as e:  # CheckpointError, a scheme the model cannot take, a failed write
        return fail(str(e))
    size_in, size_out = Path(args.input).stat().st_size, Path(args.out).stat().st_size
    spec = model.quantization
    print(f"wrote {args.out}: int{spec['bits']}" + (f" group {spec['group_size']}" if spec["group_size"] else "")
          + f", embedding/head int{spec['embedding_bits']}, {size_out / 2**20:.1f} MiB (from {size_in / 2**20:.1f} MiB, {size_in / size_out:.1f}x smaller)")
    return 0


def _quantize(args):
    """The model loaded and quantized (--out was checked while parsing: nothing is read if it cannot be made)."""
    loaded = load_model(args.input)
    if getattr(loaded.model, "quantization", None):
        raise ValueError(f"{args.input} is already quantized ({loaded.model.quantization}); start from a float checkpoint")
    try:
        return quantize_model(loaded.model, args.bits, args.group_size, args.embedding_bits), loaded
    except ValueError as e:
        raise ValueError(f"{args.input}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
