"""The transformer: both families, both attention paths, the KV cache, init, config errors."""

import math

import pytest
import torch

from minillm.config import ModelConfig, preset
from minillm.kv_cache import KVCache
from minillm.model import Transformer, rope_inv_freq

FAMILIES = {
    "gpt2": dict(family="gpt2"),
    "llama-gqa": dict(family="llama", n_kv_head=2),
    "llama-untied-scaled": dict(family="llama", n_kv_head=1, tie_embeddings=False, rope_theta=500000.0,
                                rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=8)),
    "qwen2-qkv-bias": dict(family="llama", n_kv_head=2, qkv_bias=True, rope_theta=1e6, tie_embeddings=False),
    "qwen3-qk-norm-wide-heads": dict(family="llama", n_kv_head=2, qk_norm=True, head_dim=16),
}


def make(name, **kw):
    torch.manual_seed(0)
    cfg = preset("nano", vocab_size=97, **{**FAMILIES[name], **kw})
    return Transformer(cfg).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_manual_attention_equals_sdpa(name):
    model = make(name, attn_impl="manual")
    x = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        manual = model(x)
        model.config.attn_impl = "sdpa"
        sdpa = model(x)
    assert (manual - sdpa).abs().max().item() <= 1e-5


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
@pytest.mark.parametrize("name", FAMILIES)
def test_cached_forward_equals_full_forward(name, attn_impl):
    """Prefill, one-token decode, multi-token append, crop + re-append: all equal the uncached logits."""
    model = make(name, attn_impl=attn_impl)
    x = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        cache = KVCache.for_model(model, batch_size=2)
        pieces = [model(x[:, :10], cache, 0)]  # prefill
        for t in range(10, 14):  # one token at a time
            pieces.append(model(x[:, t:t + 1], cache, t))
        pieces.append(model(x[:, 14:20], cache, 14))  # append several (speculative verify)
        got = torch.cat(pieces, dim=1)
        assert cache.length == 20
        assert (got - full[:, :20]).abs().max().item() <= 1e-4
        cache.crop(12)  # roll back 8 positions, then re-append different tokens
        y = x.clone()
        y[:, 12:] = torch.randint(0, 97, (2, 18), generator=torch.Generator().manual_seed(3))
        again = model(y[:, 12:25], cache, 12)
        assert (again - model(y[:, :25])[:, 12:]).abs().max().item() <= 1e-4
        last = model(y[:, 25:26], cache, 25, last_only=True)
        assert last.shape == (2, 1, 97)
        assert (last - model(y[:, :26])[:, -1:]).abs().max().item() <= 1e-4


def test_cache_errors_are_clear():
    model = make("gpt2")
    cache = KVCache.for_model(model, batch_size=1, max_len=8)
    x = torch.zeros(1, 6, dtype=torch.long)
    model(x, cache, 0)
    with pytest.raises(ValueError, match="KVCache overflow: 12 positions needed, the cache holds 8"):
        model(x, cache, 6)
    with pytest.raises(ValueError, match="past the cached length"):
        model(x[:, :1], cache, 7)
    with pytest.raises(ValueError, match="crop"):
        cache.crop(7)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, 1, dtype=torch.long), cache, 6)
    with pytest.raises(ValueError, match="context"):
        KVCache.for_model(model, max_len=33)


def test_sequence_longer_than_context_is_an_error():
    model = make("llama-gqa")
    with pytest.raises(ValueError, match=r"33 positions exceeds the model's context \(block_size=32\)"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_gpt2_init_and_tying():
    torch.manual_seed(0)
    cfg = ModelConfig(family="gpt2", n_layer=8, n_head=4, n_embd=256, vocab_size=500, block_size=16)
    model = Transformer(cfg)
    assert model.lm_head.weight is model.tok_emb.weight
    std = lambda t: t.detach().float().std().item()
    assert std(model.blocks[0].attn.q_proj.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.blocks[0].mlp.up_proj.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.blocks[0].attn.o_proj.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert std(model.blocks[0].mlp.down_proj.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.blocks[0].attn.q_proj.bias.abs().max().item() == 0
    # nanoGPT's baby config has 804,096 parameters with its own (untied-count) convention minus
    # position embeddings; ours counts the tied matrix once and includes the positions.
    baby = Transformer(preset("baby"))
    assert baby.num_params() == 4 * (12 * 128 * 128 + 13 * 128) + 65 * 128 + 64 * 128 + 2 * 128


def test_llama_has_no_biases_and_swiglu():
    model = make("llama-untied-scaled")
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith(".bias") for n in names)
    assert "blocks.0.mlp.gate_proj.weight" in names and "pos_emb.weight" not in names
    assert model.lm_head.weight is not model.tok_emb.weight
    assert model.config.mlp_hidden % 32 == 0


def test_llama3_rope_scaling_bands():
    base = preset("nano", family="llama", n_head=1, n_embd=64, rope_theta=500000.0)
    scaled = preset("nano", family="llama", n_head=1, n_embd=64, rope_theta=500000.0,
                    rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192))
    f0, f1 = rope_inv_freq(base), rope_inv_freq(scaled)
    wavelen = 2 * math.pi / f0
    fast, slow = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert torch.equal(f1[fast], f0[fast])  # short wavelengths kept
    assert torch.allclose(f1[slow], f0[slow] / 8)  # long wavelengths slowed by `factor`
    mid = ~fast & ~slow
    assert mid.any() and ((f1[mid] < f0[mid]) & (f1[mid] > f0[mid] / 8)).all()


def test_rope_tables_stay_float32_in_bf16():
    model = make("llama-gqa").to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and model.tok_emb.weight.dtype == torch.bfloat16
    out = model(torch.zeros(1, 4, dtype=torch.long))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("bad, match", [
    (dict(family="mistral"), "family"),
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(family="llama", n_kv_head=3), "n_kv_head"),
    (dict(family="gpt2", n_kv_head=2), "grouped-query"),
    (dict(attn_impl="flash"), "attn_impl"),
    (dict(rope_scaling={"factor": 8.0}), "rope_scaling"),
    (dict(dropout=1.0), "dropout"),
    (dict(head_dim=7), "head_dim"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        preset("nano", **bad)


def test_config_roundtrip():
    cfg = preset("nano", **FAMILIES["llama-untied-scaled"])
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_experts": 8})


def test_qwen_switches_add_exactly_their_tensors():
    """qkv_bias: biases on q, k, v and nowhere else; qk_norm: one hd-wide gain each for q and k;
    head_dim: q/k/v widths follow it, not n_embd / n_head."""
    names = {n: tuple(p.shape) for n, p in make("qwen2-qkv-bias").named_parameters()}
    assert {n for n in names if n.endswith(".bias")} == {f"blocks.{i}.attn.{m}_proj.bias" for i in range(2) for m in "qkv"}
    shapes = {n: tuple(p.shape) for n, p in make("qwen3-qk-norm-wide-heads").named_parameters()}
    assert shapes["blocks.0.attn.q_norm.weight"] == shapes["blocks.0.attn.k_norm.weight"] == (16,)
    assert shapes["blocks.0.attn.q_proj.weight"] == (4 * 16, 32) and shapes["blocks.0.attn.o_proj.weight"] == (32, 64)
