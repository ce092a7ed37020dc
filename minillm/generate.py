"""The decoding core: prefill the prompt once into the KV cache, then one token per step.

    Stats               one record of a decoding run (plain, speculative, contrastive), one summary()
    check_budget(...)   the one rule for "prompt + new tokens fit the context"
    next_logits(...)    feed tokens after what the cache holds -> the next token's logits (prefill and decode)
    stream_batch(...)   the loop: B prompts side by side, yields each step's new token per row
    stream_tokens(...)  batch 1: yields token ids as they are decided
    stream_text(...)    batch 1: yields text pieces, never a broken UTF-8 character nor a stop string
    generate(...)       batch 1: the whole text plus stats (tokens/s, time to first token)
    generate_batch(...) several prompts at once: one Generation per prompt
    decode_stream(...)  token ids from any loop (also speculative, contrastive) -> text, stop strings cut

Stopping: after exactly max_new_tokens tokens; at an end-of-sequence id (any of a set; not emitted);
or, for text, at a stop string, which may be split across tokens ("st" + "op"). The stop string and
everything after it are cut from the text, and streaming never shows any of it: text that could be
the start of a stop string is held back until the next piece proves it is not (StopScanner).

Batches of prompts of different lengths (the llama3 way): every row sits at the same position, so the
model needs no padding. The prompts are read together up to the shortest one's length; from there, a
row whose prompt goes on is fed its own next prompt token in place of the sampled one, until its
prompt is read and its new tokens begin. Each row then gets what it gets alone (float32, up to
rounding). A row that stops (EOS) keeps being fed but its tokens are ignored; the loop ends when all
rows stop. The processors' history (penalties, no-repeat n-grams) is each row's prompt + its new tokens.

A prompt that does not fit the context is an error, unless the caller asks for a sliding window:
then, when the cache is full, the model re-reads the last half of the context and continues (in a
batch, only for prompts of equal length, so that rows slide when they would alone).
Randomness comes only from the `generator` passed in (seeded per call): same seed, same text, and
the global RNG is never touched. `trace` (optional) is called after every step with a SampleStep.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .kv_cache import KVCache
from .sampling import SamplingParams, choose
from .tokenizer import IncrementalDecoder


@dataclass
class Stats:
    """What one decoding run did, for any method: tokens, times, forward calls per model role. A method
    with statistics of its own extends it in its module (speculative.SpecStats, contrastive.CDStats)."""
    prompt_tokens: int = 0
    new_tokens: int = 0  # per row
    prefill_s: float = 0.0  # time to the first new token
    decode_s: float = 0.0  # time for the rest
    stopped_by: str = ""  # "max_new_tokens" | "eos" | "stop" (a stop string)
    calls: dict[str, int] = field(default_factory=dict)  # forward calls per model role ("target", "draft", ...)
    seconds: dict[str, float] = field(default_factory=dict)  # time in those calls per role

    def clock(self, t0: float, first: bool, now: float | None = None) -> None:
        """The one clock, after each step of a run that began at t0: the first step's time is the time
        to the first token, the rest is decode time."""
        now = time.perf_counter() if now is None else now
        if first:
            self.prefill_s = now - t0
        self.decode_s = now - t0 - self.prefill_s

    def timed(self, role: str, seconds: float) -> None:
        """Count one forward call of the model in `role` that took `seconds`."""
        self.calls[role] = self.calls.get(role, 0) + 1
        self.seconds[role] = self.seconds.get(role, 0.0) + seconds

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """Decode rate: tokens after the first, over the time they took."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else math.nan

    def method_parts(self) -> list[str]:
        """What a method's own statistics add to summary() (none here)."""
        return []

    def summary(self) -> str:
        parts = [f"{self.prompt_tokens} prompt + {self.new_tokens} new tokens (stopped by {self.stopped_by or '-'}), "
                 f"first token {self.prefill_s:.3f}s, {self.tokens_per_s:.1f} tok/s after it", *self.method_parts()]
        if self.calls:
            parts.append(", ".join(f"{role} {n} calls {self.seconds[role]:.3f}s" for role, n in self.calls.items()))
        return " | ".join(parts)


@dataclass
class Generation:
    text: str  # the new text, a stop string (and anything after it) cut off
    ids: list[int]  # every token generated, up to and including the one that completed a stop string
    stats: Stats = field(default_factory=Stats)


