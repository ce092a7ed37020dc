"""The decoding loop: prefill the prompt once into the KV cache, then one token per step.

    stream_batch(...)   the core loop: B prompts side by side, yields each step's new token per row
    stream_tokens(...)  batch 1: yields token ids as they are decided
    stream_text(...)    batch 1: yields text pieces, never a broken UTF-8 character nor a stop string
    generate(...)       batch 1: the whole text plus stats (tokens/s, time to first token)
    generate_batch(...) several prompts at once: one Generation per prompt
    decode_stream(...)  token ids from any loop (also speculative, contrastive) -> text, stop strings cut

Stopping: after exactly max_new_tokens tokens; at an end-of-sequence id (any of a set; not emitted);
or, for text, at a stop string, which may be split across tokens ("st" + "op"). The stop string and
everything after it are cut from the text, and streaming never shows any of it: text that could be
the start of a stop string is held back until the next piece proves it is not (StopScanner).

Batches: prompts of different lengths are padded on the LEFT, so every row's next token sits in the
same column. The model gets `left_pad` (pad count per row): each row's positions count from its own
first token, and no query attends to padding. In float32 each row then gets what it gets alone.
A row that stops (EOS) keeps being fed but its tokens are ignored; the loop ends when all rows stop.

The processors' history (repetition/presence/frequency penalties, no-repeat n-grams) is the prompt
ids given here plus the tokens generated so far, per row (padding excluded).

A prompt that does not fit the context is an error, unless the caller asks for a sliding window:
then, when the cache is full, the model re-reads the last half of the context and continues (in a
batch, only for prompts of equal length, so that rows slide when they would alone).
Randomness comes only from the `generator` passed in (seeded per call): same seed, same text, and
the global RNG is never touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

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
    stopped_by: str = ""  # "max_new_tokens" | "eos" | "stop" (a stop string)

    @property
    def tokens_per_s(self) -> float:
        """Decode rate: tokens after the first, over the time they took."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else float("nan")


