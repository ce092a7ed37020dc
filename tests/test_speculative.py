"""Speculative decoding: greedy == target greedy, sampled output ~ target law (chi-square), caches, stops.

The statistical tests drive the real loop (SpeculativeDecoder) with toy "models": bigram tables plus a
per-position bias, which return fixed logits and write a dummy KV cache, so the cache bookkeeping
(start_pos must equal the cache length, crops) is exercised too. The exact law of the next L tokens is
enumerated, and a chi-square goodness-of-fit test (cells with expected count < 5 pooled) must give
p > 1e-4 for the correct loop; negative controls (broken residual, shared uniform) must give p < 1e-4.
"""

import pytest
import torch
import torch.nn as nn
from scipy.stats import chisquare

import minillm.speculative as spec
from minillm.config import ModelConfig
from minillm.generate import stream_tokens
from minillm.kv_cache import KVCache
from minillm.model import Transformer
from minillm.sampling import SamplingParams, process_logits
from minillm.speculative import SpecStats, SpeculativeDecoder, speculative_generate_batch, speculative_stream

V, BLOCK = 8, 16


class ToyLM(nn.Module):
    """logits(token at position t) = table[token] + pos_bias[t]: a bigram model with a position term
    (so feeding a token at the wrong position changes the law). Keeps a 1-layer dummy KV cache and
    insists that every write appends exactly at the cache's length (no silent overwrite of stale state)."""

    def __init__(self, table: torch.Tensor, pos_bias: torch.Tensor):
        super().__init__()
        self.config = ModelConfig(vocab_size=table.size(0), block_size=BLOCK, n_layer=1, n_head=1, n_embd=1)
        self.tok_emb = nn.Embedding.from_pretrained(table.float())
        self.register_buffer("pos_bias", pos_bias.float())

    def forward(self, tokens, cache=None, start_pos=0, last_only=False):
        B, T = tokens.shape
        if cache is not None:
            assert start_pos == cache.length, (start_pos, cache.length)
            z = torch.zeros(B, 1, T, 1)
            cache.update(0, z, z, start_pos)
        return self.tok_emb(tokens) + self.pos_bias[start_pos:start_pos + T]


def toy_pair(seed=0, scale=1.5, draft_noise=1.0):
    g = torch.Generator().manual_seed(seed)
    table, bias = torch.randn(V, V, generator=g) * scale, torch.randn(BLOCK, V, generator=g) * 0.5
    target = ToyLM(table, bias)
    draft = ToyLM(table + torch.randn(V, V, generator=g) * draft_noise, bias + torch.randn(BLOCK, V, generator=g) * 0.3)
    return target, draft


def exact_law(model: ToyLM, prompt: list[int], L: int, params: SamplingParams) -> torch.Tensor:
    """P(x_1..x_L | prompt) for every sequence, as a flat tensor indexed by sum x_i V^(L-i)."""
    law = torch.ones(1)
    seqs = [list(prompt)]
    for _ in range(L):
        logits = torch.stack([model.tok_emb.weight[s[-1]] + model.pos_bias[len(s) - 1] for s in seqs])
        probs = process_logits(logits, params).softmax(-1)  # what plain sampling draws from
        law = (law[:, None] * probs).reshape(-1)
        seqs = [s + [x] for s in seqs for x in range(V)]
    return law


def chi2_p(samples: torch.Tensor, law: torch.Tensor) -> float:
    """samples (N, L) of token ids vs the exact law over V^L cells; cells with expected < 5 pooled."""
    N, L = samples.shape
    idx = (samples * (V ** torch.arange(L - 1, -1, -1))).sum(-1)
    observed = torch.bincount(idx, minlength=law.numel()).double()
    expected = law.double() * N
    assert observed[expected == 0].sum() == 0, "a sequence the target can never produce was sampled"
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()  # exact up to float rounding
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