@dataclass
class SampleStep:
    """One plain decoding step, as a `trace` callable receives it (the loop's own tensors; read only)."""
    step: int  # loop iteration, from 0
    logits: torch.Tensor  # (B, V) the model's raw next-token logits
    probs: torch.Tensor  # (B, V) float32: the distribution the tokens were chosen from (sampling.choose)
    tokens: torch.Tensor  # (B,) the tokens this step chose (a row still reading its prompt is fed that instead)


def check_budget(prompt_tokens: int, max_new_tokens: int, context: int, who: str = "the model",
                 what: str = "the prompt") -> None:
    """The one context rule: the prompt and every new token but the last (sampled, never fed back)
    must fit the `context` positions of the model `who`. ValueError naming both numbers otherwise."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_tokens > context:
        raise ValueError(f"{what} is {prompt_tokens} tokens; {who}'s context is {context} (shorten the prompt, "
                         f"or ask for a sliding window where the method has one)")
    if prompt_tokens + max_new_tokens - 1 > context:
        raise ValueError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds {who}'s "
                         f"context of {context} positions (lower max_new_tokens, or ask for a sliding window)")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A per-call generator: same seed, same text; the global RNG is never touched."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def next_logits(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed tokens (B, T) after the cache's positions (prefill: many; decode: one) -> the logits (B, V)
    of the token that follows them."""
    return model(tokens, cache, cache.length, last_only=True)[:, -1]


def check_prompts(prompts) -> None:
    """At least one prompt, none empty (every decoding method asks the same)."""
    B = len(prompts)
    if B == 0:
        raise ValueError("no prompts given")
    for b, p in enumerate(prompts):
        if len(p) == 0:
            row = "" if B == 1 else f" (row {b})"
            raise ValueError(f"the prompt{row} is empty (and the tokenizer adds no BOS token): give at least one token")


def check_same_vocab(a, b, names: tuple[str, str]) -> None:
    """Two models that decode together (target and draft, expert and amateur) predict over one vocabulary."""
    if a.config.vocab_size != b.config.vocab_size:
        raise ValueError(f"{names[0]} and {names[1]} must share a tokenizer and vocabulary: {names[0]} vocab_size "
                         f"{a.config.vocab_size}, {names[1]} vocab_size {b.config.vocab_size}")


def _check_prompts(model, prompts, max_new_tokens: int, sliding_window: bool, cache: KVCache | None) -> None:
    check_prompts(prompts)
    B = len(prompts)
    if cache is not None and (sliding_window or B != 1):
        raise ValueError("continuing a cache works with one prompt and no sliding window (the window re-reads "
                         "the context into a fresh cache)")
    if sliding_window and len({len(p) for p in prompts}) > 1:  # else rows would slide at other times than alone
        raise ValueError(f"a sliding window needs prompts of equal length, got lengths {sorted({len(p) for p in prompts})}")
    if max_new_tokens < 0 or not sliding_window:
        start = cache.length if cache is not None else 0
        check_budget(start + max(map(len, prompts)), max_new_tokens, model.config.block_size,
                     what="the prompt" if B == 1 else "the longest prompt")


