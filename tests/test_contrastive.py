"""Contrastive decoding: invariants on tiny random models and hand-made logits, and the sampling law
(chi-square against the exact law on a 5-token vocabulary, with negative controls)."""

import functools
import math

import pytest
import torch
from law import family_p, law_pvalues, rescaled_llama
from tiny import tiny_model

import minillm.contrastive as cd
from minillm.contrastive import (CDStats, CDStep, amateur_weight, beta_to_li_tau, contrastive_scores,
                                 contrastive_stream, plausible_head)
from minillm.generate import stream_tokens
from minillm.model import Transformer
from minillm.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, many small ops: see conftest


SHAPE = dict(block_size=64, tie_embeddings=False)  # of the tiny models (tests/tiny.py); the amateur: 1 layer, width 16


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
    # scale the expert's head so its distribution is peaked enough for a non-trivial V_head
    expert, amateur = tiny_model(request.param, 0, **SHAPE), tiny_model(request.param, 1, n_layer=1, n_embd=16, **SHAPE)
    with torch.no_grad():
        expert.lm_head.weight.mul_(SCALE)
        amateur.lm_head.weight.mul_(SCALE)
    return expert, amateur


PROMPT = [5, 9, 2, 11]
SCALE = 40  # untied lm_head scaled: |V_head| ~ 2-6 at alpha 0.01-0.1, and the contrast changes choices


def test_beta_zero_alpha_one_and_self_amateur_give_expert_greedy(pair):
    expert, amateur = pair
    want = list(stream_tokens(expert, PROMPT, 25, GREEDY))
    assert list(contrastive_stream(expert, amateur, PROMPT, 25, beta=0.0)) == want
    assert list(contrastive_stream(expert, amateur, PROMPT, 25, alpha=1.0, beta=3.0)) == want
    assert list(contrastive_stream(expert, expert, PROMPT, 25, beta=2.0)) == want


def test_contrast_changes_choices_and_stats(pair):
    expert, amateur = pair
    stats = CDStats()
    got = list(contrastive_stream(expert, amateur, PROMPT, 25, alpha=0.01, beta=2.0, stats=stats))
    assert len(got) == 25 and stats.new_tokens == 25 and len(stats.head_sizes) == 25
    assert all(h >= 1 for h in stats.head_sizes)
    assert stats.differs_from_expert > 0  # the test can fail: a contrast that never bites is caught
    assert stats.amateur_weight == pytest.approx(2 / 3)


def test_li_objective_with_converted_tau_matches_obrien_greedy(pair):
    expert, amateur = pair
    for ctx in ("full", "last_prompt_token"):
        a = list(contrastive_stream(expert, amateur, PROMPT, 20, alpha=0.05, beta=0.5, amateur_context=ctx))
        b = list(contrastive_stream(expert, amateur, PROMPT, 20, alpha=0.05, objective="li",
                                    amateur_temperature=beta_to_li_tau(0.5), amateur_context=ctx))
        assert a == b


def test_last_prompt_token_context_uses_only_last_token(pair):
    """The amateur reads [last prompt token] at position 0, then the generated tokens (vs an uncached reference)."""
    expert, amateur = pair
    a = list(contrastive_stream(expert, amateur, PROMPT, 15, alpha=0.01, beta=2.0, amateur_context="last_prompt_token"))
    # Reference: recompute each step without caches, amateur reading PROMPT[-1:] + generated.
    ids = []
    with torch.no_grad():
        for _ in range(15):
            z_e = expert(torch.tensor([PROMPT + ids]))[:, -1]
            z_a = amateur(torch.tensor([PROMPT[-1:] + ids]))[:, -1]
            scores, _ = contrastive_scores(z_e, z_a, 0.01, 2.0)
            ids.append(int(scores.argmax()))
    assert a == ids


def test_full_context_cached_equals_uncached(pair):
    expert, amateur = pair
    got = list(contrastive_stream(expert, amateur, PROMPT, 15, alpha=0.01, beta=1.0))
    ids = []
    with torch.no_grad():
        for _ in range(15):
            z_e, z_a = expert(torch.tensor([PROMPT + ids]))[:, -1], amateur(torch.tensor([PROMPT + ids]))[:, -1]
            ids.append(int(contrastive_scores(z_e, z_a, 0.01, 1.0)[0].argmax()))
    assert got == ids


