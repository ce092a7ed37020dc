"""Shared by the statistical tests (speculative and contrastive sampling laws): tiny real transformers
whose next-token law depends on the context, and chi-square tests of sampled sequences against an
exact law."""

import itertools
import math

import torch
from scipy.stats import chisquare

from minillm.config import preset
from minillm.model import Transformer


def rescaled_llama(seed: int, n_layer: int, vocab_size: int, head_gain: float) -> Transformer:
    """A nano llama with random weights rescaled: unit-variance embeddings, every matrix with gain 2
    (attention and MLP reshape the residual stream, so the law depends on tokens far back, not only on
    the last one) and the output head scaled by head_gain. The global RNG is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Transformer(preset("nano", family="llama", vocab_size=vocab_size, n_layer=n_layer, tie_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_((1.0 if name == "tok_emb.weight" else 2.0 / math.sqrt(p.size(1))) / p.std())
        model.lm_head.weight.mul_(head_gain)
    return model.eval()


def chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit of observed counts against exact cell probabilities (same shape);
    cells with expected count < 5 are pooled into one. A count in a cell of probability 0 (a sequence
    the law can never produce) is conclusive: p = 0."""
    obs, expected = counts.double().reshape(-1), probs.double().reshape(-1) * counts.sum()
    if obs[expected == 0].sum() > 0:
        return 0.0
    big = expected >= 5
    obs = torch.cat([obs[big], obs[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()  # the law sums to 1 up to float32 rounding
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def law_pvalues(samples: torch.Tensor, law: torch.Tensor) -> dict[str, float]:
    """samples (N, n) token ids vs the exact law (V,) * n -> p-values of the joint law of all n tokens
    ("joint") and of each pair's law ("x1,x2", ..., the exact pair law summed out of the joint)."""
    N, n = samples.shape
    Vm = law.size(0)
    cells = (samples * Vm ** torch.arange(n - 1, -1, -1)).sum(-1)
    ps = {"joint": chi2_p(torch.bincount(cells, minlength=Vm ** n), law)}
    for i, j in itertools.combinations(range(n), 2):
        pair = law.sum([a for a in range(n) if a not in (i, j)])
        ps[f"x{i + 1},x{j + 1}"] = chi2_p(torch.bincount(samples[:, i] * Vm + samples[:, j], minlength=Vm * Vm), pair)
    return ps


def family_p(ps: dict[str, float]) -> float:
    """Bonferroni: the chance that the smallest of these p-values is this small under the null."""
    return min(1.0, len(ps) * min(ps.values()))