PROMPT, L = [3, 1], 3


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests are thousands of tiny ops: intra-op threads only add synchronisation (10x slower on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_many(target, draft, params, k, rows, batch, seed=0):
    """`rows` independent continuations of PROMPT (L tokens), `batch` rows per synchronised run."""
    g = torch.Generator().manual_seed(seed)
    out = [speculative_generate_batch(target, draft, [PROMPT] * batch, L, k, params, g) for _ in range(rows // batch)]
    return torch.cat(out)


# Sample sizes: 20,000 sequences over 8^3 = 512 cells (pooled where expected < 5), drawn 50 rows per
# synchronised batch (the loop's cost is per call, not per row), threshold p > 1e-4. The negative
# controls (8,000 and 2,000 sequences) give p < 1e-20. Each case takes ~2-3 s on one CPU core. The
# batch-1 path (multi-token steps, bonus tokens) has its own smaller test below.
N_ROWS, BATCH = 20_000, 50
CASES = {
    "plain": SamplingParams(temperature=1.0),
    "temperature_0.7": SamplingParams(temperature=0.7),
    "top_k_3": SamplingParams(temperature=1.0, top_k=3),
    "top_p_0.8": SamplingParams(temperature=1.0, top_p=0.8),
}


@pytest.mark.parametrize("name", CASES)
def test_sampled_output_follows_target_law(name):
    params = CASES[name]
    target, draft = toy_pair()
    samples = run_many(target, draft, params, k=2, rows=N_ROWS, batch=BATCH)
    p = chi2_p(samples, exact_law(target, PROMPT, L, params))
    assert p > 1e-4, f"{name}: chi-square p = {p:.2e}"


def test_batch_one_follows_target_law():
    """The batch-1 path (no synchronisation; a close draft, so multi-token steps and bonus tokens are
    common) with k=3 > L-1, so max_new_tokens clamps k. 2,000 runs, p > 1e-4."""
    target, draft = toy_pair(seed=1, draft_noise=0.3)
    params = SamplingParams(temperature=1.0)
    stats = SpecStats()
    g = torch.Generator().manual_seed(1)
    samples = torch.cat([speculative_generate_batch(target, draft, [PROMPT], L, 3, params, g, stats=stats)
                         for _ in range(2000)])
    assert stats.accept_hist[2] > 500  # L=3 clamps k to 2; all-accepted steps (bonus path) are frequent
    assert chi2_p(samples, exact_law(target, PROMPT, L, params)) > 1e-4


def test_disjoint_draft_everything_rejected_output_still_target():
    """With top-k 2 on both, the target's support is in ids 0..3 and the draft's in 4..7: every draft
    is rejected and each token comes from the residual, which must then be the target's p."""
    target, draft = toy_pair(seed=2)
    target.tok_emb.weight.data[:, :V // 2] += 10
    draft.tok_emb.weight.data[:, V // 2:] += 10
    params = SamplingParams(temperature=1.0, top_k=2)
    stats = SpecStats()
    g = torch.Generator().manual_seed(2)
    samples = torch.cat([speculative_generate_batch(target, draft, [PROMPT] * 50, L, 2, params, g, stats=stats)
                         for _ in range(160)])
    assert stats.drafts_accepted == 0 and stats.drafts_proposed > 0
    assert chi2_p(samples, exact_law(target, PROMPT, L, params)) > 1e-4


@pytest.mark.parametrize("broken", ["resample_from_p", "shared_uniform"])
def test_negative_controls_fail(monkeypatch, broken):
    """The same test must reject a broken loop: it has power."""
    if broken == "resample_from_p":
        monkeypatch.setattr(spec, "residual", lambda p_target, q_draft: p_target)
    else:
        def shared(batch, k, generator, device):
            return torch.rand(batch, 1, generator=generator).expand(batch, k)
        monkeypatch.setattr(spec, "uniforms", shared)
    target, draft = toy_pair()
    params = SamplingParams(temperature=1.0)
    # A shared uniform only matters when one step accepts several drafts: batch 1 (the synchronised
    # min over 50 rows is almost always 0), 2,000 runs.
    rows, batch = (8_000, BATCH) if broken == "resample_from_p" else (2_000, 1)
    samples = run_many(target, draft, params, k=2, rows=rows, batch=batch)
    p = chi2_p(samples, exact_law(target, PROMPT, L, params))
    assert p < 1e-4, p


def test_identical_draft_accepts_everything():
    target, _ = toy_pair()
    stats = SpecStats()
    out = speculative_generate_batch(target, target, [PROMPT] * 4, 12, 4, SamplingParams(temperature=1.0),
                                     torch.Generator().manual_seed(0), stats=stats)
    assert out.shape == (4, 12) and stats.drafts_accepted == stats.drafts_proposed > 0
    assert stats.target_calls == 3 and stats.accept_hist[4] == 8  # 5 + 5 + 2 tokens (the last step clamped to k=1)


# ---- real tiny transformers ----

def tiny(family, seed, n_layer=2, n_embd=32):
    torch.manual_seed(seed)
    extra = dict(n_kv_head=2) if family == "llama" else {}
    cfg = ModelConfig(family=family, vocab_size=40, block_size=64, n_layer=n_layer, n_head=4, n_embd=n_embd,
                      attn_impl="manual", **extra)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_equals_target_greedy(family):
    target = tiny(family, 0)
    random_draft = tiny(family, 1, n_layer=1, n_embd=16)
    prompt = [5, 9, 2]
    greedy = SamplingParams(temperature=0)
    want = list(stream_tokens(target, prompt, 30, greedy))
    for draft, name in ((target, "identical"), (random_draft, "random")):
        for k in (1, 2, 4, 8):
            stats = SpecStats()
            got = list(speculative_stream(target, draft, prompt, 30, k, greedy, stats=stats))
            assert got == want, (name, k)
            assert stats.new_tokens == 30
            if name == "identical":
                assert stats.drafts_accepted == stats.drafts_proposed
    # batch > 1 greedy rows equal their batch-1 output
    prompts = [[5, 9, 2], [1, 1, 7], [30, 4, 0]]
    out = speculative_generate_batch(target, random_draft, prompts, 20, 3, greedy)
    for row, pr in zip(out.tolist(), prompts):
        assert row == list(stream_tokens(target, pr, 20, greedy))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_caches_after_crop_equal_fresh_prefill(family):
    target, draft = tiny(family, 0), tiny(family, 1, n_layer=1, n_embd=16)
    dec = SpeculativeDecoder(target, draft, torch.tensor([[5, 9, 2], [7, 7, 1]]), 3, 30,
                             SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    with torch.inference_mode():
        while not dec.done:
            dec.step()
            n = dec.seq.size(1)
            assert dec.target_cache.length == n - 1
            assert n - 2 <= dec.draft_cache.length <= n - 1
            for model, cache in ((target, dec.target_cache), (draft, dec.draft_cache)):
                L = cache.length
                fresh = KVCache.for_model(model, 2, 64)
                model(dec.seq[:, :L], fresh, 0)
                for layer in range(model.config.n_layer):
                    torch.testing.assert_close(cache.k[layer][:, :, :L], fresh.k[layer][:, :, :L], atol=1e-4, rtol=0)
                    torch.testing.assert_close(cache.v[layer][:, :, :L], fresh.v[layer][:, :, :L], atol=1e-4, rtol=0)
                if n <= cache.max_len:  # next-token logits from the cropped cache == a full forward
                    nxt = model(dec.seq[:, L:], cache, L)[:, -1]
                    cache.crop(L)
                    torch.testing.assert_close(nxt, model(dec.seq)[:, -1], atol=1e-4, rtol=0)
    assert dec.seq.size(1) == 3 + 30


@pytest.mark.parametrize("n,k", [(1, 4), (5, 4), (7, 2), (13, 5), (0, 3)])
def test_max_new_tokens_exact(n, k):
    target, draft = tiny("gpt2", 0), tiny("gpt2", 0)  # identical: every step wants to emit k+1
    stats = SpecStats()
    got = list(speculative_stream(target, draft, [1, 2], n, k, SamplingParams(temperature=0.8),
                                  torch.Generator().manual_seed(0), stats=stats))
    assert len(got) == n and stats.new_tokens == n
    out = speculative_generate_batch(target, draft, [[1, 2], [3, 4]], n, k, SamplingParams(temperature=0.8),
                                     torch.Generator().manual_seed(0))
    assert out.shape == (2, n) and (out >= 0).all()


def test_eos_inside_accepted_drafts_truncates():
    target = tiny("llama", 0)
    greedy = SamplingParams(temperature=0)
    plain = list(stream_tokens(target, [5, 9, 2], 30, greedy))
    eos = plain[6]
    first = plain.index(eos)
    stats = SpecStats()
    got = list(speculative_stream(target, target, [5, 9, 2], 30, 8, greedy, eos_ids={eos}, stats=stats))
    assert got == plain[:first] and stats.stopped_by == "eos" and stats.new_tokens == first
    assert stats.accept_hist[8] >= 1  # the EOS was inside a fully accepted run of drafts
    out = speculative_generate_batch(target, target, [[5, 9, 2], [1, 1, 7]], 30, 8, greedy, eos_ids={eos}, pad_id=-1)
    assert out[0, :first].tolist() == plain[:first] and (out[0, first:] == -1).all()


def test_invalid_arguments():
    a, b = tiny("gpt2", 0), Transformer(ModelConfig(vocab_size=41, block_size=64, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="vocab_size 40.*vocab_size 41"):
        list(speculative_stream(a, b, [1], 5))
    with pytest.raises(ValueError, match="k"):
        list(speculative_stream(a, a, [1], 5, k=-1))
    with pytest.raises(ValueError, match="context"):
        list(speculative_stream(a, a, [1] * 10, 60))
    with pytest.raises(ValueError, match="equal length"):
        speculative_generate_batch(a, a, [[1, 2], [3]], 5)


def test_seeded_and_global_rng_untouched():
    target, draft = tiny("gpt2", 0), tiny("gpt2", 1, n_layer=1, n_embd=16)
    params = SamplingParams(temperature=1.0, top_k=10)
    state = torch.get_rng_state()
    run = lambda seed: list(speculative_stream(target, draft, [1, 2], 20, 3, params, torch.Generator().manual_seed(seed)))
    a, b, c = run(0), run(0), run(1)
    assert a == b and a != c and torch.equal(torch.get_rng_state(), state)
