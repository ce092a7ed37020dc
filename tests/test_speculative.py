"""Speculative decoding: greedy == target greedy, sampled output ~ target law (chi-square), caches, stops.

The statistical tests drive the real loop (SpeculativeDecoder) with toy "models": bigram tables plus a
per-position bias, which return fixed logits and write a dummy KV cache, so the cache bookkeeping
(start_pos must equal the cache length, crops) is exercised too. The exact law of the next L tokens is
enumerated, and a chi-square goodness-of-fit test (cells with expected count < 5 pooled) must give
p > 1e-4 for the correct loop; negative controls (raw q with a warped draft, resampling from p instead
of the residual, one uniform shared across positions, penalties fed a history without the step's
drafts) must give p < 1e-4 in the same test.
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
from minillm.generate import Stats
from minillm.speculative import SpeculativeDecoder, speculative_generate_batch, speculative_stream

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
        history = torch.tensor(seqs) if params.needs_history else None
        probs = process_logits(logits, params, history).softmax(-1)  # what plain sampling draws from
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


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, many small ops: see conftest


def law_p(params, rows, batch, k=2, pair=None, adaptive_k=False, seed=0, stats=None, extra=0):
    """Drive the real loop: `rows` independent continuations of PROMPT, `batch` rows per synchronised
    run -> chi-square p-value of their first L tokens against the target's exact law under `params`.
    `extra` more tokens per run keep max_new_tokens from clamping k (the first L are still exact draws)."""
    target, draft = toy_pair(**(pair or {}))
    g = torch.Generator().manual_seed(seed)
    samples = torch.cat([speculative_generate_batch(target, draft, [PROMPT] * batch, L + extra, k, params, g,
                                                    stats=stats, adaptive_k=adaptive_k)[:, :L]
                         for _ in range(rows // batch)])
    assert samples.shape == (rows, L) and (samples >= 0).all()
    return chi2_p(samples, exact_law(target, PROMPT, L, params))


# Two regimes, because of the synchronised rule: in a batch of B rows every row emits m+1 tokens per
# step with m = min over rows of the accepted drafts, so at B = 250 m is almost always 0. Then every
# step checks the FIRST draft of every row (acceptance, residual, processors, the synchronised cut;
# rows that accepted more stop after d_1) but several accepted drafts in one step, the bonus token,
# and what u_2 or the history of position 2 do are rare: that is the batch-1 regime's job.
#
# Vectorised regime: N = 100,000 sequences of L = 3 tokens over 8^3 = 512 cells (expected < 5 pooled),
# 250 rows per run (400 runs; the loop's cost is per call, not per row), k = 2, pass at p > 1e-4.
N_VEC, B_VEC = 100_000, 250
VEC_CASES = {
    "plain": (SamplingParams(temperature=1.0), False),
    "temperature_0.7": (SamplingParams(temperature=0.7), False),
    "top_k_3": (SamplingParams(temperature=1.0, top_k=3), False),
    "top_p_0.8": (SamplingParams(temperature=1.0, top_p=0.8), False),
    "repetition_penalty_1.5": (SamplingParams(temperature=1.0, repetition_penalty=1.5), False),
    "adaptive_k": (SamplingParams(temperature=0.8, top_k=5), True),
}

# Batch-1 regime: every run is its own batch, so a step emits all the drafts its row accepted (+1).
# A close draft (alpha ~ 0.76) makes multi-token steps the common case; k = 2 = L - 1 (adaptive: k
# starts at 1 and 3 extra tokens are generated so the grown k is not clamped before token L). Each run
# costs ~1-4 ms of Python whatever its batch, so N = 5,000 here (12-28 s per case on the shared
# 2-core box): measured, the shared-uniform control fails this test with p ~ 1e-10 and the
# history control with p ~ 1e-19, while the correct loop gives p = 0.29 (plain) and 0.91 (penalty).
N_ONE = 5_000
ONE_PAIR = dict(seed=0, draft_noise=0.5)
ONE_CASES = {
    "plain": (SamplingParams(temperature=1.0), False),
    "repetition_penalty_1.5": (SamplingParams(temperature=1.0, repetition_penalty=1.5), False),
    "adaptive_k": (SamplingParams(temperature=0.8, top_k=5), True),
}


@pytest.mark.parametrize("name", VEC_CASES)
def test_target_law_vectorised(name):
    params, adaptive = VEC_CASES[name]
    stats = Stats()
    p = law_p(params, N_VEC, B_VEC, adaptive_k=adaptive, stats=stats)
    assert p > 1e-4, f"{name}: chi-square p = {p:.2e}"
    assert 0 < stats.drafts_accepted < stats.drafts_proposed  # both the acceptance and the residual path ran
    if adaptive:  # the schedule moved k: it starts at 2 and shrinks to 1 after a rejection
        assert stats.mean_k < 2 and stats.drafts_proposed > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ONE_CASES)
def test_target_law_batch_one(name):
    params, adaptive = ONE_CASES[name]
    stats = Stats()
    p = law_p(params, N_ONE, 1, k=1 if adaptive else 2, pair=ONE_PAIR, adaptive_k=adaptive, stats=stats,
              extra=3 if adaptive else 0)
    assert p > 1e-4, f"{name}: chi-square p = {p:.2e}"
    if adaptive:  # k grew from 1 after full acceptances (+2 each), and steps accepted 2 or 3 drafts
        assert stats.mean_k > 1.3 and sum(stats.accept_hist[2:]) > N_ONE // 10
    else:  # steps that accepted both drafts (bonus token) are common
        assert stats.accept_hist[2] > N_ONE // 4


def test_disjoint_draft_everything_rejected_output_still_target():
    """With top-k 2 on both, the target's support is in ids 0..3 and the draft's in 4..7: every draft
    is rejected and each token comes from the residual, which must then be the target's p."""
    target, draft = toy_pair(seed=2)
    target.tok_emb.weight.data[:, :V // 2] += 10
    draft.tok_emb.weight.data[:, V // 2:] += 10
    params = SamplingParams(temperature=1.0, top_k=2)
    stats = Stats()
    g = torch.Generator().manual_seed(2)
    samples = torch.cat([speculative_generate_batch(target, draft, [PROMPT] * 50, L, 2, params, g, stats=stats)
                         for _ in range(160)])
    assert stats.drafts_accepted == 0 and stats.drafts_proposed > 0
    assert chi2_p(samples, exact_law(target, PROMPT, L, params)) > 1e-4


REAL_DRAFT_TOKEN = spec.draft_token


def _raw_q(logits, params, history, generator):
    """Bug: draw d from the processed q but report the raw softmax as q_draft."""
    d, _ = REAL_DRAFT_TOKEN(logits, params, history, generator)
    return d, logits.float().softmax(-1)


def _shared_uniform(batch, k, generator, device):
    """Bug: one uniform per row, reused at every draft position."""
    return torch.rand(batch, 1, generator=generator, device=device).expand(batch, k)


def _history_without_drafts(self, d, i):
    """Bug: every position gets the history before the step (earlier drafts of the step left out)."""
    return self.seq if self.params.needs_history else None


# Each control breaks one piece and runs the SAME test (regime, case, N, threshold) that the correct
# loop passes: the test has power against it.
CONTROLS = {
    "raw_q_with_warped_draft": ("draft_token", _raw_q, "vec", "top_k_3"),
    "resample_from_p": ("residual", lambda p_target, q_draft: p_target, "vec", "plain"),
    "shared_uniform": ("uniforms", _shared_uniform, "one", "plain"),
    "history_without_drafts": ("SpeculativeDecoder._history", _history_without_drafts, "one", "repetition_penalty_1.5"),
}


@pytest.mark.slow
@pytest.mark.parametrize("broken", CONTROLS)
def test_negative_controls_fail(monkeypatch, broken):
    name, fn, regime, case = CONTROLS[broken]
    if "." in name:
        cls, attr = name.split(".")
        monkeypatch.setattr(getattr(spec, cls), attr, fn)
    else:
        monkeypatch.setattr(spec, name, fn)
    if regime == "vec":
        params, adaptive = VEC_CASES[case]
        p = law_p(params, N_VEC, B_VEC, adaptive_k=adaptive)
    else:
        params, adaptive = ONE_CASES[case]
        p = law_p(params, N_ONE, 1, k=1 if adaptive else 2, pair=ONE_PAIR, adaptive_k=adaptive,
                  extra=3 if adaptive else 0)
    assert p < 1e-4, f"{broken}: the test failed to notice the bug (p = {p:.2e})"


def test_identical_draft_accepts_everything():
    target, _ = toy_pair()
    stats = Stats()
    out = speculative_generate_batch(target, target, [PROMPT] * 4, 12, 4, SamplingParams(temperature=1.0),
                                     torch.Generator().manual_seed(0), stats=stats)
    assert out.shape == (4, 12) and stats.drafts_accepted == stats.drafts_proposed > 0
    assert stats.calls["target"] == 3 and stats.accept_hist[4] == 8  # 5 + 5 + 2 tokens (the last step clamped to k=1)


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
            stats = Stats()
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
    stats = Stats()
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
    stats = Stats()
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


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_with_adaptive_k_and_penalty_equals_target_greedy(family):
    """The gaps of the greedy test above: the adaptive schedule and a history processor (the penalty
    must see each position's own prefix, drafts included), batch 1 and batch > 1."""
    target, random_draft = tiny(family, 0), tiny(family, 1, n_layer=1, n_embd=16)
    prompts = [[5, 9, 2], [1, 1, 7], [30, 4, 0]]
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5)):
        want = [list(stream_tokens(target, pr, 25, params)) for pr in prompts]
        for draft in (target, random_draft):
            for k, adaptive in ((1, True), (4, True), (3, False)):
                stats = Stats()
                got = list(speculative_stream(target, draft, prompts[0], 25, k, params, stats=stats, adaptive_k=adaptive))
                assert got == want[0], (params, k, adaptive)
            out = speculative_generate_batch(target, draft, prompts, 25, 2, params, adaptive_k=True)
            assert out.tolist() == want
    # the penalty changes the greedy text here, so the check above is not vacuous
    assert list(stream_tokens(target, prompts[0], 25, SamplingParams(temperature=0))) != want[0]