@torch.inference_mode()
def stream_batch(model, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 generator: torch.Generator | None = None, eos_ids: set[int] = frozenset(),
                 sliding_window: bool = False, stats: list[Stats] | None = None, cache: KVCache | None = None,
                 trace: Callable[[SampleStep], None] | None = None) -> Iterator[list[int | None]]:
    """Decode B prompts side by side with one KV cache. Yields one list per step with, for each row, its
    new token id, or None when it has none this step (still reading its prompt, or stopped by EOS).
    Each row gets max_new_tokens tokens unless it stops; `stats` (one per row) get filled.

    With `cache` given (batch 1), the prompt is appended after the cache's positions (earlier turns of
    a chat); afterwards the cache holds the prompt and every new token but the last."""
    _check_prompts(model, prompts, max_new_tokens, sliding_window, cache)
    B, block_size, device = len(prompts), model.config.block_size, model.tok_emb.weight.device
    stats = stats if stats is not None else [Stats() for _ in prompts]
    prompt_lens = [len(p) for p in prompts]
    lens, longest = torch.tensor(prompt_lens, device=device), max(prompt_lens)  # (B,) and the longest
    if cache is None:
        cache = KVCache.for_model(model, B) if sliding_window else KVCache.for_run(model, B, longest, max_new_tokens)
    seq = torch.zeros(B, longest + max_new_tokens, dtype=torch.long, device=device)  # prompt, then new tokens
    for b, p in enumerate(prompts):
        seq[b, :len(p)] = torch.tensor(p)
        stats[b].prompt_tokens, stats[b].stopped_by = len(p), "max_new_tokens"
    pos = min(prompt_lens)  # columns 0..pos-1 are known in every row
    done = [max_new_tokens == 0] * B
    first = pos - block_size // 2 if pos >= block_size else 0  # a sliding window starts from the prompt's last half-context
    t0 = time.perf_counter()
    logits = next_logits(model, seq[:, first:pos], cache)
    for step in range(seq.size(1) - pos):
        if all(done):
            return
        history = seq[:, :pos] if params.needs_history else None
        tokens, probs = choose(logits, params, generator, history)
        if trace is not None:
            trace(SampleStep(step, logits, probs, tokens))
        if pos < longest:  # a row still reading its prompt is fed its prompt token
            tokens = torch.where(pos < lens, seq[:, pos], tokens)
        seq[:, pos] = tokens
        yield _record(tokens.tolist(), pos, prompt_lens, done, stats, eos_ids, max_new_tokens, t0)
        pos += 1
        if all(done):
            return
        if cache.length == block_size:  # context full (only reachable with sliding_window): re-read the last half
            cache.reset()
            logits = next_logits(model, seq[:, pos - block_size // 2:pos], cache)
        else:
            logits = next_logits(model, seq[:, pos - 1:pos], cache)


def _record(tokens: list[int], pos: int, lens: list[int], done: list[bool], stats: list[Stats], eos_ids,
            max_new_tokens: int, t0: float) -> list[int | None]:
    """One step's new token per row (None: still in its prompt, or finished), and the rows' stats."""
    now, out = time.perf_counter(), []
    for b, t in enumerate(tokens):
        if done[b] or pos < lens[b]:
            out.append(None)
            continue
        s = stats[b]
        s.clock(t0, s.new_tokens == 0, now)
        if t in eos_ids:
            done[b], s.stopped_by = True, "eos"
            out.append(None)
            continue
        s.new_tokens += 1
        done[b] = s.new_tokens == max_new_tokens
        out.append(t)
    return out


def stream_tokens(model, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                  generator: torch.Generator | None = None, eos_ids: set[int] = frozenset(),
                  sliding_window: bool = False, stats: Stats | None = None,
                  cache: KVCache | None = None, trace: Callable[[SampleStep], None] | None = None) -> Iterator[int]:
    """Batch 1: yield up to max_new_tokens new token ids, using the KV cache (see stream_batch)."""
    stats = stats if stats is not None else Stats()
    for (token,) in stream_batch(model, [prompt_ids], max_new_tokens, params, generator, eos_ids,
                                 sliding_window, [stats], cache, trace):
        if token is None:  # EOS (not emitted)
            return
        yield token


class StopScanner:
    """Cut text at the first stop string, even when it arrives split across pieces.

    feed(piece) returns the text that is safe to show now. A stop string that starts in already-shown
    text would have to start in a suffix of it that is a prefix of the stop string, so exactly that
    suffix (the longest one that is a prefix of some stop string) is held back; once a stop string is
    complete, the text before it is released and everything from it on is dropped. "Complete" is
    decided as generation would: the stop string that ends first wins, however the text is cut."""

    def __init__(self, stops: Sequence[str] = ()):
        if isinstance(stops, str):
            stops = [stops]
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stops = list(stops)
        self.pending = ""  # held-back text, shorter than the longest stop string
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + piece
        hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in self.stops) if i >= 0]
        if hits:  # the stop string completed first (generation ends there), the longest of those ending together
            self.stopped, self.pending = True, ""
            return text[:min(hits)[1]]
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def flush(self) -> str:
        """The end of the text: what was held back was not a stop string after all."""
        text, self.pending = self.pending, ""
        return text


def _eos_set(tokenizer, stop_at_eos: bool, eos_ids) -> set[int]:
    if eos_ids is not None:
        return set(eos_ids)
    return set(getattr(tokenizer, "eos_ids", ())) if stop_at_eos else set()