def test_head_mask_hand_made():
    # expert probs ∝ exp(z): with alpha = 0.1 the threshold is max + log 0.1 = 3 - 2.303 = 0.697
    z_e = torch.tensor([[3.0, 2.0, 0.7, 0.69, -5.0]])
    z_a = torch.tensor([[5.0, 0.0, -3.0, -10.0, -10.0]])
    scores, head = contrastive_scores(z_e, z_a, alpha=0.1, beta=0.5)
    assert head.tolist() == [[True, True, True, False, False]]
    # (1+b) z_e - b z_a on the head: 4.5-2.5=2.0, 3-0=3.0, 1.05+1.5=2.55 (scores are defined up to a
    # per-row constant, here (1+b)·max z_e - b·max z_a = 2.0: compare differences)
    torch.testing.assert_close(scores[0, :3] - scores[0, 0], torch.tensor([2.0, 3.0, 2.55]) - 2.0)
    assert torch.isinf(scores[0, 3:]).all() and (scores[0, 3:] < 0).all()
    assert int(scores.argmax()) == 1  # token 3 would score 1.035+5 = 6.035 unmasked: the mask matters
    # probability-space mask p >= alpha * max p selects the same set
    p = z_e.softmax(-1)
    assert torch.equal(p >= 0.1 * p.max(), head)


def test_chosen_token_in_head_and_head_never_empty_random():
    g = torch.Generator().manual_seed(0)
    for alpha in (0.001, 0.01, 0.1, 0.5, 1.0):  # 2,000 random rows each
        z_e = torch.randn(2000, 50, generator=g) * 4
        z_a = torch.randn(2000, 50, generator=g) * 4
        z_a[:, :5] = float("-inf")  # -inf amateur logits must not produce NaN
        for obj in ("obrien", "li"):
            scores, head = contrastive_scores(z_e, z_a, alpha, 0.5, obj, 0.5)
            assert head.any(-1).all()
            assert not torch.isnan(scores).any()
            choice = scores.argmax(-1)
            assert head.gather(-1, choice[:, None]).all()
            # V_head against an independent computation, the paper's definition p_e >= alpha * max p_e
            # in float64 (entries within rounding of the threshold, e.g. the max at alpha = 1, left out)
            p = z_e.double().softmax(-1)
            threshold = alpha * p.max(-1, keepdim=True).values
            clear = (p.log() - threshold.log()).abs() > 1e-5
            assert clear.float().mean() > 0.95 and torch.equal(head[clear], (p >= threshold)[clear])
        # sampling from the scores also stays in the head
        probs = (scores / 0.7).softmax(-1)
        assert not torch.isnan(probs).any() and (probs[~head] == 0).all()


def test_probability_space_mask_equals_logit_space_mask():
    """V_head = {p_e >= alpha·max p_e} (the paper's definition) = {z_e >= log(alpha) + max z_e} (ours), on
    random rows; entries within float rounding of the threshold are left out of the comparison."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4000, 60, generator=g) * 3
    for alpha in (0.001, 0.05, 0.1, 0.5, 1.0):
        p = z.double().softmax(-1)
        prob_mask = p >= alpha * p.max(-1, keepdim=True).values
        logit_mask = plausible_head(z, alpha)
        margin = (z - (z.max(-1, keepdim=True).values + math.log(alpha))).abs()
        clear = margin > 1e-5  # (alpha = 1 puts each row's max exactly on the threshold: 1 entry in 60)
        assert clear.float().mean() > 0.98
        assert torch.equal(prob_mask[clear], logit_mask[clear])
        assert prob_mask.any(-1).all() and logit_mask.any(-1).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0, 1e9])
def test_no_nan_with_inf_and_huge_logits(beta):
    """-inf in the amateur (beta = 0 included: no 0·inf), -inf in the expert outside the head, and
    logits near float32's limit (no inf - inf): every score finite or -inf, the argmax in V_head."""
    g = torch.Generator().manual_seed(4)
    z_e = torch.randn(500, 20, generator=g) * 5
    z_a = torch.randn(500, 20, generator=g) * 5
    z_a[::2, :7] = float("-inf")
    z_e[1::3, 15:] = float("-inf")
    z_e[::5] *= 1e37  # |z| up to ~1e38
    z_a[::7] *= 1e37
    for obj in ("obrien", "li"):
        scores, head = contrastive_scores(z_e, z_a, 0.1, beta, obj, 0.5)
        assert not torch.isnan(scores).any() and not (scores == float("inf")).any()
        assert torch.isfinite(scores[head]).all() and (scores[~head] == float("-inf")).all()
        assert head.gather(-1, scores.argmax(-1, keepdim=True)).all()
        probs = (scores / 1e-3).softmax(-1)  # sampling at a low temperature stays defined
        assert not torch.isnan(probs).any()
        if obj == "obrien" and beta == 0.0:  # no contrast: the expert's choice, -inf amateur logits or not
            assert torch.equal(scores.argmax(-1), z_e.argmax(-1))


