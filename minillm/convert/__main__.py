"""python -m minillm.convert SRC --out weights/NAME.safetensors [--dtype float32|bfloat16|float16 | --keep-quant]"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..checkpoint import read_metadata
from . import DTYPES, ConvertError, convert


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minillm.convert",
                                 description="Convert a Hugging Face model (local directory or hub id: GPT-2, "
                                             "LLaMA-style: Llama, Mistral, Qwen2, Qwen3) or a GGUF file (llama, "
                                             "qwen2, qwen3) into minillm's .safetensors format.")
    ap.add_argument("src", help="HF model directory, hub id (e.g. gpt2, HuggingFaceTB/SmolLM2-135M), or file.gguf")
    ap.add_argument("--out", required=True, help="output file, e.g. weights/NAME.safetensors (its directory must exist)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="stored weight dtype (default float32)")
    ap.add_argument("--keep-quant", action="store_true",
                    help="GGUF only: write a quantized checkpoint (int4 group 32 / int8, as minillm.quantize makes) "
                         "that keeps the file's Q4_0/Q4_1/Q4_K codes instead of going through float; "
                         "the provenance lists what was kept and what was quantized from float")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.keep_quant and args.dtype != "float32":
        ap.error("--keep-quant writes integer codes with bf16 scales; --dtype does not apply")
    t0 = time.perf_counter()
    try:
        out = convert(args.src, args.out, dtype=args.dtype, progress=not args.quiet, keep_quant=args.keep_quant)
    except (ConvertError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = out.stat().st_size
    meta = read_metadata(out)
    provenance = json.loads(meta["provenance"])
    what = args.dtype
    if args.keep_quant:
        what = f"quantized {meta['quantization']}; " + ", ".join(f"{n} {k}" for k, n in provenance["keep_quant"].items())
    print(f"wrote {out} ({size / 1e6:.1f} MB, {what}) in {time.perf_counter() - t0:.1f}s")
    if "context" in provenance:  # a sliding window capped the context
        print(f"note: {provenance['context']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