@dataclass
class Generation:
    text: str  # the new text, a stop string (and anything after it) cut off
    ids: list[int]  # every token generated, up to and including the one that completed a stop string
    stats: GenStats = field(default_factory=GenStats)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A per-call generator: same seed, same text; the global RNG is never touched."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def left_pad(rows: list[list[int]], device, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of ids -> (B, L) tensor padded on the left with `fill`, and the pad count per row
    (None when no row needs padding, so the model keeps its plain causal path)."""
    L = max(len(r) for r in rows)
    pads = [L - len(r) for r in rows]
    tokens = torch.tensor([[fill] * p + list(r) for p, r in zip(pads, rows)], dtype=torch.long, device=device)
    return tokens, (torch.tensor(pads, device=device) if any(pads) else None)


def _forward(model, tokens, cache, start, pad) -> torch.Tensor:
    """Next-token logits (B, V); `left_pad` is passed only when needed, so any model with the plain
    forward(tokens, cache, start_pos, last_only) signature works for unpadded batches."""
    extra = {} if pad is None else {"left_pad": pad}
    return model(tokens, cache, start, last_only=True, **extra)[:, -1]


@torch.inference_mode()
def stream_batch(model, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 generator: torch.Generator | None = None, eos_ids: set[int] = frozenset(),
                 sliding_window: bool = False, stats: list[GenStats] | None = None,
                 cache: KVCache | None = None) -> Iterator[list[int | None]]:
    """Decode B prompts side by side with one KV cache. Yields one list per step with, for each row,
    its new token id, or None once the row has stopped (from the step that drew its EOS id on).
    Ends after max_new_tokens steps or when every row has stopped; `stats` (one per row) get filled.

    With `cache` given (batch 1 only), the model also sees the cache's first cache.length positions
    (earlier turns of a chat) and the prompt is appended after them; afterwards the cache holds the
    prompt and the emitted tokens (all of them when stopped by EOS; all but the last otherwise)."""
    B = len(prompts)
    if B == 0:
        raise ValueError("no prompts given")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for b, p in enumerate(prompts):
        if not p:
            row = "" if B == 1 else f" (row {b})"
            raise ValueError(f"the prompt{row} is empty (and the tokenizer adds no BOS token): give at least one token")
    if cache is not None and (sliding_window or B != 1):
        raise ValueError("continuing a cache works with one prompt and no sliding window (the window re-reads "
                         "the context into a fresh cache)")
    if sliding_window and len({len(p) for p in prompts}) > 1:  # else rows would slide at other times than alone
        raise ValueError(f"a sliding window needs prompts of equal length, got lengths {sorted({len(p) for p in prompts})}")
    ctx = model.config.block_size
    start = cache.length if cache is not None else 0
    longest = start + max(len(p) for p in prompts)
    what = "the prompt is" if B == 1 else "the longest prompt is"
    if not sliding_window:
        if longest >= ctx:
            raise ValueError(f"{what} {longest} tokens; the model's context is {ctx}, and at least one position "
                             f"must stay free for generation (shorten the prompt, or ask for a sliding window)")
        if longest + max_new_tokens - 1 > ctx:  # the last token is sampled, never fed back
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {ctx} positions (lower max_new_tokens, or ask for a sliding window)")
    stats = stats if stats is not None else [GenStats() for _ in prompts]
    for s, p in zip(stats, prompts):
        s.prompt_tokens = len(p)
    device = model.tok_emb.weight.device
    cache = cache if cache is not None else KVCache.for_model(model, batch_size=B)
    rows = [list(p) for p in prompts]  # everything each row has read or emitted
    history = None  # (B, T) ids for the processors that need them; -1 = padding
    if params.needs_history:
        history = left_pad(rows, device, fill=-1)[0]
    alive = [True] * B

    t0 = time.perf_counter()
    tokens, pad = left_pad([r[-(ctx // 2):] if len(r) >= ctx else r for r in rows], device)
    logits = _forward(model, tokens, cache, start, pad)
    for i in range(max_new_tokens):
        ids = sample(logits, params, generator, history)  # (B,)
        now = time.perf_counter()
        step = []
        for b, t in enumerate(ids.tolist()):
            if not alive[b]:
                step.append(None)
                continue
            if i == 0:
                stats[b].prefill_s = now - t0
            else:
                stats[b].decode_s = now - t0 - stats[b].prefill_s
            if t in eos_ids:
                alive[b], stats[b].stopped_by = False, "eos"
                step.append(None)
            else:
                stats[b].new_tokens += 1
                rows[b].append(t)
                step.append(t)
        yield step
        if not any(alive) or i == max_new_tokens - 1:
            break
        if history is not None:
            history = torch.cat([history, ids[:, None]], 1)
        if cache.length == ctx:  # context full (only reachable with sliding_window): re-read the last half
            cache.reset()
            tokens, pad = left_pad([r[-(ctx // 2):] for r in rows], device)
            logits = _forward(model, tokens, cache, 0, pad)
        else:
            logits = _forward(model, ids[:, None], cache, cache.length, pad)
    for s, a in zip(stats, alive):
        if a:
            s.stopped_by = "max_new_tokens"


def stream_tokens(model, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                  generator: torch.Generator | None = None, eos_ids: set[int] = frozenset(),
                  sliding_window: bool = False, stats: GenStats | None = None,
                  cache: KVCache | None = None) -> Iterator[int]:
    """Batch 1: yield up to max_new_tokens new token ids, using the KV cache (see stream_batch)."""
    stats = stats if stats is not None else GenStats()
    for (token,) in stream_batch(model, [prompt_ids], max_new_tokens, params, generator, eos_ids,
                                 sliding_window, [stats], cache):
        if token is None:  # EOS (not emitted)
            return
        yield token


class StopScanner:
    """Cut text at the first stop string, even when it arrives split across pieces.

    feed(piece) returns the text that is safe to show now. A stop string that starts in already-shown
    text would have to start in a suffix of it that is a prefix of the stop string, so exactly that
    suffix (the longest one that is a prefix of some stop string) is held back; once a stop string is
    complete, the text before it is released and everything from it on is dropped."""

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
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[:min(hits)]
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
                stats: GenStats | None = None, ids_out: list[int] | None = None, stop: Sequence[str] = (),
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
    stats = stats if stats is not None else GenStats()
    tokens = stream_tokens(model, prompt_ids, max_new_tokens, params, generator,
                           _eos_set(tokenizer, stop_at_eos, eos_ids), sliding_window, stats)
    yield from decode_stream(tokenizer, tokens, stop, stats, ids_out)


def generate(model, tokenizer, prompt: str, max_new_tokens: int, params: SamplingParams = SamplingParams(),
             seed: int | None = None, **kwargs) -> Generation:
    """The whole continuation of `prompt` as text + ids + stats (keyword arguments as stream_text)."""
    stats, ids = GenStats(), []
    text = "".join(stream_text(model, tokenizer, prompt, max_new_tokens, params, seed, stats=stats, ids_out=ids, **kwargs))
    return Generation(text, ids, stats)


def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                   seed: int | None = None, stop: Sequence[str] = (), stop_at_eos: bool = True,
                   eos_ids: set[int] | None = None, sliding_window: bool = False,
                   generator: torch.Generator | None = None) -> list[Generation]:
    """Continue several prompts in one batch (left-padded); each row stops on its own (EOS, stop
    string, max_new_tokens). Greedy rows equal their batch-1 generate() output in float32."""
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    generator = generator if generator is not None else make_generator(seed, model.tok_emb.weight.device)
    out = [Generation("", [], GenStats()) for _ in prompts]
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
