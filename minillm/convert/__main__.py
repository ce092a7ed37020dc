"""python -m minillm.convert SRC --out weights/NAME.safetensors [--dtype float32|bfloat16|float16 | --keep-quant]"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..checkpoint import read_metadata
from ..flags import Parser, add_input, add_output, fail
from . import DTYPES, ConvertError, convert


def make_parser() -> Parser:
    ap = Parser(prog="python -m minillm.convert",
                                 description="Convert a Hugging Face model (local directory or hub id: GPT-2, "
                                             "LLaMA-style: Llama, Mistral, Qwen2, Qwen3) or a GGUF file (llama, "
                                             "qwen2, qwen3) into minillm's .safetensors format.")
    add_input(ap, "src", help="HF model directory, hub id (e.g. gpt2, HuggingFaceTB/SmolLM2-135M), or file.gguf")
    add_output(ap, "--out", required=True, help="output file, e.g. weights/NAME.safetensors (its directory must exist)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="stored weight dtype (default float32)")
    ap.add_argument("--keep-quant", action="store_true",
                    help="GGUF only: write a quantized checkpoint (int4 group 32 / int8, as minillm.quantize makes) "
                         "that keeps the file's Q4_0/Q4_1/Q4_K codes instead of going through float; "
                         "the provenance lists what was kept and what was quantized from float")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
    if args.keep_quant and args.dtype != "float32":
        ap.error("--keep-quant writes integer codes with bf16 scales; --dtype does not apply")
    t0 = time.perf_counter()
    try:
        out = convert(args.src, args.out, dtype=args.dtype, progress=not args.quiet and sys.stderr.isatty(),
                      keep_quant=args.keep_quant)  # in a log, no bar: the one line is the "wrote" below
    except (ConvertError, OSError) as e:
        return fail(str(e))
    size = out.stat().st_size
    meta = read_metadata(out)
    provenance = json.loads(meta["provenance"])
    what = args.dtype
    if args.keep_quant:
        what = f"quantized {meta['quantization']}; " + ", ".join(f"{n} {k}" for k, n in provenance["keep_quant"].items())
    print(f"wrote {out} ({size / 1e6:.1f} MB, {what}) in {time.perf_counter() - t0:.1f}s")
    source_size = Path(args.src).stat().st_size if Path(args.src).is_file() else 0
    if source_size and not args.keep_quant and size > 1.5 * source_size:
        halve = ", --dtype bfloat16 halves this file" if args.dtype == "float32" else ""
        print(f"note: {size / source_size:.1f}x the size of {args.src} ({source_size / 1e6:.1f} MB), whose weights are "
              f"quantized: --keep-quant stores it quantized (4-bit blocks copied as they are where they map; see README){halve}")
    if "context" in provenance:  # a sliding window capped the context
        print(f"note: {provenance['context']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
