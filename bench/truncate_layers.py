"""Make a cheap same-tokenizer draft/amateur from a model by dropping layers; nothing is trained.

--layers N keeps the embedding, blocks 0..N-1, the final norm and the output head: an "early exit"
after layer N read through the original head (the logit lens). --keep "0-3,26-29" keeps any blocks
in order instead; keeping the first and the LAST few skips the middle of the network, as
self-speculative decoding does (Zhang et al. 2023, "Draft & Verify"), so the head still reads the
layers that were trained to feed it. Either way the copy shares the tokenizer and vocabulary by
construction, which speculative and contrastive decoding need, and costs the kept blocks plus the
whole head per token. Nothing is fitted to the target, so it is an honest baseline for a draft,
not a good one.

    python -m bench.truncate_layers weights/smollm2-135m.safetensors --layers 8
        -> weights/smollm2-135m-first8.safetensors
    python -m bench.truncate_layers weights/smollm2-135m.safetensors --keep 0-3,26-29
        -> weights/smollm2-135m-keep0-3_26-29.safetensors

The checkpoint's provenance records the source file, its sha256 and the layers kept.
"""

import argparse
import hashlib
import sys
from pathlib import Path


from minillm import checkpoint
from minillm.checkpoint import keep_blocks


def truncate(model, n_layers: int):
    """The model cut to its first n_layers blocks (config updated to match)."""
    total = model.config.n_layer
    if not 1 <= n_layers <= total:
        raise ValueError(f"--layers must be in 1..{total} (the model has {total} layers), got {n_layers}")
    return keep_blocks(model, list(range(n_layers)))


def parse_keep(spec: str, total: int) -> list[int]:
    """ "0-3,26-29" -> [0, 1, 2, 3, 26, 27, 28, 29]: increasing, unique, each in 0..total-1."""
    out = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            out += list(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"--keep: cannot read {part!r} (use ranges like 0-3,26-29)") from None
    if not out or out != sorted(set(out)) or out[0] < 0 or out[-1] >= total:
        raise ValueError(f"--keep {spec!r}: layers must be increasing, unique and in 0..{total - 1}")
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="source checkpoint (our .safetensors)")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", type=int, help="keep the first N layers")
    which.add_argument("--keep", help='keep these layers, e.g. "0-3,26-29"')
    ap.add_argument("--out", type=Path, help="default: <model stem>-first<N> or -keep<spec>.safetensors beside the source")
    args = ap.parse_args(argv)
    loaded = checkpoint.load_model(args.model)
    total = loaded.config.n_layer
    try:
        if args.layers is not None:
            model, kept, tag = truncate(loaded.model, args.layers), f"0..{args.layers - 1} of {total}", f"first{args.layers}"
        else:
            layers = parse_keep(args.keep, total)
            model, kept, tag = keep_blocks(loaded.model, layers), f"{layers} of {total}", "keep" + args.keep.replace(",", "_")
    except ValueError as e:
        print(f"error: {args.model}: {e}", file=sys.stderr)
        return 2
    out = args.out or args.model.with_name(f"{args.model.name.removesuffix('.safetensors')}-{tag}.safetensors")
    provenance = {"source": "bench/truncate_layers.py", "truncated_from": str(args.model),
                  "truncated_from_sha256": sha256(args.model), "kept_layers": kept,
                  "parent_provenance": loaded.provenance}
    checkpoint.save_model(out, model, loaded.tokenizer, provenance)
    print(f"{out}: layers {kept} + final norm + head, {model.num_params() / 1e6:.1f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
