"""The sampler: parameter checks, each processor against transformers' own classes (and the whole
pipeline against the list transformers builds, which proves the order), hypothesis properties of the
truncations, the history, greedy, seeds, and the sampled distribution."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.sampling import (SamplingParams, apply_min_p, apply_presence_frequency, apply_repetition_penalty,
                              apply_top_k, apply_top_p, apply_typical_p, ban_repeated_ngrams, process_logits, choose)

hf = pytest.importorskip("transformers.generation.logits_process")
FAST = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.1), r"temperature must be >= 0 \(0 = greedy\) and finite, got -0.1"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(temperature=float("inf")), "temperature must be >= 0"),
    (dict(top_k=0), r"top_k must be an integer >= 1 \(or None for off\), got 0"),
    (dict(top_k=2.5), r"top_k must be an integer >= 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\] \(or None for off\), got 1.5"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\] \(or None for off\), got -0.1"),
    (dict(min_p=1.01), r"min_p must be in \[0, 1\]"),
    (dict(typical_p=0.0), r"typical_p must be in \(0, 1\] \(or None for off\), got 0.0"),
    (dict(typical_p=float("nan")), r"typical_p must be in \(0, 1\]"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be a finite number > 0 \(1 = off\), got 0.0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number > 0"),
    (dict(presence_penalty=float("nan")), r"presence_penalty must be a finite number \(0 = off\), got nan"),
    (dict(frequency_penalty=float("-inf")), r"frequency_penalty must be a finite number \(0 = off\), got -inf"),
    (dict(no_repeat_ngram_size=-1), r"no_repeat_ngram_size must be an integer >= 0 \(0 = off\), got -1"),
    (dict(min_tokens_to_keep=0), r"min_tokens_to_keep must be an integer >= 1, got 0"),
])
def test_invalid_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_defaults_are_off_and_positional_order_is_kept():
    p = SamplingParams(0.5, 7, 0.9)  # old call sites pass (temperature, top_k, top_p) positionally
    assert (p.temperature, p.top_k, p.top_p) == (0.5, 7, 0.9)
    d = SamplingParams()
    assert not d.needs_history and not d.greedy
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    assert torch.equal(process_logits(logits, d), logits)  # pure ancestral sampling: nothing changed


def test_history_errors():
    logits = torch.randn(2, 5)
    params = SamplingParams(repetition_penalty=1.2)
    with pytest.raises(ValueError, match=r"need the previous token ids: call process_logits\(logits, params, history="):
        process_logits(logits, params)
    with pytest.raises(ValueError, match=r"history must be a \(batch, length\) tensor of token ids with batch 2"):
        process_logits(logits, params, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="history must hold integer token ids, got dtype torch.float32"):
        process_logits(logits, params, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="history holds token id 5, outside the vocabulary of 5"):
        process_logits(logits, params, torch.tensor([[1, 5], [0, 0]]))


# ----------------------------------------------------------------------------- transformers, processor by processor

def random_case(seed: int, B: int, V: int, T: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale, torch.randint(0, V, (B, T), generator=g)


def same(ours: torch.Tensor, theirs: torch.Tensor):
    """Same -inf pattern, finite entries equal to 1e-6 (float32)."""
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs))
    fin = torch.isfinite(theirs)
    assert torch.allclose(ours[fin], theirs[fin].float(), atol=1e-6, rtol=0)


cases = dict(seed=st.integers(0, 2**31), B=st.integers(1, 3), V=st.integers(2, 40), T=st.integers(0, 12))


@FAST
@given(**cases, penalty=st.floats(0.2, 3.0))
def test_repetition_penalty_equals_transformers(seed, B, V, T, penalty):
    logits, hist = random_case(seed, B, V, T)
    same(apply_repetition_penalty(logits, hist, penalty), hf.RepetitionPenaltyLogitsProcessor(penalty)(hist, logits.clone()))


@FAST
@given(**cases, n=st.integers(1, 4), vocab_small=st.integers(2, 4))
def test_no_repeat_ngram_equals_transformers(seed, B, V, T, n, vocab_small):
    g = torch.Generator().manual_seed(seed)
    # a small alphabet, so n-grams do repeat; ids inside the vocabulary (process_logits rejects others)
    hist = torch.randint(0, min(vocab_small, V), (B, T), generator=g)
    logits = torch.randn(B, V, generator=g)
    theirs = hf.NoRepeatNGramLogitsProcessor(n)(hist, logits.clone())
    if torch.isneginf(theirs).all(-1).any():  # we lift a ban that would leave nothing (theirs: NaN later)
        return
    same(ban_repeated_ngrams(logits, hist, n), theirs)


@FAST
@given(**cases, k=st.integers(1, 45), keep=st.integers(1, 5))
def test_top_k_equals_transformers_without_ties(seed, B, V, T, k, keep):
    logits, _ = random_case(seed, B, V, 0)  # continuous: no ties (on ties we keep exactly k; they keep all)
    params = SamplingParams(top_k=k, min_tokens_to_keep=keep)
    same(process_logits(logits, params), hf.TopKLogitsWarper(k, min_tokens_to_keep=keep)(None, logits.clone()))


@FAST
@given(**cases, p=st.floats(0.01, 0.99), keep=st.integers(1, 5))
def test_top_p_equals_transformers(seed, B, V, T, p, keep):
    logits, _ = random_case(seed, B, V, 0)
    same(apply_top_p(logits, p, keep), hf.TopPLogitsWarper(p, min_tokens_to_keep=keep)(None, logits.clone()))


@FAST
@given(**cases, min_p=st.floats(0.001, 1.0), keep=st.integers(1, 5))
def test_min_p_equals_transformers(seed, B, V, T, min_p, keep):
    logits, _ = random_case(seed, B, V, 0)
    same(apply_min_p(logits, min_p, keep), hf.MinPLogitsWarper(min_p, min_tokens_to_keep=keep)(None, logits.clone()))


@FAST
@given(**cases, mass=st.floats(0.01, 0.99), keep=st.integers(1, 5))
def test_typical_p_equals_transformers(seed, B, V, T, mass, keep):
    logits, _ = random_case(seed, B, V, 0)
    same(apply_typical_p(logits, mass, keep), hf.TypicalLogitsWarper(mass, min_tokens_to_keep=keep)(None, logits.clone()))


@FAST
@given(**cases, t=st.floats(0.05, 5.0))
def test_temperature_equals_transformers(seed, B, V, T, t):
    logits, _ = random_case(seed, B, V, 0)
    same(process_logits(logits, SamplingParams(temperature=t)), hf.TemperatureLogitsWarper(t)(None, logits.clone()))


def test_presence_and_frequency_penalties_are_the_openai_formula():
    """Not in transformers: z_v - frequency·count(v) - presence·[count(v) > 0], checked by hand."""
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.0]])
    hist = torch.tensor([[3, 3, 1, 3]])
    got = apply_presence_frequency(logits, hist, presence=0.5, frequency=0.25)
    want = torch.tensor([[1.0, -2.0 - 0.25 - 0.5, 0.5, 3.0 - 0.75 - 0.5, 0.0]])
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def hf_pipeline():
    """transformers' own processor list for a GenerationConfig (private API, the order we mirror)."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=8, n_positions=8,
                                       bos_token_id=None, eos_token_id=None))

    def build(**kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model._get_logits_processor(GenerationConfig(**kw), input_ids_seq_length=1, device="cpu")
    return build


@FAST
@given(**cases, t=st.sampled_from([0.0, 0.6, 1.0, 1.7]), k=st.sampled_from([None, 3, 20]),
       p=st.sampled_from([None, 0.5, 0.9]), min_p=st.sampled_from([None, 0.02, 0.3]),
       typ=st.sampled_from([None, 0.5, 0.95]), rep=st.sampled_from([1.0, 1.3, 0.8]), n=st.sampled_from([0, 2, 3]))
def test_whole_pipeline_equals_transformers(hf_pipeline, seed, B, V, T, t, k, p, min_p, typ, rep, n):
    """All processors at once, in transformers' order (their top_k=0 turns off their default of 50;
    their pipeline uses min_tokens_to_keep only for beam search, so it stays 1 here)."""
    logits, hist = random_case(seed, B, V, T)
    params = SamplingParams(t, k, p, min_p=min_p, typical_p=typ, repetition_penalty=rep, no_repeat_ngram_size=n)
    kw = dict(top_k=k or 0, top_p=p or 1.0, min_p=min_p, typical_p=typ or 1.0, repetition_penalty=rep,
              no_repeat_ngram_size=n)
    theirs = hf_pipeline(do_sample=t > 0, temperature=t if t > 0 else 1.0, **kw)(hist, logits.clone())
    if torch.isneginf(theirs).all(-1).any():
        return  # n-gram bans left nothing: transformers would sample from NaN; we lift the ban (tested below)
    ours = process_logits(logits, params, hist)
    if t == 0:  # greedy: transformers takes the argmax of the processed scores; ours is one-hot there
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
        assert torch.isfinite(ours).sum(-1).eq(1).all()
    else:
        same(ours, theirs)


# ----------------------------------------------------------------------------- properties

settings_props = settings(max_examples=60, deadline=None)
tied_logits = st.builds(lambda seed, B, V, levels: torch.randint(0, levels, (B, V), generator=torch.Generator()
                                                                 .manual_seed(seed)).float(),
                        st.integers(0, 2**31), st.integers(1, 3), st.integers(1, 30), st.integers(1, 4))


@settings_props
@given(logits=tied_logits, k=st.integers(1, 40))
def test_top_k_keeps_exactly_k_even_on_ties(logits, k):
    kept = torch.isfinite(apply_top_k(logits, k))
    assert kept.sum(-1).eq(min(k, logits.size(-1))).all()
    # and they are the largest: every kept logit >= every dropped one
    lo_kept = logits.masked_fill(~kept, float("inf")).min(-1).values
    hi_dropped = logits.masked_fill(kept, float("-inf")).max(-1).values
    assert (lo_kept >= hi_dropped).all()
    # and of equal logits the lower indices: the first k of a stable sort, largest first
    first_k = logits.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(-1, first_k, True))


