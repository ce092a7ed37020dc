"""python -m minillm.prune {magnitude,depth,width} CKPT --out OUT ...

    python -m minillm.prune magnitude weights/smollm2-135m.safetensors --out weights/smollm2-135m-sparse50.safetensors --sparsity 0.5 [--scope layer]
    python -m minillm.prune depth weights/smollm2-135m.safetensors --out weights/smollm2-135m-depth24.safetensors --drop 6
    python -m minillm.prune width weights/smollm2-135m.safetensors --out weights/smollm2-135m-mlp1024.safetensors --mlp-hidden 1024

depth and width measure the model on calibration text: --calib FILE (default tinyshakespeare),
--calib-tokens N from its train part (first 90%), in rows of --calib-seq-len. The library
(minillm/prune/__init__.py) says what each method does; the README's "Pruning" section how to
recover the loss by distillation.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import load_model, save_model
from ..data import file_sha256, resolve_text_path
from ..device import pick_device
from ..flags import Parser, add_input, add_output, add_threads, fail, integer, real
from . import (CALIB_SEQ_LEN, CALIB_TOKENS, SCOPES, block_linear_weights, calibration_ids, check_calib, check_drop, check_float,
               check_mlp_hidden, check_sparsity, magnitude_prune, prune_depth, prune_width)

FLAGS = ("sparsity", "scope", "drop", "mlp_hidden", "calib_tokens", "calib_seq_len")  # named in library errors


def make_parser() -> Parser:
    ap = Parser(prog="python -m minillm.prune", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="method", required=True)
    mag = sub.add_parser("magnitude", help="(a) zero the smallest-|w| weights of the blocks' Linear layers")
    mag.add_argument("--sparsity", type=real(0, 1, high_open=True), required=True, help="fraction of those weights set to zero, in [0, 1)")
    mag.add_argument("--scope", choices=SCOPES, default="global",
                     help="global: one threshold over all of them; layer: each matrix exactly this sparse (default global)")
    depth = sub.add_parser("depth", help="(b) drop the blocks that change the residual stream least")
    depth.add_argument("--drop", type=integer(1), required=True, help="how many blocks to remove")
    width = sub.add_parser("width", help="(c) keep the most important MLP hidden channels in every block")
    width.add_argument("--mlp-hidden", type=integer(1), required=True, help="the new MLP width (same in every block)")
    for p in (mag, depth, width):
        add_input(p, "input", help="a float minillm checkpoint (.safetensors)")
        add_output(p, "--out", required=True, help="where to write the pruned checkpoint")
        p.add_argument("--device", default="cpu", help="where to compute: cpu (default), cuda, mps or auto")
        add_threads(p)
    for p in (depth, width):
        add_input(p, "--calib", default=None, help="calibration text file (default: tinyshakespeare)")
        p.add_argument("--calib-tokens", type=integer(2), default=CALIB_TOKENS, help=f"tokens of it to use (default {CALIB_TOKENS})")
        p.add_argument("--calib-seq-len", type=integer(2), default=None,
                       help=f"tokens per calibration row (default {CALIB_SEQ_LEN}, or the model's context if shorter)")
    return ap


def flag_message(e: BaseException) -> str:
    """A library message with the parameter it names written as this command's flag (mlp_hidden -> --mlp-hidden)."""
    message = str(e).replace("pass --data PATH", "pass --calib FILE")  # data.py's advice, in this command's flag
    for name in FLAGS:
        # a word inside a path (/tmp/drop/, width.txt) is left alone
        message = re.sub(rf"(?<![\w/\\.-]){name}(?![\w/\\-]|\.\w)", "--" + name.replace("_", "-"), message)
    return message


