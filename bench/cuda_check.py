"""The CUDA checks, for a machine with a GPU (CI has none): the reference model, the speed layer, the
decoding core and the methods on it, training and sampling from the command line, all on CUDA.

    python bench/cuda_check.py            # prints one row per check: ok / FAIL and the measured gap
    python bench/cuda_check.py cpu        # the same checks on the CPU (a smoke run of this script)

Each check holds CUDA against the same rule the CPU tests use (cached == uncached logits, sped-up ==
reference, greedy speculative == greedy target, batch rows == each row alone); tolerances are looser
where CUDA's kernels reorder sums (TF32 is switched off so float32 means float32).
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from minillm.config import preset
from minillm.generate import generate_batch, stream_tokens
from minillm.kv_cache import KVCache
from minillm.model import Transformer
from minillm.sampling import SamplingParams
from minillm.speculative import speculative_stream
from minillm.speed import compile_decode, speed_up
from minillm.tokenizer import CharTokenizer

DEV = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")  # "cpu": a smoke run of this script
GREEDY = SamplingParams(temperature=0.0)
ROWS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    ROWS.append((name, bool(ok), detail))
    print(f"{'ok  ' if ok else 'FAIL'} {name:55s} {detail}", flush=True)


def lively(family: str, seed: int, **kw) -> Transformer:
    """A random nano model whose argmax moves (louder residual projections), on the GPU."""
    torch.manual_seed(seed)
    m = Transformer(preset("nano", vocab_size=96, family=family, block_size=64, **kw)).to(DEV).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(30)
    return m


def model_checks(family: str, **kw) -> None:
    m = lively(family, 0, **kw)
    x = torch.randint(0, 96, (2, 40), device=DEV)
    with torch.no_grad():
        m.config.attn_impl = "manual"
        manual = m(x)
        m.config.attn_impl = "sdpa"
        full = m(x)
        check(f"{family}: manual attention == SDPA", (manual - full).abs().max() < 1e-4, f"{(manual - full).abs().max():.1e}")
        cache = KVCache.for_model(m, 2)
        parts = [m(x[:, :30], cache, 0)] + [m(x[:, t:t + 1], cache, t) for t in range(30, 34)] + [m(x[:, 34:], cache, 34)]
        gap = (torch.cat(parts, 1) - full).abs().max()
        check(f"{family}: cached == uncached", gap < 1e-4, f"{gap:.1e}")
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            bf = m(x).float()
        check(f"{family}: bf16 autocast finite, near fp32", torch.isfinite(bf).all() and (bf - full).abs().max() < 1.0,
              f"{(bf - full).abs().max():.2e}")
        speed_up(m)
        cache = KVCache.for_model(m, 2)
        parts = [m(x[:, :30], cache, 0)] + [m(x[:, t:t + 1], cache, t) for t in range(30, 40)]
        gap = (torch.cat(parts, 1) - full).abs().max()
        check(f"{family}: speed layer == reference", gap < 1e-4, f"{gap:.1e}")
    prompt = [3, 14, 15, 9, 26]
    eager = list(stream_tokens(m, prompt, 16, GREEDY))
    compile_decode(m)
    compiled = list(stream_tokens(m, prompt, 16, GREEDY))
    check(f"{family}: compiled decode == eager greedy", compiled == eager and len(set(eager)) > 1, str(eager[:8]))


def decoding_checks() -> None:
    tok = CharTokenizer("".join(chr(32 + i) for i in range(96)))
    target, draft = lively("llama", 1, n_kv_head=2), lively("llama", 2, n_kv_head=2)
    prompts = ["Ay", "ROMEO: what", "JULIET:"]
    batch = generate_batch(target, tok, prompts, 20, GREEDY)
    alone = [stream_tokens(target, tok.encode(p), 20, GREEDY) for p in prompts]
    check("batch of unequal prompts == each row alone (greedy)", all(b.ids == list(a) for b, a in zip(batch, alone)))
    ids = tok.encode("ROMEO: what")
    want = list(stream_tokens(target, ids, 40, GREEDY))
    for k in (1, 4):
        got = list(speculative_stream(target, draft, ids, 40, k, GREEDY))
        check(f"speculative greedy == target greedy (k={k})", got == want)
    sampled = list(speculative_stream(target, draft, ids, 40, 4, SamplingParams(temperature=0.8),
                                      torch.Generator(DEV).manual_seed(0)))
    check("speculative sampling runs on CUDA", len(sampled) == 40)


def cli_checks() -> None:
    with tempfile.TemporaryDirectory() as d:
        run = [sys.executable, "train.py", "--device", DEV.type, "--max-iters", "60", "--eval-interval", "30",
               "--eval-iters", "5", "--out-dir", d, "--name", "gpu", "--no-progress"]
        r = subprocess.run(run, capture_output=True, text=True)
        check(f"train.py --device {DEV.type} (60 iterations)", r.returncode == 0, (r.stdout + r.stderr).strip().splitlines()[-1][:80])
        r = subprocess.run([sys.executable, "sample.py", "--model", f"{d}/gpu.safetensors", "--device", DEV.type,
                            "--prompt", "ROMEO:", "--max-new-tokens", "50"], capture_output=True, text=True)
        check(f"sample.py --device {DEV.type}", r.returncode == 0 and len(r.stdout) > 50, r.stderr.strip()[-80:])


if __name__ == "__main__":
    if DEV.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: nothing to check")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f"{torch.cuda.get_device_name() if DEV.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    model_checks("gpt2")
    model_checks("llama", n_kv_head=2)
    decoding_checks()
    cli_checks()
    failed = [n for n, ok, _ in ROWS if not ok]
    print(f"{len(ROWS) - len(failed)} of {len(ROWS)} checks passed" + (f"; failed: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)