def decode_stream(tokenizer, tokens: Iterator[int], stop: Sequence[str] = (), stats=None,
                  ids_out: list[int] | None = None) -> Iterator[str]:
    """Token ids from any decoding loop (plain, speculative, contrastive) -> text pieces: UTF-8 safe,
    cut before the first stop string (then the loop is closed and stats.stopped_by = "stop")."""
    scanner = StopScanner(stop)
    decoder = IncrementalDecoder(tokenizer)
    for token in tokens:
        if ids_out is not None:
            ids_out.append(token)
        piece = scanner.feed(decoder.feed(token))
        if piece:
            yield piece
        if scanner.stopped:
            break
    else:
        piece = scanner.feed(decoder.flush()) + scanner.flush()
        if piece:
            yield piece
    if scanner.stopped:
        if hasattr(tokens, "close"):
            tokens.close()  # ends the decoding loop now
        if stats is not None:
            stats.stopped_by = "stop"


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int, params: SamplingParams = SamplingParams(),
                seed: int | None = None, stop_at_eos: bool = True, sliding_window: bool = False,
                stats: Stats | None = None, ids_out: list[int] | None = None, stop: Sequence[str] = (),
                eos_ids: set[int] | None = None, generator: torch.Generator | None = None) -> Iterator[str]:
    """Yield decoded text pieces as tokens are decided (UTF-8 safe across token boundaries).

    eos_ids: the end-of-sequence ids (default: the tokenizer's, unless stop_at_eos=False); stop: stop
    strings (the text ends before the first one; stats.stopped_by == "stop"). Randomness: `generator`,
    or a fresh one seeded with `seed`."""
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    StopScanner(stop)  # check the stop strings before any work
    prompt_ids = tokenizer.encode(prompt)
    generator = generator if generator is not None else make_generator(seed, model.tok_emb.weight.device)
    stats = stats if stats is not None else Stats()
    tokens = stream_tokens(model, prompt_ids, max_new_tokens, params, generator,
                           _eos_set(tokenizer, stop_at_eos, eos_ids), sliding_window, stats)
    yield from decode_stream(tokenizer, tokens, stop, stats, ids_out)


def generate(model, tokenizer, prompt: str, max_new_tokens: int, params: SamplingParams = SamplingParams(),
             seed: int | None = None, **kwargs) -> Generation:
    """The whole continuation of `prompt` as text + ids + stats (keyword arguments as stream_text)."""
    stats, ids = Stats(), []
    text = "".join(stream_text(model, tokenizer, prompt, max_new_tokens, params, seed, stats=stats, ids_out=ids, **kwargs))
    return Generation(text, ids, stats)


def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                   seed: int | None = None, stop: Sequence[str] = (), stop_at_eos: bool = True,
                   eos_ids: set[int] | None = None, sliding_window: bool = False,
                   generator: torch.Generator | None = None) -> list[Generation]:
    """Continue several prompts in one batch (stream_batch: no padding); each row stops on its own (EOS, stop
    string, max_new_tokens). Greedy rows equal their batch-1 generate() output in float32."""
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    generator = generator if generator is not None else make_generator(seed, model.tok_emb.weight.device)
    out = [Generation("", [], Stats()) for _ in prompts]
    decoders = [IncrementalDecoder(tokenizer) for _ in prompts]
    scanners = [StopScanner(stop) for _ in prompts]
    pieces: list[list[str]] = [[] for _ in prompts]
    steps = stream_batch(model, prompt_ids, max_new_tokens, params, generator, _eos_set(tokenizer, stop_at_eos, eos_ids),
                         sliding_window, [g.stats for g in out])
    for step in steps:
        for b, token in enumerate(step):
            if token is None or scanners[b].stopped:
                continue
            out[b].ids.append(token)
            pieces[b].append(scanners[b].feed(decoders[b].feed(token)))
        if all(t is None or s.stopped for t, s in zip(step, scanners)):
            steps.close()
            break
    for b, g in enumerate(out):
        g.stats.new_tokens = len(g.ids)  # a row cut by a stop string kept decoding for the others
        if not scanners[b].stopped:
            pieces[b].append(scanners[b].feed(decoders[b].flush()) + scanners[b].flush())
        if scanners[b].stopped:  # set last: the loop marks rows it saw running as "max_new_tokens"
            g.stats.stopped_by = "stop"
        g.text = "".join(pieces[b])
    return out