def main(argv: list[str] | None = None) -> int:
    """Prune as asked; every error a user can cause is one line on stderr and exit status 2."""
    args = make_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        check_args(args)
        loaded = load_model(args.input, device=pick_device(args.device))
        check_float(loaded.model, args.input)
        model, record = prune(args, loaded)
        before = (loaded.config, block_linear_weights(loaded.model), loaded.model.num_params())
        del loaded.model  # the pruned model is a new one (depth, width); free the original's memory
        provenance = {**loaded.provenance, "pruning": loaded.provenance.get("pruning", []) + [
            {**record, "source": str(args.input), "source_sha256": file_sha256(args.input)}]}
        save_model(args.out, model.cpu(), loaded.tokenizer, provenance)
    except (ValueError, OSError, RuntimeError) as e:  # CheckpointError, a bad value, an output that cannot be
        # made, a calibration text that cannot be downloaded
        return fail(flag_message(e))
    print_summary(args, model, before, record, time.perf_counter() - t0)
    return 0


def check_args(args) -> None:
    """What can be checked before the model is read: the values, that --out can be written, and that
    the calibration text is there."""
    if args.method == "magnitude":
        check_sparsity(args.sparsity)
    elif args.method == "depth":
        check_drop(None, args.drop)
    else:
        check_mlp_hidden(None, args.mlp_hidden)
    if args.method != "magnitude":
        check_calib(args.calib_tokens, args.calib_seq_len)
        resolve_text_path(args.calib)  # found (or downloaded and checked) before the model is read


def prune(args, loaded):
    """The method asked for -> (pruned model, the provenance record of this step)."""
    if args.method == "magnitude":
        return loaded.model, magnitude_prune(loaded.model, args.sparsity, args.scope)
    cfg = loaded.config
    if args.method == "depth":  # before calibrating: the cheap checks first
        check_drop(cfg.n_layer, args.drop)
    else:
        check_mlp_hidden(cfg.mlp_hidden, args.mlp_hidden)
    seq_len = args.calib_seq_len or min(CALIB_SEQ_LEN, cfg.block_size, args.calib_tokens)
    if seq_len > cfg.block_size:
        raise ValueError(f"calib_seq_len {seq_len} exceeds the model's context ({cfg.block_size} tokens)")
    calib = calibration_ids(loaded.tokenizer, args.calib, args.calib_tokens, seq_len)
    src = calib.source
    print(f"calibration: {src['tokens']} tokens of {src['file']} ({src['split']}, sha256 {src['sha256'][:12]}), "
          f"rows of {src['seq_len']}", flush=True)
    if args.method == "depth":
        return prune_depth(loaded.model, calib, args.drop)
    return prune_width(loaded.model, calib, args.mlp_hidden)


def print_summary(args, model, before, record: dict, seconds: float) -> None:
    cfg_in, linear_in, params_in = before
    cfg = model.config
    size_in, size_out = Path(args.input).stat().st_size, Path(args.out).stat().st_size
    if record["method"] == "magnitude":
        print(f"zeroed {record['zero_weights']:,} of {record['of_weights']:,} Linear weights in the blocks "
              f"({record['zero_weights'] / record['of_weights']:.1%}, scope {record['scope']}); embeddings, head, "
              f"norms and biases untouched. The file is dense float: same size, no faster (zeros are stored)")
    elif record["method"] == "depth":
        sims = record["block_similarity"]
        print("block similarity (cos of the residual stream before/after, mean over tokens; * dropped):")
        print("  " + "  ".join(f"{i}:{s:.3f}{'*' if i in record['dropped_blocks'] else ''}" for i, s in enumerate(sims)))
        print(f"dropped blocks {record['dropped_blocks']}: n_layer {cfg_in.n_layer} -> {cfg.n_layer}")
    else:
        print(f"kept the {cfg.mlp_hidden} most important of {cfg_in.mlp_hidden} MLP channels in each block "
              f"(importance: {record['importance']}): mlp_hidden {cfg_in.mlp_hidden} -> {cfg.mlp_hidden}")
    if record["method"] == "magnitude":  # same shapes: what changed is how many weights are not zero
        linear_out, kind = linear_in - record["zero_weights"], "nonzero "
    else:
        linear_out, kind = block_linear_weights(model), ""
    print(f"wrote {args.out}: {model.num_params() / 1e6:.2f}M parameters (from {params_in / 1e6:.2f}M; {kind}block "
          f"Linear weights {linear_out / 1e6:.2f}M from {linear_in / 1e6:.2f}M), {size_out / 2**20:.1f} MiB "
          f"(from {size_in / 2**20:.1f} MiB), {seconds:.1f} s")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