def test_bf16_inputs_no_nan():
    z_e = (torch.randn(2, 30) * 10).bfloat16()
    z_a = torch.full((2, 30), float("-inf")).bfloat16()
    z_a[:, 0] = 0
    scores, head = contrastive_scores(z_e, z_a)
    assert scores.dtype == torch.float32 and not torch.isnan(scores).any() and head.any(-1).all()


def test_sampling_option_is_seeded_and_in_head(pair):
    expert, amateur = pair
    params = SamplingParams(temperature=1.0)
    s = CDStats()
    a = list(contrastive_stream(expert, amateur, PROMPT, 20, params=params, generator=torch.Generator().manual_seed(1), stats=s))
    b = list(contrastive_stream(expert, amateur, PROMPT, 20, params=params, generator=torch.Generator().manual_seed(1)))
    assert a == b and len(a) == 20


def test_mismatched_vocab_and_bad_params_rejected():
    e, a = tiny_model("gpt2", 0, **SHAPE), tiny_model("gpt2", 1, vocab_size=41, **SHAPE)
    with pytest.raises(ValueError, match="vocab_size 40.*vocab_size 41"):
        list(contrastive_stream(e, a, PROMPT, 5))
    with pytest.raises(ValueError, match="alpha"):
        list(contrastive_stream(e, e, PROMPT, 5, alpha=0))
    with pytest.raises(ValueError, match="objective"):
        list(contrastive_stream(e, e, PROMPT, 5, objective="x"))
    with pytest.raises(ValueError, match="amateur_context"):
        list(contrastive_stream(e, e, PROMPT, 5, amateur_context="x"))


@pytest.mark.parametrize("alpha", [0, -0.5, 1.5, float("nan")])
def test_public_helpers_reject_alpha_outside_0_1(alpha):
    """alpha = 0 used to fail inside math.log with a bare "math domain error"; > 1 would give an empty head."""
    z = torch.linspace(-3, 3, 20).view(2, 10)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\], got"):
        contrastive_scores(z, z, alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\], got"):
        plausible_head(z, alpha)


def test_eos_stops(pair):
    expert, amateur = pair
    full = list(contrastive_stream(expert, amateur, PROMPT, 20, alpha=0.01, beta=1.0))
    eos = full[5]
    s = CDStats()
    got = list(contrastive_stream(expert, amateur, PROMPT, 20, alpha=0.01, beta=1.0, eos_ids={eos}, stats=s))
    assert got == full[:full.index(eos)] and s.stopped_by == "eos"


def test_conversions():
    assert amateur_weight(0.5) == pytest.approx(1 / 3)
    assert beta_to_li_tau(0.5) == pytest.approx(3.0) and math.isinf(beta_to_li_tau(0))


