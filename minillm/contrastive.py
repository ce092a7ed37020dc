"""Contrastive decoding: prefer tokens the big "expert" likes much more than the small "amateur" does.

Two objectives, both restricted to the plausible head V_head = {j : z_e[j] >= log(alpha) + max z_e}
(the adaptive plausibility constraint; softmax's normaliser cancels on both sides, so this is the same
set as {j : p_e[j] >= alpha * max p_e}, computed without tiny probabilities):

* objective="obrien" (default; O'Brien & Lewis 2023): score = (1+beta)·z_e - beta·z_a on raw logits.
* objective="li" (Li et al. 2022): score = log p_e - log p_a / tau, with the amateur's log-probs
  divided by the amateur temperature tau (as the reference code does: it scales log-probs, it does
  not re-softmax).

Conversion, for the argmax (greedy) only: (1+beta)·z_e - beta·z_a = (1+beta)·(z_e - w·z_a) with
amateur weight w = beta/(1+beta) in [0, 1), and log-softmax normalisers are constant per step, so
O'Brien's beta picks the same token as Li's objective with 1/tau = w, i.e. tau = (1+beta)/beta
(beta = 0.5 is tau = 3: a gentle contrast; Li's GPT-2 setting tau = 0.5 is w = 2). Sampling is not
invariant: with `params.temperature > 0` we sample from softmax(score / temperature) of the chosen
objective (the O'Brien score is (1+beta) times sharper than z_e - w·z_a).

Scores are computed in float32 and masked AFTER the subtraction (masked_fill -inf). Before
subtracting, each model's logits are shifted so that their maximum is 0 (a per-row constant: it
changes neither the argmax nor a softmax over the scores) and the amateur's -inf entries are floored
at -1e30. Inside the head the expert term is then bounded (between (1+beta)·log(alpha) and 0) and the
amateur term is finite, so no inf - inf (huge logits) or 0·inf (beta = 0) can make a NaN; scores are
clamped to +-1e30 so a softmax over them (sampling) stays defined. Scores are therefore reported up to
that constant: compare them within a step, not across steps.

Tracing (optional, `trace=callable`): after each step the callable receives a CDStep with both
models' logits, the scores, the V_head mask and the chosen token (the loop's own tensors; nothing
extra is computed when no trace is given). The inspector prints these.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .generate import Stats, check_budget, check_prompts, check_same_vocab, next_logits
from .kv_cache import KVCache
from .sampling import SamplingParams, apply_history_processors, choose

OBJECTIVES = ("obrien", "li")
AMATEUR_CONTEXTS = ("full", "last_prompt_token")


def amateur_weight(beta: float) -> float:
    """O'Brien's beta as the amateur weight w of z_e - w·z_a (same argmax)."""
    return beta / (1 + beta)


def beta_to_li_tau(beta: float) -> float:
    """The Li amateur temperature tau whose greedy choice equals O'Brien's beta (tau = 1/w)."""
    return (1 + beta) / beta if beta > 0 else math.inf


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha <= 1:  # `not` also rejects NaN
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")


def plausible_head(z_expert: torch.Tensor, alpha: float) -> torch.Tensor:
    """Bool mask (B, V) of V_head: z_e >= log(alpha) + max z_e, for alpha in (0, 1] (ValueError otherwise).
    Never empty (the argmax stays)."""
    _check_alpha(alpha)
    z = z_expert.float()
    return z >= z.max(-1, keepdim=True).values + math.log(alpha)


def contrastive_scores(z_expert: torch.Tensor, z_amateur: torch.Tensor, alpha: float = 0.1, beta: float = 0.5,
                       objective: str = "obrien", amateur_temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, V) of both models -> (scores (B, V) float32, -inf outside V_head; head mask (B, V)).
    alpha must be in (0, 1] (ValueError otherwise)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    z_e, z_a = z_expert.float(), z_amateur.float()
    head = plausible_head(z_e, alpha)
    # Shift both to max 0 (scores move by a per-row constant) and floor the amateur's -inf: no NaN below.
    z_e = z_e - z_e.max(-1, keepdim=True).values  # in V_head: log(alpha) <= z_e <= 0
    z_a = (z_a - z_a.max(-1, keepdim=True).values).clamp_min(-1e30)  # finite, <= 0
    if objective == "obrien":
        scores = (1 + beta) * z_e - beta * z_a
    else:  # "li"
        scores = z_e.log_softmax(-1) - z_a.log_softmax(-1) / amateur_temperature
    # A floored (-inf) amateur logit makes a head token's score huge: keep it the winner but finite, so
    # a softmax over the scores stays defined even after dividing by a sampling temperature down to ~1e-8.
    scores = scores.clamp(-1e30, 1e30)
    return scores.masked_fill(~head, float("-inf")), head


@dataclass
class CDStats(Stats):
    """Contrastive decoding's statistics, beside the core's tokens, times and calls."""
    head_sizes: list[int] = field(default_factory=list)  # |V_head| at each step
    differs_from_expert: int = 0  # steps whose token is not the expert's argmax
    amateur_weight: float = math.nan  # w of z_e - w·z_a (obrien) or 1/tau (li)

    @property
    def differs_fraction(self) -> float:
        return self.differs_from_expert / len(self.head_sizes) if self.head_sizes else math.nan

    @property
    def mean_head_size(self) -> float:
        return sum(self.head_sizes) / len(self.head_sizes) if self.head_sizes else math.nan

    def method_parts(self) -> list[str]:
        if not self.head_sizes:
            return []
        return [f"mean |V_head| {self.mean_head_size:.2f} | differs from expert argmax on {self.differs_fraction:.1%} "
                f"of {len(self.head_sizes)} steps | amateur weight {self.amateur_weight:.3f}"]


@dataclass
class CDStep:
    """One contrastive decoding step, as a `trace` callable receives it (batch 1; tensors (1, V) float32,
    the loop's own: read them, do not modify them)."""
    step: int  # 0-based index of the new token
    z_expert: torch.Tensor  # the expert's next-token logits
    z_amateur: torch.Tensor  # the amateur's next-token logits
    scores: torch.Tensor  # contrastive scores (up to a per-row constant), -inf outside V_head
    head: torch.Tensor  # bool mask of V_head
    token: int  # the chosen token (argmax of scores when greedy, else sampled from them)
    expert_token: int  # the expert's own argmax


def check_settings(alpha: float, beta: float, objective: str, amateur_temperature: float,
                   amateur_context: str) -> None:
    """Contrastive decoding's own settings, each in its range (the loop and methods.Method ask this)."""
    _check_alpha(alpha)
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not amateur_temperature > 0:
        raise ValueError(f"amateur_temperature must be > 0, got {amateur_temperature}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if amateur_context not in AMATEUR_CONTEXTS:
        raise ValueError(f"amateur_context must be one of {AMATEUR_CONTEXTS}, got {amateur_context!r}")


def _timed_logits(model, ids: list[int], cache: KVCache, stats: Stats, role: str) -> torch.Tensor:
    t0 = time.perf_counter()
    z = next_logits(model, torch.tensor([ids], device=model.tok_emb.weight.device), cache)  # (1, V)
    stats.timed(role, time.perf_counter() - t0)
    return z


@torch.inference_mode()
def contrastive_stream(expert, amateur, prompt_ids: list[int], max_new_tokens: int, alpha: float = 0.1,
                       beta: float = 0.5, objective: str = "obrien", amateur_temperature: float = 1.0,
                       amateur_context: str = "full", params: SamplingParams = SamplingParams(temperature=0),
                       generator: torch.Generator | None = None, eos_ids: set[int] = frozenset(),
                       stats: CDStats | None = None, trace: Callable[[CDStep], None] | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens ids chosen by contrastive decoding (batch 1). Greedy by default;
    `params` with temperature > 0 samples from softmax(score / T) (top-k/top-p apply to the scores).
    Penalties and no-repeat-ngram (history: prompt + generated ids) reshape the EXPERT's logits before
    V_head and the scores are computed, so a banned token leaves the head and the head stays non-empty.

    amateur_context="full": the amateur reads the whole prompt; "last_prompt_token" (Li et al.'s main
    setting): it reads only the last prompt token, at position 0, then the generated tokens.
    `trace` gets a CDStep after every step (also the step that picks an EOS id)."""
    check_same_vocab(expert, amateur, ("expert", "amateur"))
    check_settings(alpha, beta, objective, amateur_temperature, amateur_context)
    check_prompts([prompt_ids])
    a_prompt = list(prompt_ids) if amateur_context == "full" else [prompt_ids[-1]]
    check_budget(len(prompt_ids), max_new_tokens, expert.config.block_size, who="the expert")
    check_budget(len(a_prompt), max_new_tokens, amateur.config.block_size, who="the amateur",
                 what="the amateur's prompt")
    stats = stats if stats is not None else CDStats()
    stats.prompt_tokens, stats.stopped_by = len(prompt_ids), "max_new_tokens"
    stats.amateur_weight = amateur_weight(beta) if objective == "obrien" else 1 / amateur_temperature
    e_cache = KVCache.for_run(expert, 1, len(prompt_ids), max_new_tokens)
    a_cache = KVCache.for_run(amateur, 1, len(a_prompt), max_new_tokens)
    history = torch.tensor([prompt_ids], device=expert.tok_emb.weight.device) if params.needs_history else None
    warp = dataclasses.replace(params, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                               no_repeat_ngram_size=0)  # what acts on the scores: temperature, top-k/p, ...
    e_in, a_in, t0 = list(prompt_ids), a_prompt, time.perf_counter()
    for step in range(max_new_tokens):
        z_e = _timed_logits(expert, e_in, e_cache, stats, "expert")
        z_a = _timed_logits(amateur, a_in, a_cache, stats, "amateur")
        if history is not None:
            z_e = apply_history_processors(z_e.float(), params, history)
        scores, head = contrastive_scores(z_e, z_a, alpha, beta, objective, amateur_temperature)
        token = int(choose(scores, warp, generator)[0])  # greedy: argmax over V_head (the rest is -inf)
        expert_token = int(z_e.argmax(-1))
        stats.head_sizes.append(int(head.sum()))
        stats.differs_from_expert += int(token != expert_token)
        if trace is not None:
            trace(CDStep(step, z_e.float(), z_a.float(), scores, head, token, expert_token))
        if token in eos_ids:
            stats.stopped_by = "eos"
            return
        stats.new_tokens += 1
        stats.clock(t0, step == 0)
        yield token
        e_in = a_in = [token]
        if history is not None:
            history = torch.cat([history, history.new_tensor([[token]])], 1)
