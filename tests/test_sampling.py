"""The sampler: parameter checks, greedy, exact top-k on ties, top-p sets, and the sampled distribution."""

import pytest
import torch

from minillm.sampling import SamplingParams, apply_top_k, apply_top_p, process_logits, sample


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.1), r"temperature must be >= 0, got -0.1"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), r"top_k must be >= 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\] \(or None for off\), got 1.5"),
])
def test_invalid_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_greedy_is_argmax_and_ignores_generator():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 5.5]])
    out = sample(logits, SamplingParams(temperature=0))
    assert out.tolist() == [1, 3]


def test_top_k_keeps_exactly_k_on_ties():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])
    kept = torch.isfinite(apply_top_k(logits, 2))
    assert kept.sum().item() == 2 and not kept[0, 0] and not kept[0, 4]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(apply_top_p(logits, p))[0].tolist()
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.8) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    assert kept(1e-9) == [True, False, False, False]


def test_top_p_works_on_unsorted_rows():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.3, 0.15, 0.05, 0.5]]).log()
    kept = torch.isfinite(apply_top_p(logits, 0.7))
    assert kept.tolist() == [[False, True, False, True], [True, False, False, True]]


def test_same_seed_same_tokens_and_global_rng_untouched():
    logits = torch.randn(8, 50)
    params = SamplingParams(temperature=1.3, top_k=20, top_p=0.95)
    before = torch.get_rng_state()
    a = sample(logits, params, torch.Generator().manual_seed(5))
    b = sample(logits, params, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), before)


def test_sampled_distribution_matches_processed_softmax():
    """200,000 draws (one vectorised call) vs the expected probabilities after temperature 0.7 and
    top-k 5: Pearson chi-square with 4 degrees of freedom must stay below 20 (p ~ 5e-4), and no
    token outside the top 5 may appear."""
    torch.manual_seed(0)
    logits = torch.randn(1, 30)
    params = SamplingParams(temperature=0.7, top_k=5)
    n = 200_000
    draws = sample(logits.expand(n, -1), params, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=30).double()
    expected = process_logits(logits, params).softmax(-1)[0].double() * n
    top5 = logits[0].topk(5).indices
    assert counts.sum() == counts[top5].sum()
    chi2 = ((counts[top5] - expected[top5]) ** 2 / expected[top5]).sum().item()
    assert chi2 < 20.0, chi2
