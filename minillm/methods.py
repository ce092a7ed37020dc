"""Decoding methods by name: the one dispatch used by sample.py, the inspector and the benches.

    Method(name, params, ...)   what to run: "sample", "greedy", "speculative" (a draft model proposes,
                                or with draft_lookup=True prompt lookup does; the model verifies) or
                                "contrastive" (an amateur model is contrasted)
    load_partner(path, ...)     the draft or amateur, refused unless its tokenizer is the model's
    stream(method, ...)         an iterator of new token ids, filling one generate.Stats

Every method streams through the decoding core (generate.py) or a method module built on it, and
takes a `trace` callable that receives each step (SampleStep, SpecStep or CDStep).

Prompt lookup is speculative decoding with another draft, not a method of its own: the same loop,
law, statistics and trace, so it is Method("speculative", draft_lookup=True) (`--method speculative
--draft-lookup`), which needs no partner model; everything that handles speculative runs (the
inspector's trace, the eval's labels, the page) handles it unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .checkpoint import Loaded, load_model
from .contrastive import CDStats, check_settings, contrastive_stream
from .generate import Stats, stream_tokens
from .sampling import SamplingParams
from .speculative import PromptLookup, SpecStats, speculative_stream
from .tokenizer import check_same_tokenizer

METHODS = ("sample", "greedy", "speculative", "contrastive")
PARTNER = {"speculative": "draft", "contrastive": "amateur"}  # the second model each method needs
MAX_K = 64  # speculative: most drafts per target call (the command lines' and the server's limit)
MAX_LOOKUP_NGRAM = 16  # prompt lookup: the longest n-gram a command line or request may ask it to match
DEFAULT_TEMPERATURE = {"sample": 0.8, "greedy": 0.0, "speculative": 0.8, "contrastive": 0.0}


@dataclass(frozen=True)
class Method:
    name: str = "sample"
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=DEFAULT_TEMPERATURE["sample"]))
    sliding_window: bool = False  # sample / greedy: past the context, re-read its last half and go on
    k: int = 4  # speculative: drafts per target call
    adaptive_k: bool = False  # speculative: +2 after a fully accepted step, else -1
    alpha: float = 0.1  # contrastive: plausibility, tokens with p >= alpha * max p
    beta: float = 0.5  # contrastive: O'Brien's strength of the contrast
    objective: str = "obrien"  # contrastive: "obrien" or "li"
    amateur_temperature: float = 1.0  # contrastive, "li": the amateur's tau
    amateur_context: str = "full"  # contrastive: "full" or "last_prompt_token"
    draft_lookup: bool = False  # speculative: prompt lookup proposes, no draft model
    lookup_ngram: int = 3  # speculative with draft_lookup: longest n-gram matched (then n-1, ..., 1)

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.name!r}")
        if self.name == "greedy" and not self.params.greedy:
            raise ValueError(f"method greedy means temperature 0, got temperature {self.params.temperature}")
        check_settings(self.alpha, self.beta, self.objective, self.amateur_temperature, self.amateur_context)
        if self.draft_lookup and self.name != "speculative":
            raise ValueError(f"draft_lookup is a draft of method speculative, not of {self.name}")
        PromptLookup(self.lookup_ngram)  # its range checked

    def stream(self, model, prompt_ids: list[int], max_new_tokens: int, partner=None, **run) -> Iterator[int]:
        """New token ids from `model` (and `partner`) by this method: stream(self, ...), see there."""
        return stream(self, model, prompt_ids, max_new_tokens, partner, **run)

    def new_stats(self) -> Stats:
        """An empty statistics object for a run of this method (speculative and contrastive keep more)."""
        return {"speculative": SpecStats, "contrastive": CDStats}.get(self.name, Stats)()

    @property
    def partner(self) -> str | None:
        """The role of the second model this method needs ("draft", "amateur"), or None."""
        return None if self.draft_lookup else PARTNER.get(self.name)

    def draft(self, partner=None):
        """What speculative decoding's loop asks for proposals: PromptLookup, or the draft model."""
        return PromptLookup(self.lookup_ngram) if self.draft_lookup else partner


def with_temperature(name: str, params: SamplingParams, temperature: float | None) -> SamplingParams:
    """params with the method's default temperature unless one is given."""
    t = DEFAULT_TEMPERATURE[name] if temperature is None else temperature
    return dataclasses.replace(params, temperature=t)


def load_partner(path: str, role: str, main: Loaded, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> Loaded:
    """Load the draft / amateur checkpoint; ValueError unless its token ids mean what the model's do."""
    other = load_model(path, device, dtype)
    check_same_tokenizer(main.tokenizer, other.tokenizer, "the model", f"the {role} {path}",
                         purpose="speculative decoding" if role == "draft" else "contrastive decoding")
    return other


def stream(method: Method, model, prompt_ids: list[int], max_new_tokens: int, partner=None,
           generator: torch.Generator | None = None, eos_ids: set[int] = frozenset(), stats: Stats | None = None,
           trace: Callable | None = None) -> Iterator[int]:
    """New token ids from `model` (and `partner`, the draft or amateur model) by `method`."""
    stats = stats if stats is not None else method.new_stats()
    if method.partner is not None and partner is None:
        raise ValueError(f"method {method.name} needs a {method.partner} model")
    shared = dict(params=method.params, generator=generator, eos_ids=eos_ids, stats=stats, trace=trace)
    if method.name == "speculative":
        return speculative_stream(model, method.draft(partner), prompt_ids, max_new_tokens, k=method.k,
                                  adaptive_k=method.adaptive_k, **shared)
    if method.name == "contrastive":
        return contrastive_stream(model, partner, prompt_ids, max_new_tokens, alpha=method.alpha, beta=method.beta,
                                  objective=method.objective, amateur_temperature=method.amateur_temperature,
                                  amateur_context=method.amateur_context, **shared)
    return stream_tokens(model, prompt_ids, max_new_tokens, sliding_window=method.sliding_window, **shared)