def test_top_k_breaks_ties_by_lower_index():
    """The case hypothesis found: torch.topk(1) of [9, 0, ..., 0, 9] may give index 7."""
    logits = torch.tensor([[9.0, 0, 0, 0, 0, 0, 0, 9.0], [0, 5.0, 5.0, 5.0, 0, 0, 0, 0]])
    kept = torch.isfinite(apply_top_k(logits, 1))
    assert kept.nonzero().tolist() == [[0, 0], [1, 1]]
    kept = torch.isfinite(apply_top_k(logits, 2))
    assert kept.nonzero().tolist() == [[0, 0], [0, 7], [1, 1], [1, 2]]


@settings_props
@given(**cases, p=st.floats(0.001, 1.0))
def test_top_p_keeps_the_smallest_most_likely_set_with_mass_p(seed, B, V, T, p):
    logits, _ = random_case(seed, B, V, 0)
    probs = logits.softmax(-1)
    kept = torch.isfinite(apply_top_p(logits, p))
    mass = (probs * kept).sum(-1)
    smallest_kept = probs.masked_fill(~kept, 2.0).min(-1).values
    assert (mass >= p - 1e-6).all()  # reaches p ...
    assert ((mass - smallest_kept < p + 1e-6) | (kept.sum(-1) == 1)).all()  # ... and no smaller set would
    assert (smallest_kept >= probs.masked_fill(kept, -1.0).max(-1).values).all()  # the most likely ones