def test_trace_chosen_token_is_emitted_and_in_head(pair):
    """The trace records, per step, the token the loop emits; it lies in V_head; the trace's head sizes
    and differences from the expert are the stats'; the scores recomputed from the traced logits agree."""
    expert, amateur = pair
    for params in (GREEDY, SamplingParams(temperature=1.0, top_k=3)):
        steps, stats = [], CDStats()
        got = list(contrastive_stream(expert, amateur, PROMPT, 20, alpha=0.05, beta=1.0, params=params,
                                      generator=torch.Generator().manual_seed(0), stats=stats, trace=steps.append))
        assert [s.token for s in steps] == got and [s.step for s in steps] == list(range(20))
        assert all(isinstance(s, CDStep) and bool(s.head[0, s.token]) for s in steps)
        assert [int(s.head.sum()) for s in steps] == stats.head_sizes
        assert sum(s.token != s.expert_token for s in steps) == stats.differs_from_expert
        for s in steps:
            scores, head = contrastive_scores(s.z_expert, s.z_amateur, 0.05, 1.0)
            assert torch.equal(scores, s.scores) and torch.equal(head, s.head)
            assert s.expert_token == int(s.z_expert.argmax())
            if params.greedy:
                assert s.token == int(s.scores.argmax())
    # an EOS step is traced too, and its token is not emitted
    eos = got[3]
    steps = []
    out = list(contrastive_stream(expert, amateur, PROMPT, 20, alpha=0.05, beta=1.0, eos_ids={eos}, trace=steps.append))
    assert steps[-1].token == eos and len(steps) == len(out) + 1


def test_bf16_models_run_without_nan(pair):
    """bf16 expert and amateur through the real loop: scores stay float32, every choice is in V_head."""
    expert, amateur = (m.to(torch.bfloat16) for m in pair)
    try:
        steps = []
        got = list(contrastive_stream(expert, amateur, PROMPT, 10, alpha=0.05, beta=1.0, trace=steps.append))
    finally:
        for m in pair:
            m.float()
    assert len(got) == 10
    for s in steps:
        assert s.scores.dtype == torch.float32 and not torch.isnan(s.scores).any() and bool(s.head[0, s.token])


def test_penalties_act_on_the_expert_before_the_head(pair):
    expert, amateur = pair
    # beta = 0: the scores are the penalised expert logits, so CD is plain greedy with the same penalty
    penal = SamplingParams(temperature=0, repetition_penalty=1.8, frequency_penalty=0.5)
    want = list(stream_tokens(expert, PROMPT, 25, penal))
    assert want != list(stream_tokens(expert, PROMPT, 25, GREEDY))  # the penalty matters here
    assert list(contrastive_stream(expert, amateur, PROMPT, 25, beta=0.0, params=penal)) == want
    # no-repeat-ngram 1 bans every id already seen: with the contrast on, nothing repeats
    plain = list(contrastive_stream(expert, amateur, PROMPT, 25, alpha=0.01, beta=2.0))
    assert len(set(plain)) < len(plain)  # without the ban this pair repeats itself
    banned = list(contrastive_stream(expert, amateur, PROMPT, 25, alpha=0.01, beta=2.0,
                                     params=SamplingParams(temperature=0, no_repeat_ngram_size=1)))
    assert len(banned) == 25 and len(set(banned)) == 25 and not set(banned) & set(PROMPT)


# ---- the sampling law, against the exact law on a tiny vocabulary ----
#
# An expert (2 layers) and an amateur (1 layer), nano llamas over 5 tokens with random weights rescaled
# so that the next-token law depends on the whole context (so on the KV caches). The exact law of the
# first 3 sampled tokens is enumerated from the definition, independently of contrastive.py: uncached
# forwards of both models, V_head = {p_e >= alpha * max p_e} in float64, the objective's score on
# log-probabilities (a per-row constant away from the raw-logit score), softmax(score / T) on V_head.

CD_V, CD_PROMPT, CD_N = 5, [1, 2, 3], 3


def cd_model(seed: int, n_layer: int) -> Transformer:
    """Logits of std ~0.6: many tokens in V_head at alpha 0.3 (see law.rescaled_llama)."""
    return rescaled_llama(seed, n_layer, CD_V, head_gain=0.3)


@functools.cache
def cd_models() -> tuple[Transformer, Transformer]:
    return cd_model(0, n_layer=2), cd_model(1, n_layer=1)


