"""Speculative decoding: greedy == target greedy, sampled output ~ target law (chi-square), caches, stops,
for both drafts (a draft model, and prompt lookup: the lookup itself is tested on handmade sequences).

The statistical tests drive the real loop (SpeculativeDecoder, through speculative_generate_batch and
speculative_stream) on real tiny transformers whose next-token law depends on the whole context, so
on what the KV caches hold after every crop: a 2-layer nano llama over a 4-token vocabulary as the
target, and as the draft either an unrelated 1-layer model (drafts often rejected: the residual path),
a separate copy of the target (every draft accepted: every step ends with the bonus token), or
prompt lookup (one-hot q_draft: a draft accepted with probability p_target(draft); its prompt holds
every token, so every step proposes k drafts).

The exact law of the first n new tokens is enumerated with uncached forwards (`exact_law`), N
sequences are sampled (`sample_sequences`), and `law_pvalues` runs chi-square goodness-of-fit tests
(scipy; cells with expected count < 5 pooled; a sequence of probability 0 gives p = 0) on the joint
law of all n tokens and on every pair (x_i, x_j), which includes the pair (x_k, x_{k+1}) where a
step's bonus token lands. The family's p-value is Bonferroni's: (number of tests) x (smallest p).
N = 10,000 sequences at batch 2,000 (one call per 2,000) and 600 at batch 1. The correct loop must
give a family p > 1e-4; each negative control (one piece broken on purpose) must give a family
p < 1e-6 in the same test, same N and seed. Everything is seeded: the tests are deterministic.
"""

import copy
import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from law import family_p, law_pvalues, rescaled_llama
from tiny import tiny_model

import minillm.speculative as spec
from minillm.config import ModelConfig
from minillm.generate import stream_tokens
from minillm.kv_cache import KVCache
from minillm.model import Transformer
from minillm.sampling import SamplingParams, process_logits
from minillm.speculative import (PromptLookup, SpecStats, SpeculativeDecoder, lookup, speculative_generate_batch,
                                 speculative_stream)

V, BLOCK = 8, 16


class ToyLM(nn.Module):
    """logits(token at position t) = table[token] + pos_bias[t]: a bigram model with a position term
    (so feeding a token at the wrong position changes the law). Keeps a 1-layer dummy KV cache and
    insists that every write appends exactly at the cache's length (no silent overwrite of stale state).
    Used for boundary cases (disjoint supports, identical models) and the stats bookkeeping."""

    def __init__(self, table: torch.Tensor, pos_bias: torch.Tensor):
        super().__init__()
        self.config = ModelConfig(vocab_size=table.size(0), block_size=BLOCK, n_layer=1, n_head=1, n_embd=2)
        self.tok_emb = nn.Embedding.from_pretrained(table.float())
        self.register_buffer("pos_bias", pos_bias.float())

    def forward(self, tokens, cache=None, start_pos=0, last_only=False):
        B, T = tokens.shape
        if cache is not None:
            assert start_pos == cache.length, (start_pos, cache.length)
            z = torch.zeros(B, 1, T, self.config.head_dim)
            cache.update(0, z, z, start_pos)
        return self.tok_emb(tokens) + self.pos_bias[start_pos:start_pos + T]


def toy_pair(seed=0, scale=1.5, draft_noise=1.0):
    g = torch.Generator().manual_seed(seed)
    table, bias = torch.randn(V, V, generator=g) * scale, torch.randn(BLOCK, V, generator=g) * 0.5
    target = ToyLM(table, bias)
    draft = ToyLM(table + torch.randn(V, V, generator=g) * draft_noise, bias + torch.randn(BLOCK, V, generator=g) * 0.3)
    return target, draft


PROMPT, L = [3, 1], 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, many small ops: see conftest


# ---- the three helpers of the statistical tests: exact law, samples, chi-square ----

