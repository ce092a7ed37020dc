"""Turning logits into a token: temperature, top-k, top-p, and the draw itself.

Each step is a small pure function on float32 logits (B, V). Order: temperature, then top-k,
then top-p, then sample. Defaults mean "off": temperature 1, no top-k, no top-p.
Temperature 0 is greedy: a real argmax, not a division by a tiny number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0: greedy (argmax); < 1 sharper, > 1 flatter
    top_k: int | None = None  # keep exactly the k most likely tokens (ties broken by index)
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches top_p

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None for off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None for off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Mask all but exactly k entries per row (topk picks k indices, so ties cannot add extra)."""
    if k >= logits.size(-1):
        return logits
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(k, dim=-1).indices, True)
    return logits.masked_fill(~keep, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their total probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass of the strictly more likely tokens
    drop_sorted = before >= p  # the first token has before = 0 < p, so it always stays
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """float32 logits (B, V) -> scaled and masked logits, ready for softmax (not used when greedy)."""
    logits = logits.float() / params.temperature
    if params.top_k is not None:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p is not None:
        logits = apply_top_p(logits, params.top_p)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = process_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