@settings_props
@given(**cases, min_p=st.floats(0.0, 1.0))
def test_min_p_keeps_exactly_the_tokens_above_min_p_times_max(seed, B, V, T, min_p):
    logits, _ = random_case(seed, B, V, 0)
    probs = logits.softmax(-1)
    kept = torch.isfinite(apply_min_p(logits, min_p))
    bar = min_p * probs.max(-1, keepdim=True).values
    assert (probs[kept] >= (bar * (1 - 1e-5)).expand_as(probs)[kept]).all()
    assert (probs[~kept] < (bar * (1 + 1e-5)).expand_as(probs)[~kept]).all()


@settings_props
@given(**cases, mass=st.floats(0.01, 1.0))
def test_typical_p_keeps_the_most_typical_tokens_up_to_mass(seed, B, V, T, mass):
    logits, _ = random_case(seed, B, V, 0)
    logp = logits.log_softmax(-1)
    gap = (-logp - (-(logp.exp() * logp).sum(-1, keepdim=True))).abs()
    kept = torch.isfinite(apply_typical_p(logits, mass))
    assert ((logp.exp() * kept).sum(-1) >= mass - 1e-6).all()
    assert (gap.masked_fill(~kept, -1).max(-1).values <= gap.masked_fill(kept, float("inf")).min(-1).values).all()


def test_typical_p_can_drop_the_most_likely_token():
    """Documented behaviour, not a bug: p = (0.4, 0.3, 0.3) has entropy 1.09 nats; the 0.3s (surprise
    1.20) are more typical than the 0.4 (0.92), so typical_p = 0.5 keeps the two 0.3s only."""
    kept = torch.isfinite(apply_typical_p(torch.tensor([[0.4, 0.3, 0.3]]).log(), 0.5))
    assert kept.tolist() == [[False, True, True]]


any_params = st.builds(SamplingParams, temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
                       top_k=st.sampled_from([None, 1, 2, 7]), top_p=st.sampled_from([None, 0.3, 0.9, 1.0]),
                       min_p=st.sampled_from([None, 0.0, 0.1, 0.9]), typical_p=st.sampled_from([None, 0.2, 0.9]),
                       repetition_penalty=st.sampled_from([1.0, 1.5, 0.7]),
                       presence_penalty=st.sampled_from([0.0, 1.0, -0.5]), frequency_penalty=st.sampled_from([0.0, 0.4]),
                       no_repeat_ngram_size=st.sampled_from([0, 1, 2]), min_tokens_to_keep=st.sampled_from([1, 3]))


