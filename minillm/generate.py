"""The decoding loop: prefill the prompt once into the KV cache, then one token per step.

    stream_tokens(...)  yields token ids as they are decided (the core loop)
    stream_text(...)    yields text pieces, never a broken UTF-8 character
    generate(...)       the whole text plus stats (tokens/s, time to first token)

Stops at max_new_tokens exactly, or at an end-of-sequence token (not emitted) when the tokenizer
has one. A prompt that does not fit the context is an error, unless the caller asks for a
sliding window: then, when the cache is full, the model re-reads the last half of the context
and continues from there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .kv_cache import KVCache
from .sampling import SamplingParams, sample
from .tokenizer import IncrementalDecoder


@dataclass
class GenStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # time to first token
    decode_s: float = 0.0  # time for the remaining new tokens
    stopped_by: str = ""  # "max_new_tokens" | "eos"

    @property
    def tokens_per_s(self) -> float:
        """Decode rate: tokens after the first, over the time they took."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else float("nan")


@dataclass
class Generation:
    text: str
    ids: list[int]
    stats: GenStats = field(default_factory=GenStats)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A per-call generator: same seed, same text; the global RNG is never touched."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@torch.inference_mode()
def stream_tokens(model, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                  generator: torch.Generator | None = None, eos_ids: set[int] = frozenset(),
                  sliding_window: bool = False, stats: GenStats | None = None,
                  cache: KVCache | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids, using the KV cache.

    With `cache` given, the model also sees the cache's first cache.length positions (earlier turns of
    a chat) and `prompt_ids` are appended after them; afterwards the cache holds the prompt and the
    emitted tokens (all of them when stopped by EOS; all but the last when stopped by max_new_tokens)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompt_ids:
        raise ValueError("the prompt is empty (and the tokenizer adds no BOS token): give at least one token")
    if cache is not None and sliding_window:
        raise ValueError("sliding_window needs a fresh cache (it re-reads the context); do not pass one")
    ctx = model.config.block_size
    stats = stats if stats is not None else GenStats()
    stats.prompt_tokens = len(prompt_ids)
    start = cache.length if cache is not None else 0
    if not sliding_window:
        if start + len(prompt_ids) >= ctx:
            raise ValueError(f"the prompt is {start + len(prompt_ids)} tokens; the model's context is {ctx}, and at least one "
                             f"position must stay free for generation (shorten the prompt, or ask for a sliding window)")
        if start + len(prompt_ids) + max_new_tokens - 1 > ctx:  # the last token is sampled, never fed back
            raise ValueError(f"prompt ({start + len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {ctx} positions (lower max_new_tokens, or ask for a sliding window)")
    device = model.tok_emb.weight.device
    cache = cache if cache is not None else KVCache.for_model(model, batch_size=1)
    history = list(prompt_ids[-(ctx // 2):] if len(prompt_ids) >= ctx else prompt_ids)

    t0 = time.perf_counter()
    logits = model(torch.tensor([history], device=device), cache, start, last_only=True)[:, -1]
    for i in range(max_new_tokens):
        token = int(sample(logits, params, generator))
        now = time.perf_counter()
        if i == 0:
            stats.prefill_s = now - t0
        else:
            stats.decode_s = now - t0 - stats.prefill_s
        if token in eos_ids:
            stats.stopped_by = "eos"
            return
        stats.new_tokens += 1
        yield token
        history.append(token)
        if i == max_new_tokens - 1:
            break
        if cache.length == ctx:  # context full (only reachable with sliding_window): re-read the last half
            history = history[-(ctx // 2):]
            cache.reset()
            logits = model(torch.tensor([history], device=device), cache, 0, last_only=True)[:, -1]
        else:
            logits = model(torch.tensor([[token]], device=device), cache, cache.length)[:, -1]
    stats.stopped_by = "max_new_tokens"


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int, params: SamplingParams = SamplingParams(),
                seed: int | None = None, stop_at_eos: bool = True, sliding_window: bool = False,
                stats: GenStats | None = None, ids_out: list[int] | None = None) -> Iterator[str]:
    """Yield decoded text pieces as tokens are decided (UTF-8 safe across token boundaries)."""
    prompt_ids = tokenizer.encode(prompt)
    generator = make_generator(seed, model.tok_emb.weight.device)
    eos = set(tokenizer.eos_ids) if stop_at_eos else set()
    decoder = IncrementalDecoder(tokenizer)
    for token in stream_tokens(model, prompt_ids, max_new_tokens, params, generator, eos, sliding_window, stats):
        if ids_out is not None:
            ids_out.append(token)
        piece = decoder.feed(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


def generate(model, tokenizer, prompt: str, max_new_tokens: int, params: SamplingParams = SamplingParams(),
             seed: int | None = None, **kwargs) -> Generation:
    stats, ids = GenStats(), []
    text = "".join(stream_text(model, tokenizer, prompt, max_new_tokens, params, seed, stats=stats, ids_out=ids, **kwargs))
    return Generation(text, ids, stats)
