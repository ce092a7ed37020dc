"""Pruning a real model: perplexity against sparsity for magnitude (a), depth (b) and width (c) pruning,
with and without a short distillation recovery, and decode speed against size for (b) and (c).

x axis, "removed": the fraction of the blocks' Linear weights (q, k, v, o, gate, up, down) that are
gone: zeroed for magnitude pruning (global threshold), in dropped blocks for depth, in removed MLP
channels for width. The embedding and the tied head (28M of SmolLM2-135M's 135M parameters) are
never pruned, so "removed" never reaches the whole model. Width pruning can remove at most the
MLP's share of the blocks (3/4 for SmolLM2).

Perplexity: minillm.eval.perplexity on tinyshakespeare's val part (eval_text "val": the last 10% of
the characters), its first --windows disjoint windows of --window tokens (context = stride =
window): a few windows only, to stay short on a CPU; the same windows for every model. Depth and
width scores are measured once on the full model (calibration: --calib-tokens of the train part);
every point prunes the full model afresh with them, which is what the command line does.

Recovery (--recover): for each named point, the trainer's distillation from the unpruned model
(train.py --init-from PRUNED --distill-from FULL, pure KL at T=1: --distill-alpha 1 --distill-temperature 1)
for --recover-iters steps of --recover-batch x 128 tokens of tinyshakespeare train; the trainer keeps
its best-val checkpoint (the unrecovered one if no step helped). The trainer keeps no masks, so a
magnitude-pruned model comes back dense: the bench reports its sparsity after training and then
zeroes the pruned positions again (one-shot re-masking, not masked training).

Decode speed: greedy, --new-tokens after a short prompt, KV cache, float32, --speed-threads threads
(default 1), each model saved and loaded back with load_model as a user would run it (memory-mapped
weights: a model rebuilt in memory decodes a few % slower here); every model in turn, --repeats rounds, the best round per model. Two rates: tokens per
wall second, and tokens per CPU second of this process (time.process_time), which on one thread is
the work a token takes whoever else shares the machine; the wall rate moves with the load.

    python -m bench.prune                                  # SmolLM2-135M, no recovery (~15 min on a busy 2-core CPU)
    python -m bench.prune --recover magnitude:0.5,depth:0.2,width:0.33 --recover-iters 10   # + ~10 min per point
    python -m bench.prune --speed-only                     # decode speed again, into the last run's rows
    python -m bench.prune --model weights/qwen2.5-coder-0.5b.safetensors --tag qwen2.5-coder-0.5b   # once converted
writes bench/out/prune-TAG.json, prune-TAG-ppl.png, prune-TAG-speed.png. The points are given as
fractions (--magnitude sparsities, --depth blocks dropped, --width channels removed), so the same
flags fit any model; Qwen2.5-Coder-0.5B (24 layers, mlp_hidden 4864) needs only its converted
checkpoint (its conversion is not ready at the time of writing).
"""

import argparse
import copy
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from minillm import prune as P
from minillm.checkpoint import load_model, model_tensors, save_model
from minillm.data import read_text, resolve_text_path
from minillm.eval.perplexity import eval_text, perplexity
from minillm.generate import stream_tokens
from minillm.sampling import SamplingParams
from minillm.train_config import TrainConfig
from minillm.train_setup import train

PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="weights/smollm2-135m.safetensors")
    ap.add_argument("--tag", default="smollm2-135m", help="name of the output files")
    ap.add_argument("--magnitude", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7", help="sparsities (global)")
    ap.add_argument("--magnitude-layer", default="0.3,0.5", help="sparsities (per layer, the other scope)")
    ap.add_argument("--depth", default="0.1,0.2,0.3,0.4", help="fractions of the blocks dropped")
    ap.add_argument("--width", default="0.17,0.33,0.5,0.67", help="fractions of the MLP channels removed "
                    "(the new width rounded to a multiple of 64)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--calib-tokens", type=int, default=P.CALIB_TOKENS)
    ap.add_argument("--recover", default="", help="points to recover, e.g. magnitude:0.5,depth:0.2,width:0.33")
    ap.add_argument("--recover-iters", type=int, default=10)
    ap.add_argument("--recover-batch", type=int, default=4)
    ap.add_argument("--recover-lr", type=float, default=1e-4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-speed", action="store_true", help="skip the decode-speed measurement")
    ap.add_argument("--speed-only", action="store_true",
                    help="measure decode speed again, into the rows of the last run's JSON (nothing else is redone)")
    ap.add_argument("--replot", action="store_true", help="only the table and PNGs again, from the last run's JSON")
    ap.add_argument("--speed-threads", type=int, default=1,
                    help="threads while timing decode (1: CPU time per token is then the work, whoever else runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=Path("bench/out"))
    return ap.parse_args(argv)


def floats(spec: str) -> list[float]:
    return [float(x) for x in spec.split(",") if x.strip()]


# ----------------------------------------------------------------------------- measures

def val_ids(tokenizer, windows: int, window: int) -> torch.Tensor:
    text = eval_text(read_text(resolve_text_path()), "val")
    ids = tokenizer.encode(text[:windows * window * 8])  # more than enough characters for a BPE tokenizer
    if len(ids) < windows * window:
        ids = tokenizer.encode(text)
    return torch.tensor(ids[:windows * window])


def ppl(model, ids: torch.Tensor, tokenizer, window: int) -> float:
    return perplexity(model, ids, tokenizer, context=window, stride=window).ppl


def nonzero_block_weights(model) -> int:
    return sum(int(torch.count_nonzero(m.weight)) for m in P.block_linears(model).values())


def file_bytes(model) -> int:
    """What save_model writes for the tensors (the file adds a small header)."""
    return sum(t.numel() * t.element_size() for t in model_tensors(model).values())


def zlib_bytes(model) -> int:
    """The tensors' bytes through zlib level 1: what a generic compressor makes of stored zeros."""
    z, n = zlib.compressobj(1), 0
    for t in model_tensors(model).values():
        n += len(z.compress(t.detach().contiguous().view(torch.uint8).numpy().tobytes()))
    return n + len(z.flush())


@torch.inference_mode()
def decode_rates(model, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
    """Greedy decode of new_tokens after the prompt -> (tokens per wall second, tokens per CPU second),
    both over the tokens after the first (the prompt's prefill excluded)."""
    wall = cpu = None
    n = 0
    for n, _ in enumerate(stream_tokens(model, prompt_ids, new_tokens, SamplingParams(temperature=0.0)), 1):
        if n == 1:
            wall, cpu = time.perf_counter(), time.process_time()
    return (n - 1) / (time.perf_counter() - wall), (n - 1) / (time.process_time() - cpu)


def best_rates(models: dict, prompt_ids: list[int], new_tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    """decode_rates of every model, interleaved over `repeats` rounds; the best round of each (the
    machine is shared: the best round is the least disturbed one)."""
    best = {name: (0.0, 0.0) for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            wall, cpu = decode_rates(model, prompt_ids, new_tokens)
            best[name] = (max(best[name][0], wall), max(best[name][1], cpu))
    return best


def measure_speed(rows: list[dict], prune, tokenizer, args) -> None:
    """Add tok_s (wall) and tok_cpu_s to the rows of the full model, depth, width and magnitude 50%."""
    for r in rows:  # a --speed-only run replaces every earlier measurement
        for key in ("tok_s", "tok_cpu_s", "speed_threads"):
            r.pop(key, None)
    timed = [r for r in rows if r["method"] in ("none", "depth", "width") or r["method"] == "magnitude" and r["setting"] == 0.5]
    models = {}
    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:  # each model as a user runs it: saved, then loaded
        for r in timed:
            path = Path(tmp) / "model.safetensors"
            save_model(path, prune(r["method"], r["setting"]), tokenizer)
            models[(r["method"], r["setting"])] = load_model(path).model  # memory-mapped: the file may go
            path.unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.speed_threads)
    try:
        rates = best_rates(models, tokenizer.encode(PROMPT), args.new_tokens, args.repeats)
    finally:
        torch.set_num_threads(threads)
    for r in timed:
        r["tok_s"], r["tok_cpu_s"] = (round(x, 2) for x in rates[(r["method"], r["setting"])])
        r["speed_threads"] = args.speed_threads
        print(f"{r['method']:9} {r['setting']:<6} {r['file_mib']:6.1f} MiB  {r['tok_s']:6.2f} tok/s, "
              f"{r['tok_cpu_s']:6.2f} tok per CPU second", flush=True)


# ----------------------------------------------------------------------------- the pruned models

def points(base, args) -> list[tuple[str, float]]:
    """(method, setting) of every point: a sparsity, a number of blocks dropped, or a new mlp_hidden."""
    cfg = base.config
    return ([("none", 0)] + [("magnitude", s) for s in floats(args.magnitude)]
            + [("magnitude-layer", s) for s in floats(args.magnitude_layer)]
            + [("depth", setting_of("depth", f, cfg)) for f in floats(args.depth)]
            + [("width", setting_of("width", f, cfg)) for f in floats(args.width)])


def setting_of(method: str, fraction: float, cfg) -> float:
    """A fraction (sparsity, blocks dropped, channels removed) as the setting of its method."""
    if method == "depth":
        return round(fraction * cfg.n_layer)
    if method == "width":
        return max(64, 64 * round((1 - fraction) * cfg.mlp_hidden / 64))
    return fraction


class Pruner:
    """Makes the pruned model of any point from the full one; depth and width scores measured once."""

    def __init__(self, base, calib):
        self.base, self.calib, self.sims, self.importance = base, calib, None, None

    def __call__(self, method: str, setting):
        base = self.base
        if method.startswith("magnitude"):
            model = copy.deepcopy(base)
            P.magnitude_prune(model, setting, "layer" if method == "magnitude-layer" else "global")
            return model
        if method == "depth":
            if self.sims is None:
                t0 = time.perf_counter()
                self.sims = P.block_similarity(base, self.calib)
                print(f"block similarity ({time.perf_counter() - t0:.0f} s): "
                      f"{' '.join(f'{s:.3f}' for s in self.sims)}", flush=True)
            return P.drop_blocks(base, P.most_similar(self.sims, setting))
        if method == "width":
            if self.importance is None:
                self.importance = P.mlp_channel_importance(base, self.calib)
            return P.shrink_mlp(base, P.top_channels(self.importance, setting))
        return base


def removed(model, n_linear: int) -> float:
    """The fraction of the full model's block Linear weights that this one no longer has (or has as zeros)."""
    return 1 - nonzero_block_weights(model) / n_linear


def recover(model, method: str, args, folder: Path, tokenizer) -> tuple[object, dict]:
    """The trainer's distillation from the unpruned model (see the top) -> (recovered model, notes)."""
    src = folder / f"{method}.safetensors"
    save_model(src, model, tokenizer, {"source": "bench/prune.py"})
    tc = TrainConfig(name=f"{method}-rec", out_dir=str(folder), init_from=str(src), distill_from=args.model,
                     seq_len=128, batch_size=args.recover_batch, max_iters=args.recover_iters, lr=args.recover_lr,
                     min_lr=args.recover_lr, warmup_iters=0, eval_interval=args.recover_iters, eval_iters=2,
                     distill_alpha=1.0, distill_temperature=1.0, plot=False, device="cpu")
    with torch.enable_grad():
        result = train(tc, log=lambda line: None)
    loaded = load_model(result.model_path)
    recovered = loaded.model
    notes = {"iters": args.recover_iters, "tokens": args.recover_iters * args.recover_batch * 128,
             "s_per_iter": round(result.ms_per_iter / 1000, 1), "saved_step": loaded.provenance["step"],
             "val_loss": [round(e[2], 4) for e in result.evals]}
    if method.startswith("magnitude"):  # no masks in the trainer: zero the pruned positions again
        notes["sparsity_after_training"] = round(1 - nonzero_block_weights(recovered) / P.block_linear_weights(recovered), 6)
        with torch.no_grad():
            for name, lin in P.block_linears(recovered).items():
                lin.weight[P.block_linears(model)[name].weight == 0] = 0.0
    for path in folder.glob(f"{method}*"):
        path.unlink()
    return recovered, notes


def recover_points(rows: list[dict], prune, tokenizer, ids, args) -> None:
    """Add ppl_recovered (and the run's notes) to the rows named by --recover."""
    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        for spec in [p for p in args.recover.split(",") if p.strip()]:
            method, _, fraction = spec.strip().partition(":")
            setting = setting_of(method, float(fraction), prune.base.config)
            row = next((r for r in rows if r["method"] == method and r["setting"] == setting), None)
            if row is None:
                raise SystemExit(f"--recover {spec}: no such point ({method} {setting}) among the measured ones")
            t0 = time.perf_counter()
            model, notes = recover(prune(method, setting), method, args, Path(tmp), tokenizer)
            row["ppl_recovered"], row["recovery"] = ppl(model, ids, tokenizer, args.window), notes
            print(f"recovered {method} {setting}: ppl {row['ppl']:.2f} -> {row['ppl_recovered']:.2f} "
                  f"({notes}, {time.perf_counter() - t0:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- the run

def measure(args) -> list[dict]:
    """Every point's perplexity (and sizes), then decode speed, then the recoveries. --speed-only: the
    rows of the last run's JSON, their speed measured again."""
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    base, tok = loaded.model, loaded.tokenizer
    prune = Pruner(base, P.calibration_ids(tok, None, args.calib_tokens, min(P.CALIB_SEQ_LEN, base.config.block_size)))
    if args.speed_only:
        rows = json.loads(json_path(args).read_text())["rows"]
        measure_speed(rows, prune, tok, args)
        return rows
    ids = val_ids(tok, args.windows, args.window)
    rows, n_linear = [], nonzero_block_weights(base)
    for method, setting in points(base, args):
        t0 = time.perf_counter()
        model = prune(method, setting)
        row = {"method": method, "setting": setting, "removed": round(removed(model, n_linear), 4),
               "params": model.num_params(), "n_layer": model.config.n_layer, "mlp_hidden": model.config.mlp_hidden,
               "file_mib": round(file_bytes(model) / 2**20, 1), "ppl": ppl(model, ids, tok, args.window)}
        if method in ("none", "magnitude") and setting in (0, 0.5):
            row["zlib_mib"] = round(zlib_bytes(model) / 2**20, 1)
        rows.append(row)
        print(f"{method:9} {setting:<6} removed {row['removed']:6.1%}  ppl {row['ppl']:9.2f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if not args.no_speed:
        measure_speed(rows, prune, tok, args)
    recover_points(rows, prune, tok, ids, args)
    return rows


def json_path(args) -> Path:
    return args.out_dir / f"prune-{args.tag}.json"


def print_table(rows: list[dict]) -> None:
    print("\n| method | setting | removed | params | n_layer | mlp_hidden | weights MiB | zlib MiB | ppl | ppl recovered "
          "| tok/s (wall) | tok per CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["method"], r["setting"], f"{r['removed']:.1%}", f"{r['params'] / 1e6:.1f}M", r["n_layer"],
                 r["mlp_hidden"], f"{r['file_mib']:.1f}", r.get("zlib_mib", ""), f"{r['ppl']:.2f}",
                 f"{r['ppl_recovered']:.2f}" if "ppl_recovered" in r else "",
                 f"{r['tok_s']:.1f}" if r.get("tok_s") else "", f"{r['tok_cpu_s']:.1f}" if r.get("tok_cpu_s") else ""]
        print("| " + " | ".join(str(c) for c in cells) + " |")


def pyplot():
    """matplotlib's pyplot for files (Agg), or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_ppl(plt, rows: list[dict], args) -> Path:
    base = rows[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(base["ppl"], color="gray", lw=0.8, ls=":", label=f"unpruned ({base['ppl']:.1f})")
    for method, color, style in (("magnitude", "C0", "o-"), ("magnitude-layer", "C0", "s--"), ("depth", "C1", "o-"),
                                 ("width", "C2", "o-")):
        rs = [base] + [r for r in rows if r["method"] == method]
        if len(rs) == 1:
            continue
        label = {"magnitude": "magnitude (global)", "magnitude-layer": "magnitude (per layer)"}.get(method, method)
        ax.plot([r["removed"] for r in rs], [r["ppl"] for r in rs], style, color=color, label=label)
        rec = [r for r in rs if "ppl_recovered" in r]
        if rec:
            how = ", re-masked" if method.startswith("magnitude") else ""
            ax.plot([r["removed"] for r in rec], [r["ppl_recovered"] for r in rec], "*", ms=13, color=color,
                    label=f"{label}, recovered ({rec[0]['recovery']['iters']} distillation steps{how})")
    ax.set_yscale("log"), ax.set_xlabel("fraction of the blocks' Linear weights removed")
    ax.set_ylabel(f"perplexity, tinyshakespeare val ({args.windows}x{args.window} tokens)")
    ax.set_title(f"{args.tag}: pruning"), ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=8)
    path = args.out_dir / f"prune-{args.tag}-ppl.png"
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    return path


def plot_speed(plt, rows: list[dict], args) -> Path:
    timed = [r for r in rows if r.get("tok_cpu_s")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, what in ((axes[0], "tok_cpu_s", "tokens per CPU second"), (axes[1], "tok_s", "tokens per second (wall)")):
        for method, marker, color in (("none", "s", "gray"), ("magnitude", "x", "C0"), ("depth", "o-", "C1"),
                                      ("width", "^-", "C2")):
            rs = sorted((r for r in timed if r["method"] == method), key=lambda r: r["file_mib"])
            ax.plot([r["file_mib"] for r in rs], [r[key] for r in rs], marker, ms=8, color=color,
                    label={"none": "unpruned", "magnitude": "magnitude 50% (zeros stored)"}.get(method, method))
        ax.set_xlabel("weights, MiB (float32)"), ax.set_ylabel(f"greedy decode, {what}")
        ax.grid(alpha=0.3), ax.legend(fontsize=8)
    threads = timed[0].get("speed_threads", "?") if timed else "?"
    fig.suptitle(f"{args.tag}: decode speed against size ({threads} thread, best of {args.repeats} rounds)")
    path = args.out_dir / f"prune-{args.tag}-speed.png"
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = json.loads(json_path(args).read_text())["rows"] if args.replot else measure(args)
    print_table(rows)
    out = json_path(args)
    out.write_text(json.dumps({"model": args.model, "windows": args.windows, "window": args.window,
                               "calib_tokens": args.calib_tokens, "rows": rows}, indent=1))
    plt = pyplot()
    pngs = [] if plt is None else [plot_ppl(plt, rows, args)] + ([plot_speed(plt, rows, args)]
                                                                  if any(r.get("tok_cpu_s") for r in rows) else [])
    print(f"\nwrote {out}" + "".join(f", {p}" for p in pngs) + f" ({time.perf_counter() - t0:.0f} s)"
          + ("" if plt else "; matplotlib not installed: no PNGs"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