def test_trace_agrees_with_stats_and_output():
    """The SpecStep trace: acceptances counted from it == the loop's stats; its acceptance decisions
    follow from its own u, p_target, q_draft; the emitted tokens concatenate to the output."""
    target, draft = tiny("llama", 0), tiny("llama", 1, n_layer=1, n_embd=16)
    with torch.no_grad():  # sharpen both so that drafts are sometimes accepted, sometimes not
        target.lm_head.weight.mul_(8)
        draft.lm_head.weight.mul_(8)
    for batch in (1, 3):
        steps, stats = [], Stats()
        params = SamplingParams(temperature=1.0, top_k=8)
        out = speculative_generate_batch(target, draft, [[5, 9, 2]] * batch, 40, 3, params,
                                         torch.Generator().manual_seed(batch), stats=stats, adaptive_k=True,
                                         trace=steps.append)
        assert len(steps) == stats.calls["target"]
        assert sum(int(s.n_accepted.sum()) for s in steps) == stats.drafts_accepted
        assert sum(batch * s.k for s in steps) == stats.drafts_proposed
        hist = [0] * len(stats.accept_hist)
        for s in steps:
            if s.k:
                for c in s.n_accepted.tolist():
                    hist[c] += 1
        assert hist == stats.accept_hist and 0 < stats.drafts_accepted < stats.drafts_proposed
        assert torch.equal(torch.cat([s.emitted for s in steps], 1), out)
        for s in steps:
            d = s.drafts
            p_d = s.p_target[:, :s.k].gather(-1, d[..., None])[..., 0]
            q_d = s.q_draft.gather(-1, d[..., None])[..., 0]
            assert torch.equal((s.uniforms * q_d < p_d).long().cumprod(-1).sum(-1), s.n_accepted)
            assert s.m == int(s.n_accepted.min()) and torch.equal(s.emitted[:, :s.m], d[:, :s.m])
            for r in range(batch):
                tok, kind = int(s.emitted[r, -1]), s.last_kind(r)
                if kind == "bonus":
                    assert s.fix is None and s.p_target[r, s.k, tok] > 0
                elif kind == "residual":
                    assert s.fix[r, tok] > 0 and s.fix[r, int(d[r, s.m])] == 0  # a rejected draft has p < q
                else:
                    assert tok == int(d[r, s.m]) and int(s.n_accepted[r]) > s.m


def test_stats_summary_and_alpha():
    target, _ = toy_pair()
    stats = Stats()
    speculative_generate_batch(target, target, [PROMPT] * 2, 9, 2, SamplingParams(temperature=1.0),
                               torch.Generator().manual_seed(0), stats=stats)
    assert stats.empirical_alpha == pytest.approx(1.0) and stats.mean_k == 2 and stats.mean_accepted == 2
    text = stats.summary()
    for piece in ("acceptance histogram", "0:0 1:0 2:6", "mean accepted 2.00", "alpha = 1 - TV 1.00",
                  "3.00 tokens per target call", "target 3 calls", "draft 6 calls"):
        assert piece in text, (piece, text)
    _, draft = toy_pair(draft_noise=1.0)
    stats = Stats()
    speculative_generate_batch(target, draft, [PROMPT] * 100, 3, 2, SamplingParams(temperature=1.0),
                               torch.Generator().manual_seed(0), stats=stats)
    assert 0.3 < stats.empirical_alpha < 0.95  # 1 - TV of two different tables
