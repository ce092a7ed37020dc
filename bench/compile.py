"""When does `--compile` pay? For each model: eager decode speed, the compile time of the one-token
step (cold: a fresh inductor cache; warm: the same cache again, as a second run of sample.py finds it),
compiled decode speed, and the number of generated tokens after which compiling saves time:
compile_s / (1/eager_tok_s - 1/compiled_tok_s). A third run (warm cache) compiles the step with
dynamo's own checks on every module before each step (torch.compile as it comes), which
speed.CompiledStep replaces by a check of its own: its compiled rate is the "dynamo's guards" column.

    python -m bench.compile --models weights/smollm2-135m-int4.safetensors weights/smollm2-135m-bf16.safetensors

Each model runs in a subprocess of its own (a fresh torch and inductor cache), greedy from one
20-token prompt, --tokens new tokens per measured run, --threads threads.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time



def measure(path: str, tokens: int, threads: int, guards: str = "ours") -> dict:
    """In this process: eager rate, compile (warm_up) time, compiled rate, for one model; guards="dynamo":
    the step compiled with dynamo's guards instead of CompiledStep's check."""
    import torch

    from minillm.checkpoint import load_model
    from minillm.generate import Stats, stream_tokens
    from minillm.sampling import SamplingParams
    from minillm.speed import compile_decode, speed_up, warm_up
    torch.set_num_threads(threads)
    model = speed_up(load_model(path).model)
    prompt, greedy = list(range(100, 120)), SamplingParams(temperature=0.0)

    def rate() -> tuple[float, list[int]]:
        stats = Stats()
        out = list(stream_tokens(model, prompt, tokens, greedy, stats=stats))
        return stats.tokens_per_s, out
    eager, eager_out = rate()
    compile_decode(model)
    if guards == "dynamo":
        model.compiled_step = DynamoGuards(model)
    compile_s = warm_up(model)
    compiled, compiled_out = rate()
    return {"eager_tok_s": eager, "compile_s": compile_s, "compiled_tok_s": compiled,
            "same_tokens": eager_out == compiled_out}


class DynamoGuards:
    """In CompiledStep's place: Transformer.forward through torch.compile as it comes (dynamo's own checks
    on every module before each step), and no OneCallStep."""

    def __init__(self, model):
        import torch
        from minillm.model import Transformer
        self.graph = torch.compile(functools.partial(Transformer.forward, model), dynamic=True)
        # fresh strides, as CompiledStep gives them: a column sliced from the loop's buffer recompiles the graph
        self.fresh = functools.partial(torch.clone, memory_format=torch.contiguous_format)

    def __call__(self, tokens, *args):
        return self.graph(self.fresh(tokens), *args)

    def one_call_logits(self, *args):
        return None


def run_child(path: str, tokens: int, threads: int, cache: str, guards: str = "ours") -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    out = subprocess.run([sys.executable, "-m", "bench.compile", "--child", path, "--tokens", str(tokens), "--threads", str(threads),
                          "--guards", guards],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def pays_after(compile_s: float, eager: float, compiled: float) -> float:
    saved_per_token = 1 / eager - 1 / compiled
    return compile_s / saved_per_token if saved_per_token > 0 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=[])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--guards", default="ours", choices=["ours", "dynamo"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.threads, args.guards)))
        return
    print("| model | eager tok/s | compiled tok/s | dynamo's guards | compile s (cold / warm cache) | "
          "pays after (cold / warm) | same tokens |\n|---|---|---|---|---|---|---|")
    for path in args.models:
        with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
            t0 = time.perf_counter()
            cold = run_child(path, args.tokens, args.threads, cache)
            warm = run_child(path, args.tokens, args.threads, cache)
            dynamo = run_child(path, args.tokens, args.threads, cache, "dynamo")
        eager, compiled = cold["eager_tok_s"], warm["compiled_tok_s"]
        print(f"| {path} | {eager:.1f} | {compiled:.1f} | {dynamo['compiled_tok_s']:.1f} | {cold['compile_s']:.1f} / {warm['compile_s']:.1f} | "
              f"{pays_after(cold['compile_s'], eager, compiled):,.0f} / {pays_after(warm['compile_s'], eager, compiled):,.0f}"
              f" tokens | {cold['same_tokens'] and warm['same_tokens'] and dynamo['same_tokens']} |", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
