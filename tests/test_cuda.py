"""The CUDA checks: the reference model, the speed layer, the decoding core and the methods on it,
training and sampling from the command line, all on a GPU. Skipped without CUDA (CI has none).

Each holds CUDA to the rule the CPU tests use (cached == uncached logits, sped-up == reference,
greedy speculative == greedy target, batch rows == each row alone); tolerances are looser where
CUDA's kernels reorder sums, and TF32 is switched off so that float32 means float32.
MINILLM_TEST_DEVICE=cpu runs the same tests on the CPU (a smoke run of this file).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm.config import preset
from minillm.generate import generate_batch, stream_tokens
from minillm.kv_cache import KVCache
from minillm.model import Transformer
from minillm.sampling import SamplingParams
from minillm.speculative import speculative_stream
from minillm.speed import compile_decode, speed_up
from minillm.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
DEV = torch.device(os.environ.get("MINILLM_TEST_DEVICE", "cuda"))
GREEDY = SamplingParams(temperature=0.0)
FAMILIES = [("gpt2", {}), ("llama", {"n_kv_head": 2})]

pytestmark = pytest.mark.skipif(DEV.type == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device: these tests hold the GPU to the CPU tests' rules")


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def lively(family: str, seed: int, **kw) -> Transformer:
    """A random nano model whose argmax moves (louder residual projections), on the device."""
    torch.manual_seed(seed)
    m = Transformer(preset("nano", vocab_size=96, family=family, block_size=64, **kw)).to(DEV).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(30)
    return m


def tokens() -> torch.Tensor:
    return torch.randint(0, 96, (2, 40), device=DEV, generator=torch.Generator(DEV).manual_seed(0))


@pytest.mark.parametrize("family,kw", FAMILIES)
@torch.no_grad()
def test_manual_attention_matches_sdpa(family, kw):
    m, x = lively(family, 0, **kw), tokens()
    m.config.attn_impl = "manual"
    manual = m(x)
    m.config.attn_impl = "sdpa"
    assert (manual - m(x)).abs().max() < 1e-4


@pytest.mark.parametrize("family,kw", FAMILIES)
@torch.no_grad()
def test_cached_matches_uncached(family, kw):
    m, x = lively(family, 0, **kw), tokens()
    cache = KVCache.for_model(m, 2)
    parts = [m(x[:, :30], cache, 0)] + [m(x[:, t:t + 1], cache, t) for t in range(30, 34)] + [m(x[:, 34:], cache, 34)]
    assert (torch.cat(parts, 1) - m(x)).abs().max() < 1e-4


@pytest.mark.parametrize("family,kw", FAMILIES)
@torch.no_grad()
def test_bf16_autocast_is_finite_and_near_fp32(family, kw):
    m, x = lively(family, 0, **kw), tokens()
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        bf = m(x).float()
    assert torch.isfinite(bf).all() and (bf - m(x)).abs().max() < 1.0


@pytest.mark.parametrize("family,kw", FAMILIES)
@torch.no_grad()
def test_speed_layer_matches_reference(family, kw):
    m, x = lively(family, 0, **kw), tokens()
    full = m(x)
    speed_up(m)
    cache = KVCache.for_model(m, 2)
    parts = [m(x[:, :30], cache, 0)] + [m(x[:, t:t + 1], cache, t) for t in range(30, 40)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-4


@pytest.mark.parametrize("family,kw", FAMILIES)
def test_compiled_decode_matches_eager_greedy(family, kw):
    m, prompt = speed_up(lively(family, 0, **kw)), [3, 14, 15, 9, 26]
    eager = list(stream_tokens(m, prompt, 16, GREEDY))
    compile_decode(m)
    assert list(stream_tokens(m, prompt, 16, GREEDY)) == eager and len(set(eager)) > 1


def test_batch_of_unequal_prompts_matches_each_row_alone():
    tok, target = CharTokenizer("".join(chr(32 + i) for i in range(96))), lively("llama", 1, n_kv_head=2)
    prompts = ["Ay", "ROMEO: what", "JULIET:"]
    batch = generate_batch(target, tok, prompts, 20, GREEDY)
    assert [b.ids for b in batch] == [list(stream_tokens(target, tok.encode(p), 20, GREEDY)) for p in prompts]


@pytest.mark.parametrize("k", [1, 4])
def test_speculative_greedy_matches_target_greedy(k):
    tok = CharTokenizer("".join(chr(32 + i) for i in range(96)))
    target, draft = lively("llama", 1, n_kv_head=2), lively("llama", 2, n_kv_head=2)
    ids = tok.encode("ROMEO: what")
    assert list(speculative_stream(target, draft, ids, 40, k, GREEDY)) == list(stream_tokens(target, ids, 40, GREEDY))


def test_speculative_sampling_runs():
    target, draft = lively("llama", 1, n_kv_head=2), lively("llama", 2, n_kv_head=2)
    sampled = speculative_stream(target, draft, [3, 14, 15], 40, 4, SamplingParams(temperature=0.8),
                                 torch.Generator(DEV).manual_seed(0))
    assert len(list(sampled)) == 40


@pytest.mark.slow
def test_train_and_sample_from_the_command_line(tmp_path):
    run = [sys.executable, "train.py", "--device", DEV.type, "--max-iters", "60", "--eval-interval", "30",
           "--eval-iters", "5", "--out-dir", str(tmp_path), "--name", "gpu", "--no-progress"]
    r = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "sample.py", "--model", str(tmp_path / "gpu.safetensors"), "--device", DEV.type,
                        "--prompt", "ROMEO:", "--max-new-tokens", "50"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and len(r.stdout) > 50, r.stderr[-2000:]