@torch.inference_mode()
def exact_cd_law(alpha: float, beta: float = 0.5, objective: str = "obrien", amateur_temperature: float = 1.0,
                 temperature: float = 1.0) -> torch.Tensor:
    """P(x_1..x_CD_N | CD_PROMPT) of sampled contrastive decoding (amateur_context "full"), shape (V,) * n."""
    expert, amateur = cd_models()
    law, seqs = torch.ones(1, dtype=torch.float64), torch.tensor([CD_PROMPT])
    for _ in range(CD_N):
        logp_e = expert(seqs)[:, -1].double().log_softmax(-1)
        logp_a = amateur(seqs)[:, -1].double().log_softmax(-1)
        p_e, threshold = logp_e.exp(), alpha * logp_e.exp().max(-1, keepdim=True).values
        head = p_e >= threshold
        gap = (logp_e - threshold.log()).abs()
        assert alpha == 1 or gap.min() > 1e-4, "a token sits on the head's threshold: the law would hang on rounding"
        if objective == "obrien":
            score = (1 + beta) * logp_e - beta * logp_a
        else:
            score = logp_e - logp_a / amateur_temperature
        probs = (score.masked_fill(~head, -math.inf) / temperature).softmax(-1)
        law = (law[:, None] * probs).reshape(-1)
        seqs = torch.cat([seqs.repeat_interleave(CD_V, 0), torch.arange(CD_V).repeat(seqs.size(0))[:, None]], 1)
    return law.view((CD_V,) * CD_N)


def sample_cd(N: int, seed: int, temperature: float, **settings) -> torch.Tensor:
    """N runs of contrastive_stream (batch 1, one seeded generator) -> (N, CD_N) token ids."""
    expert, amateur = cd_models()
    g, params = torch.Generator().manual_seed(seed), SamplingParams(temperature=temperature)
    return torch.tensor([list(contrastive_stream(expert, amateur, CD_PROMPT, CD_N, params=params, generator=g,
                                                 **settings)) for _ in range(N)])


def law_family_p(samples: torch.Tensor, law: torch.Tensor) -> float:
    """Chi-square of the joint law of the n tokens and of every pair (x_i, x_j); Bonferroni over them."""
    ps = law_pvalues(samples, law)
    worst = min(ps, key=ps.get)
    print(f"  smallest p: {worst} {ps[worst]:.3g}; joint p {ps['joint']:.3g}")
    return family_p(ps)


CD_N_SAMPLES = 500
CD_CASES = {
    "obrien": dict(alpha=0.3, beta=1.0, temperature=1.0),
    "li": dict(alpha=0.3, objective="li", amateur_temperature=2.0, temperature=1.0),
}


@pytest.mark.parametrize("name", CD_CASES)
def test_sampling_law_matches_exact_law(name):
    """N = 500 sequences of 3 tokens (5^3 cells) must pass the chi-square family (joint + 3 pairs,
    Bonferroni) at p > 1e-4. It would catch a wrong head, score, temperature or context: see the
    controls below."""
    settings = CD_CASES[name]
    p = law_family_p(sample_cd(CD_N_SAMPLES, 0, **settings), exact_cd_law(**settings))
    print(f"{name}: family p {p:.3g}")
    assert p > 1e-4


_REAL_SCORES, _REAL_TIMED_LOGITS = cd.contrastive_scores, cd._timed_logits


def _head_dropped(z_e, z_a, alpha, *rest):
    """Bug: the plausibility constraint forgotten (every token scored): tokens outside V_head get sampled,
    sequences of probability 0, which alone give p = 0."""
    return _REAL_SCORES(z_e, z_a, 1e-30, *rest)


def _amateur_lags_one_token():
    """Bug: the amateur's logits are one step stale (as if the new token reached it a step late)."""
    last = {}

    def timed_logits(model, ids, cache, stats, role):
        z = _REAL_TIMED_LOGITS(model, ids, cache, stats, role)
        if role != "amateur":
            return z
        if len(ids) > 1:  # the prompt: a new run
            last.clear()
        stale, last["z"] = last.get("z", z), z
        return stale
    return timed_logits


CD_CONTROLS = {
    "head_dropped": ("contrastive_scores", _head_dropped),
    "amateur_lags_one_token": ("_timed_logits", _amateur_lags_one_token()),
}


@pytest.mark.parametrize("control", CD_CONTROLS)
def test_sampling_law_negative_controls_rejected(monkeypatch, control):
    """The same test as above (case "obrien", N = 500, seed 0) with one piece broken: family p < 1e-6."""
    attr, broken = CD_CONTROLS[control]
    monkeypatch.setattr(cd, attr, broken)
    settings = CD_CASES["obrien"]
    p = law_family_p(sample_cd(CD_N_SAMPLES, 0, **settings), exact_cd_law(**settings))
    print(f"{control}: family p {p:.3g}")
    assert p < 1e-6