@settings_props
@given(**cases, params=any_params, logits_kind=st.sampled_from(["normal", "ties", "some -inf"]))
def test_outputs_are_distributions_and_the_argmax_survives(seed, B, V, T, params, logits_kind):
    logits, hist = random_case(seed, B, V, T, scale=10.0)
    if logits_kind == "ties":
        logits = logits.round()
    elif logits_kind == "some -inf":
        logits[:, ::2] = float("-inf")
    probs = process_logits(logits, params, hist).softmax(-1)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(B), atol=1e-5)
    # the most likely token after the history processors survives every truncation but typical-p
    before = process_logits(logits, SamplingParams(repetition_penalty=params.repetition_penalty,
                                                   presence_penalty=params.presence_penalty,
                                                   frequency_penalty=params.frequency_penalty,
                                                   no_repeat_ngram_size=params.no_repeat_ngram_size), hist)
    best = before.argmax(-1)
    if params.greedy:
        assert torch.equal(probs.argmax(-1), best) and probs.max(-1).values.eq(1).all()
    elif params.typical_p is None:
        assert (probs.gather(-1, best[:, None]) > 0).all()


# ----------------------------------------------------------------------------- history details

def test_no_repeat_ngram_bans_the_completing_tokens():
    hist = torch.tensor([[1, 2, 3, 1, 2, 4, 1, 2]])  # after "1 2" came 3 and 4: both are banned
    kept = torch.isfinite(ban_repeated_ngrams(torch.zeros(1, 6), hist, 3))
    assert kept.tolist() == [[True, True, True, False, False, True]]


def test_a_ban_that_would_leave_nothing_is_lifted():
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    assert torch.equal(ban_repeated_ngrams(logits, torch.tensor([[0, 1, 2]]), 1), logits)


def test_greedy_applies_penalties_then_argmax():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    hist = torch.tensor([[0]])
    assert choose(logits, SamplingParams(temperature=0))[0].tolist() == [0]
    assert choose(logits, SamplingParams(temperature=0, repetition_penalty=1.2), history=hist)[0].tolist() == [1]
    one_hot = process_logits(logits, SamplingParams(temperature=0, repetition_penalty=1.2), hist).softmax(-1)
    assert one_hot.tolist() == [[0.0, 1.0, 0.0]]
    # choose returns the distribution it chose from: one-hot when greedy, the processed softmax else
    tokens, probs = choose(logits, SamplingParams(temperature=0, repetition_penalty=1.2), history=hist)
    assert tokens.tolist() == [1] and probs.tolist() == one_hot.tolist()
    warm = SamplingParams(temperature=0.7, top_k=2)
    assert torch.equal(choose(logits, warm, torch.Generator().manual_seed(0))[1], process_logits(logits, warm).softmax(-1))


# ----------------------------------------------------------------------------- drawing

def test_greedy_is_argmax_first_index_on_ties():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 5.0]])
    assert choose(logits, SamplingParams(temperature=0))[0].tolist() == [1, 0]


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(apply_top_p(logits, p))[0].tolist()
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    assert kept(1e-9) == [True, False, False, False]


def test_same_seed_same_tokens_and_global_rng_untouched():
    logits = torch.randn(8, 50)
    params = SamplingParams(temperature=1.3, top_k=20, top_p=0.95, min_p=0.01)
    before = torch.get_rng_state()
    a = choose(logits, params, torch.Generator().manual_seed(5))[0]
    b = choose(logits, params, torch.Generator().manual_seed(5))[0]
    c = choose(logits, params, torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_k=5),
                                    SamplingParams(min_p=0.2, repetition_penalty=1.5, frequency_penalty=0.3)])
def test_sampled_distribution_matches_processed_softmax(params):
    """200,000 draws (one vectorised call) vs softmax(process_logits): Pearson chi-square over the
    kept tokens below the 1 - 1e-4 quantile, and no removed token ever drawn."""
    from scipy.stats import chi2 as chi2_dist
    g = torch.Generator().manual_seed(0)
    logits, hist = torch.randn(1, 30, generator=g) * 2, torch.randint(0, 30, (1, 12), generator=g)
    n = 200_000
    draws = choose(logits.expand(n, -1), params, torch.Generator().manual_seed(0), hist.expand(n, -1))[0]
    counts = torch.bincount(draws, minlength=30).double()
    expected = process_logits(logits, params, hist).softmax(-1)[0].double() * n
    kept = expected > 0
    assert counts[~kept].sum() == 0
    stat = ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum().item()
    assert stat < chi2_dist.ppf(1 - 1e-4, int(kept.sum()) - 1), stat
    assert math.isfinite(stat)