@torch.inference_mode()
def exact_law(model, prompt: list[int], n: int, params: SamplingParams) -> torch.Tensor:
    """P(x_1..x_n | prompt) under plain sampling, as a float64 tensor of shape (V,) * n. Every one of
    the V^t prefixes of length t goes through an UNCACHED forward (no KV cache involved) and is extended
    by softmax(process_logits(...)) of its last position, with prompt + prefix as the history."""
    Vm = model.config.vocab_size
    law, seqs = torch.ones(1, dtype=torch.float64), torch.tensor([prompt])
    for _ in range(n):
        logits = model(seqs)[:, -1]
        probs = process_logits(logits, params, seqs if params.needs_history else None).softmax(-1).double()
        law = (law[:, None] * probs).reshape(-1)  # prefixes in lexicographic order, last token fastest
        seqs = torch.cat([seqs.repeat_interleave(Vm, 0), torch.arange(Vm).repeat(seqs.size(0))[:, None]], 1)
    return law.view((Vm,) * n)


# ---- real tiny transformers for the law tests ----

LAW_V, LAW_PROMPT = 4, [1, 2, 3]


def law_model(seed: int, n_layer: int) -> Transformer:
    """Next-token probabilities from ~0.005 to 0.9 over LAW_V tokens (see law.rescaled_llama)."""
    return rescaled_llama(seed, n_layer, LAW_V, head_gain=0.7)


@functools.cache
def law_models() -> dict:
    """The target and the drafts (models, and prompt lookup up to bigrams) by name."""
    target = law_model(0, n_layer=2)
    return {"target": target, "other": law_model(1, n_layer=1), "copy": copy.deepcopy(target),
            "lookup": PromptLookup(max_ngram=2)}


LOOKUP_PROMPT = [2, 3, 3, 1, 0, 1]  # every token occurs: the lookup always finds a match, every step proposes k drafts


@dataclass(frozen=True)
class LawCase:
    draft: str  # "other": an unrelated 1-layer model (alpha ~ 0.45); "copy": a copy of the target (alpha = 1);
    #             "lookup": prompt lookup (one-hot q_draft)
    k: int
    batch: int  # rows per speculative_generate_batch call; 1: speculative_stream
    n: int  # new tokens per sequence, all tested
    N: int  # sequences
    params: SamplingParams
    prompt: tuple[int, ...] = tuple(LAW_PROMPT)


# Batch > 1 runs B = 2000 rows per call; because of the synchronised rule (every row emits the
# smallest accepted count + 1) an "other" draft then checks only the first draft of each step (its
# acceptance or residual, the cut of the other rows), while a "copy" draft makes every step accept
# all k drafts and end with the bonus token, for every row. Batch 1 (speculative_stream) sees the
# steps in between: several accepted drafts, then a residual or the bonus.
LAW_CASES = {
    # penalties: positions 2..6 are processed with histories that include the step's own drafts
    "bonus_k5_penalties": LawCase("copy", 5, 2000, 6, 10_000,
                                  SamplingParams(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.5)),
    # two steps of k = 2: the second starts from cropped caches and the draft's "fill" of d_2
    "bonus_k2_two_steps_top_k": LawCase("copy", 2, 2000, 6, 10_000, SamplingParams(temperature=0.8, top_k=3)),
    "residual_k3_top_k": LawCase("other", 3, 2000, 6, 10_000, SamplingParams(temperature=0.8, top_k=3)),
    "batch1_k3": LawCase("other", 3, 1, 4, 600, SamplingParams(temperature=1.0)),
    # prompt lookup: q_draft one-hot, so a draft passes with probability p_target(draft) and the residual
    # is p_target without it; top-k 3 makes some drafts impossible (p = 0), the penalties read the drafts
    "lookup_k3_top_k": LawCase("lookup", 3, 2000, 6, 10_000, SamplingParams(temperature=0.8, top_k=3),
                               tuple(LOOKUP_PROMPT)),
    "lookup_k4_penalties": LawCase("lookup", 4, 2000, 6, 10_000,
                                   SamplingParams(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.5),
                                   tuple(LOOKUP_PROMPT)),
    "lookup_batch1_k3": LawCase("lookup", 3, 1, 4, 600, SamplingParams(temperature=1.0), tuple(LOOKUP_PROMPT)),
}


@functools.cache
def case_law(name: str) -> torch.Tensor:
    case = LAW_CASES[name]
    return exact_law(law_models()["target"], list(case.prompt), case.n, case.params)


def sample_sequences(case: LawCase, stats: SpecStats, seed: int = 0) -> torch.Tensor:
    """case.N sequences of case.n new tokens after case.prompt -> (N, n): batch > 1 in N / batch calls
    of speculative_generate_batch (identical prompts: every row is an independent draw), batch 1 in N
    calls of speculative_stream; one seeded generator throughout."""
    models, g, prompt = law_models(), torch.Generator().manual_seed(seed), list(case.prompt)
    target, draft = models["target"], models[case.draft]
    if case.batch == 1:
        return torch.tensor([list(speculative_stream(target, draft, prompt, case.n, case.k, case.params, g,
                                                     stats=stats)) for _ in range(case.N)])
    return torch.cat([speculative_generate_batch(target, draft, [prompt] * case.batch, case.n, case.k,
                                                 case.params, g, stats=stats) for _ in range(case.N // case.batch)])


def law_test(name: str, label: str, seed: int = 0) -> tuple[dict[str, float], SpecStats]:
    """Sample case `name` and test it against its exact law -> (p-values, the run's Stats); prints one line."""
    stats = SpecStats()
    samples = sample_sequences(LAW_CASES[name], stats, seed)
    assert samples.shape == (LAW_CASES[name].N, LAW_CASES[name].n) and (samples >= 0).all()
    ps = law_pvalues(samples, case_law(name))
    worst = min(ps, key=ps.get)
    print(f"\n{label} ({name}): family p {family_p(ps):.3g}; smallest {worst} p {ps[worst]:.3g}; joint p {ps['joint']:.3g}")
    return ps, stats


def test_law_target_depends_on_the_whole_context():
    """The law tests need a target whose next-token law is far from uniform and depends on more than the
    last token (so on what the KV cache holds): measured on p(x_3 | prompt, x_1, x_2)."""
    law = exact_law(law_models()["target"], LAW_PROMPT, 3, SamplingParams())
    cond = law / law.sum(-1, keepdim=True)  # (V, V, V): x_1, x_2 -> the law of x_3
    mean_tv = lambda a, b: float(((a - b).abs().sum(-1) / 2).mean())
    assert mean_tv(cond, cond.mean(1, keepdim=True)) > 0.2  # x_2, the last token, matters (0.33)
    assert mean_tv(cond, cond.mean(0, keepdim=True)) > 0.08  # and so does x_1, one further back (0.12)
    assert cond.max() > 0.8 and cond.min() > 1e-3  # peaked, yet every cell reachable


def _slow_if_batch1(ids, case_of):
    """Batch-1 runs cost ~5 ms per sequence (~3 s a test): mark them slow (they still run by default)."""
    return [pytest.param(i, marks=pytest.mark.slow) if LAW_CASES[case_of(i)].batch == 1 else i for i in ids]


@pytest.mark.parametrize("name", _slow_if_batch1(LAW_CASES, lambda name: name))
def test_target_law(name):
    """Each case samples N sequences (10,000 at batch 2,000; 600 at batch 1) and must pass the family
    (chi-square of the joint law and of every pair, so also (x_k, x_{k+1}) where the bonus lands;
    Bonferroni) at p > 1e-4. What each case is shown to catch (family p < 1e-6, test below):
    bonus_k5_penalties: a bonus from the wrong position, a penalty history off by one;
    residual_k3_top_k: resampling from p instead of the residual, a raw-softmax q_draft;
    batch1_k3: a bonus from the wrong position, one uniform shared across draft positions;
    lookup_k3_top_k: resampling from p instead of the residual, a q_draft that is not the lookup's point mass.
    bonus_k2_two_steps_top_k has no control of its own: it checks two full steps in a row (cropped
    caches, the draft's fill of d_k) and top-k on the bonus."""
    case = LAW_CASES[name]
    ps, stats = law_test(name, "correct loop")
    assert family_p(ps) > 1e-4, (name, ps)
    if case.draft == "copy":  # every draft accepted (also proves the draft's cache right), every step a bonus
        assert stats.drafts_accepted == stats.drafts_proposed == case.N * (case.n // (case.k + 1)) * case.k
    else:  # both the acceptance and the residual paths ran
        assert 0 < stats.drafts_accepted < stats.drafts_proposed
    if case.batch == 1:  # steps ending in a residual after accepted drafts, and in the bonus, are common
        assert sum(stats.accept_hist[1:case.k]) > case.N // 5 and stats.accept_hist[case.k] > case.N // 20


# ---- negative controls: one piece broken on purpose, the same test must reject it ----

_REAL_VERIFY, _REAL_CHOOSE = SpeculativeDecoder._verify, spec.choose


def _bonus_from_previous_position(self, d):
    """Bug: after k accepted drafts the bonus is drawn from p_target_k (d_k's own position) instead of
    p_target_{k+1} (the position after d_k). Only the bonus reads p_target_{k+1}."""
    p_target, k = _REAL_VERIFY(self, d), d.size(1)
    return torch.cat([p_target[:, :k], p_target[:, k - 1:k]], 1) if k else p_target


def _history_lags_one_draft(self, d, i):
    """Bug (off by one): the penalties at draft position i see seq + d_1..d_{i-2}, missing d_{i-1}."""
    return torch.cat([self.seq, d[:, :max(i - 1, 0)]], 1) if self.params.needs_history else None


def _residual_is_p(p_target, q_draft):
    """Bug: after a rejection, resample from p_target instead of norm(max(0, p_target - q_draft)).
    (Forgetting only the normalisation is no bug here: torch.multinomial normalises its weights.)"""
    return p_target.float()


def _q_draft_raw_softmax(logits, params, generator, history):
    """Bug: the draft samples from the processed q but reports the raw softmax as q_draft."""
    d, _ = _REAL_CHOOSE(logits, params, generator, history)
    return d, logits.float().softmax(-1)


def _lookup_q_uniform(tokens, vocab):
    """Bug: prompt lookup reports a uniform q_draft although its token was certain (q = 1/V, not 1)."""
    return torch.full((tokens.size(0), vocab), 1.0 / vocab, device=tokens.device)


def _shared_uniform(batch, k, generator, device):
    """Bug: one uniform per row, reused at every draft position (correlated acceptances)."""
    return torch.rand(batch, 1, generator=generator, device=device).expand(batch, k)


# control -> (where the piece lives, its name, the broken piece, the law case that must reject it,
# the statistic that must reject it on its own (Bonferroni-corrected like the family), or None)
CONTROLS = {
    "bonus_from_previous_position": (SpeculativeDecoder, "_verify", _bonus_from_previous_position,
                                     "bonus_k5_penalties", "x5,x6"),
    "bonus_from_previous_position_batch1": (SpeculativeDecoder, "_verify", _bonus_from_previous_position,
                                            "batch1_k3", "x3,x4"),
    "history_lags_one_draft": (SpeculativeDecoder, "_history", _history_lags_one_draft, "bonus_k5_penalties", None),
    "residual_is_p": (spec, "residual", _residual_is_p, "residual_k3_top_k", None),
    "q_draft_raw_softmax": (spec, "choose", _q_draft_raw_softmax, "residual_k3_top_k", None),
    "shared_uniform_batch1": (spec, "uniforms", _shared_uniform, "batch1_k3", None),
    "residual_is_p_lookup": (spec, "residual", _residual_is_p, "lookup_k3_top_k", None),
    "lookup_q_not_one_hot": (spec, "one_hot", _lookup_q_uniform, "lookup_k3_top_k", None),
}


@pytest.mark.parametrize("control", _slow_if_batch1(CONTROLS, lambda control: CONTROLS[control][3]))
def test_negative_control_rejected(monkeypatch, control):
    """The SAME test as test_target_law (case, N, seed), with one piece broken: the family p must be
    < 1e-6 (and, where named, the pair that the bug distorts must reject it by itself)."""
    owner, attr, broken, name, by = CONTROLS[control]
    monkeypatch.setattr(owner, attr, broken)
    ps, _ = law_test(name, control)
    assert family_p(ps) < 1e-6, f"{control}: the test failed to notice the bug ({ps})"
    if by is not None:
        assert min(1.0, len(ps) * ps[by]) < 1e-6, f"{control}: {by} alone does not reject it ({ps})"


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
    assert family_p(law_pvalues(samples, exact_law(target, PROMPT, L, params))) > 1e-4


def test_identical_draft_accepts_everything():
    target, _ = toy_pair()
    stats = SpecStats()
    out = speculative_generate_batch(target, target, [PROMPT] * 4, 12, 4, SamplingParams(temperature=1.0),
                                     torch.Generator().manual_seed(0), stats=stats)
    assert out.shape == (4, 12) and stats.drafts_accepted == stats.drafts_proposed > 0
    assert stats.calls["target"] == 3 and stats.accept_hist[4] == 8  # 5 + 5 + 2 tokens (the last step clamped to k=1)


# ---- real tiny transformers ----

SHAPE = dict(block_size=64, attn_impl="manual")  # of the tiny models (tests/tiny.py); a draft: 1 layer, width 16


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_equals_target_greedy(family):
    target = tiny_model(family, 0, **SHAPE)
    random_draft = tiny_model(family, 1, n_layer=1, n_embd=16, **SHAPE)
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
    target, draft = tiny_model(family, 0, **SHAPE), tiny_model(family, 1, n_layer=1, n_embd=16, **SHAPE)
    dec = SpeculativeDecoder(target, draft, torch.tensor([[5, 9, 2], [7, 7, 1]]), 3, 30,
                             SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    with torch.inference_mode():
        while not dec.done:
            dec.step()
            n = dec.seq.size(1)
            assert dec.target_cache.length == n - 1
            assert n - 2 <= dec.draft.cache.length <= n - 1
            for model, cache in ((target, dec.target_cache), (draft, dec.draft.cache)):
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
    # identical: every step wants to emit k+1
    target, draft = tiny_model("gpt2", 0, **SHAPE), tiny_model("gpt2", 0, **SHAPE)
    stats = SpecStats()
    got = list(speculative_stream(target, draft, [1, 2], n, k, SamplingParams(temperature=0.8),
                                  torch.Generator().manual_seed(0), stats=stats))
    assert len(got) == n and stats.new_tokens == n
    out = speculative_generate_batch(target, draft, [[1, 2], [3, 4]], n, k, SamplingParams(temperature=0.8),
                                     torch.Generator().manual_seed(0))
    assert out.shape == (2, n) and (out >= 0).all()


def test_eos_inside_accepted_drafts_truncates():
    target = tiny_model("llama", 0, **SHAPE)
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
    a = tiny_model("gpt2", 0, **SHAPE)
    b = tiny_model("gpt2", 1, vocab_size=41, block_size=64, n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(ValueError, match="vocab_size 40.*vocab_size 41"):
        list(speculative_stream(a, b, [1], 5))
    with pytest.raises(ValueError, match="k"):
        list(speculative_stream(a, a, [1], 5, k=-1))
    with pytest.raises(ValueError, match="context"):
        list(speculative_stream(a, a, [1] * 10, 60))
    with pytest.raises(ValueError, match="equal length"):
        speculative_generate_batch(a, a, [[1, 2], [3]], 5)


def test_seeded_and_global_rng_untouched():
    target, draft = tiny_model("gpt2", 0, **SHAPE), tiny_model("gpt2", 1, n_layer=1, n_embd=16, **SHAPE)
    params = SamplingParams(temperature=1.0, top_k=10)
    state = torch.get_rng_state()
    run = lambda seed: list(speculative_stream(target, draft, [1, 2], 20, 3, params, torch.Generator().manual_seed(seed)))
    a, b, c = run(0), run(0), run(1)
    assert a == b and a != c and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_with_adaptive_k_and_penalty_equals_target_greedy(family):
    """The gaps of the greedy test above: the adaptive schedule and a history processor (the penalty
    must see each position's own prefix, drafts included), batch 1 and batch > 1."""
    target, random_draft = tiny_model(family, 0, **SHAPE), tiny_model(family, 1, n_layer=1, n_embd=16, **SHAPE)
    prompts = [[5, 9, 2], [1, 1, 7], [30, 4, 0]]
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5)):
        want = [list(stream_tokens(target, pr, 25, params)) for pr in prompts]
        for draft in (target, random_draft):
            for k, adaptive in ((1, True), (4, True), (3, False)):
                stats = SpecStats()
                got = list(speculative_stream(target, draft, prompts[0], 25, k, params, stats=stats, adaptive_k=adaptive))
                assert got == want[0], (params, k, adaptive)
            out = speculative_generate_batch(target, draft, prompts, 25, 2, params, adaptive_k=True)
            assert out.tolist() == want
    # the penalty changes the greedy text here, so the check above is not vacuous
    assert list(stream_tokens(target, prompts[0], 25, SamplingParams(temperature=0))) != want[0]


def test_trace_agrees_with_stats_and_output():
    """The SpecStep trace: acceptances counted from it == the loop's stats; its acceptance decisions
    follow from its own u, p_target, q_draft; the emitted tokens concatenate to the output."""
    target, draft = tiny_model("llama", 0, **SHAPE), tiny_model("llama", 1, n_layer=1, n_embd=16, **SHAPE)
    with torch.no_grad():  # sharpen both so that drafts are sometimes accepted, sometimes not
        target.lm_head.weight.mul_(8)
        draft.lm_head.weight.mul_(8)
    for batch in (1, 3):
        steps, stats = [], SpecStats()
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
    stats = SpecStats()
    speculative_generate_batch(target, target, [PROMPT] * 2, 9, 2, SamplingParams(temperature=1.0),
                               torch.Generator().manual_seed(0), stats=stats)
    assert stats.empirical_alpha == pytest.approx(1.0) and stats.mean_k == 2 and stats.mean_accepted == 2
    text = stats.summary()
    for piece in ("acceptance histogram", "0:0 1:0 2:6", "mean accepted 2.00", "alpha = 1 - TV 1.00",
                  "3.00 tokens per target call", "target 3 calls", "draft 6 calls"):
        assert piece in text, (piece, text)
    _, draft = toy_pair(draft_noise=1.0)
    stats = SpecStats()
    speculative_generate_batch(target, draft, [PROMPT] * 100, 3, 2, SamplingParams(temperature=1.0),
                               torch.Generator().manual_seed(0), stats=stats)
    assert 0.3 < stats.empirical_alpha < 0.95  # 1 - TV of two different tables


# ---- prompt lookup: the draft that costs nothing ----

def test_lookup_proposes_what_followed_the_latest_longest_match():
    t = lambda *ids: torch.tensor(ids)
    # the last 3 tokens (1 2 3) occurred twice before: the most recent occurrence's continuation
    assert lookup(t(1, 2, 3, 7, 7, 1, 2, 3, 4, 5, 6, 1, 2, 3), 3, 3).tolist() == [4, 5, 6]
    # longest n first: the bigram (8 9) matches once (-> 5), while the unigram 9 matched later (-> 6)
    assert lookup(t(8, 9, 5, 0, 9, 6, 8, 9), 3, 1).tolist() == [5]
    assert lookup(t(8, 9, 5, 0, 9, 6, 8, 9), 1, 1).tolist() == [6]  # max_ngram 1: unigrams only
    # a 3-gram that never occurred falls back to the bigram, then to the unigram
    assert lookup(t(4, 2, 3, 9, 1, 2, 3), 3, 2).tolist() == [9, 1]
    assert lookup(t(3, 5, 1, 2, 3), 3, 2).tolist() == [5, 1]
    # nothing: the last token never occurred before, a sequence of one token, k = 0
    for ids, k in ((t(1, 2, 3, 4), 3), (t(7,), 3), (t(1, 2, 1), 0)):
        assert lookup(ids, 3, k).tolist() == []
    # the continuation runs into the end: the copy goes on from what it proposes (period 2 here)
    assert lookup(t(5, 1, 2, 1, 2), 3, 5).tolist() == [1, 2, 1, 2, 1]
    assert lookup(t(4, 4, 4), 3, 4).tolist() == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="max_ngram"):
        PromptLookup(0)


REPEATING = [[5, 9, 2, 7, 11, 5, 9, 2, 7, 11, 5, 9], [3, 8, 8, 1, 3, 8, 8, 1, 3, 8, 30, 4]]  # text that repeats


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_lookup_equals_target_greedy(family):
    """Prompt lookup at temperature 0 (and with penalties that read the drafts) is the target's greedy
    output token for token, batch 1 and batch > 1, whatever k, n and the adaptive schedule."""
    target = tiny_model(family, 0, **SHAPE)
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.3)):
        want = [list(stream_tokens(target, pr, 30, params)) for pr in REPEATING]
        for k, n, adaptive in ((1, 1, False), (4, 3, False), (8, 2, False), (2, 3, True)):
            stats = SpecStats()
            got = list(speculative_stream(target, PromptLookup(n), REPEATING[0], 30, k, params, stats=stats,
                                          adaptive_k=adaptive))
            assert got == want[0], (params, k, n, adaptive)
            assert stats.drafts_accepted > 0 and stats.calls["lookup"] == stats.calls["target"]  # not vacuous
        out = speculative_generate_batch(target, PromptLookup(3), REPEATING, 30, 4, params)
        assert out.tolist() == want


def test_lookup_steps_and_statistics():
    """Every step proposes exactly lookup(the sequence so far) (nothing where it finds no match: a plain
    step), and the statistics count what the steps did."""
    target = tiny_model("llama", 0, **SHAPE)
    with torch.no_grad():
        target.lm_head.weight.mul_(8)  # sharper: drafts are accepted at times, rejected at others
    prompt, steps, stats = [5, 9, 2, 7, 5, 9, 2, 30], [], SpecStats()  # 30 never occurred: the first step is plain
    out = list(speculative_stream(target, PromptLookup(2), prompt, 40, 3, SamplingParams(temperature=1.0),
                                  torch.Generator().manual_seed(0), stats=stats, trace=steps.append))
    seq = list(prompt)
    for s in steps:
        want = lookup(torch.tensor(seq), 2, min(3, len(prompt) + 40 - len(seq) - 1))
        assert s.drafts[0].tolist() == want.tolist() and s.start == len(seq)
        assert torch.equal(s.q_draft[0], torch.nn.functional.one_hot(s.drafts[0], target.config.vocab_size).float())
        seq += s.emitted[0].tolist()
    assert seq == prompt + out and len(out) == 40 and steps[0].k == 0
    proposing = [s for s in steps if s.k]
    assert stats.calls["target"] == stats.calls["lookup"] == len(steps) and "draft" not in stats.calls
    assert stats.plain_calls == len(steps) - len(proposing) >= 1 and sum(stats.accept_hist) == len(proposing)
    assert stats.drafts_proposed == sum(s.k for s in steps)
    assert stats.drafts_accepted == sum(int(s.n_accepted[0]) for s in steps)
    assert 0 < stats.drafts_accepted < stats.drafts_proposed
    assert stats.overlap_sum == pytest.approx(sum(float(s.p_target[0, i, s.drafts[0, i]]) for s in steps
                                                  for i in range(s.k)), rel=1e-5)  # 1 - TV = p_target(draft)
    text = stats.summary()
    for piece in ("acceptance histogram", f"({stats.plain_calls} of them with no draft)", "lookup "):
        assert piece in text, (piece, text)


SMOLLM2_REPEATS = [  # prompts whose continuation restates earlier text
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
    "The cat sat on the mat. The dog sat on the log. The cat sat on the",
    "Repeat the list: apples, pears, plums, cherries.\nThe list: apples,",
]


@pytest.mark.slow
def test_greedy_lookup_equals_greedy_on_smollm2(smollm2_ours):
    """The real SmolLM2-135M, three prompts that invite restating: prompt lookup's greedy output is plain
    greedy's, token for token, and it accepts drafts."""
    model, tok, greedy = smollm2_ours.model, smollm2_ours.tokenizer, SamplingParams(temperature=0)
    accepted = 0
    for text in SMOLLM2_REPEATS:
        ids = tok.encode(text)
        stats = SpecStats()
        got = list(speculative_stream(model, PromptLookup(3), ids, 32, 4, greedy, stats=stats))
        assert got == list(stream_tokens(model, ids, 32, greedy)), text
        accepted += stats.drafts_accepted
    assert accepted > 10
