"""Speculative decoding: a small draft model proposes k tokens, the target checks them in ONE forward.

Notation (the papers swap letters; we do not): p_target is the target's processed next-token
distribution, q_draft the distribution the draft actually sampled its token from (processed by the
same SamplingParams, or one-hot when greedy). One step, from a sequence whose last token is `last`:

1. The draft samples d_1..d_k autoregressively, d_i ~ q_draft_i, storing q_draft_i (float32).
2. The target runs once over [last, d_1..d_k] (k+1 positions); its logits at position i give
   p_target_i, the distribution of the token after d_1..d_{i-1} (p_target_{k+1} follows d_k).
3. For i = 1..k, with an independent uniform u_i: accept d_i if u_i < min(1, p_target_i(d_i) / q_draft_i(d_i)).
   At the first rejection, emit x ~ norm(max(0, p_target_i - q_draft_i)) and stop.
   If all k pass, emit the bonus token x ~ p_target_{k+1}.

Why the output is an exact draw from p_target (three lines): a token d is emitted at position i by
acceptance with probability q(d)·min(1, p(d)/q(d)) = min(q(d), p(d)), and by the residual with
probability (1 - sum_x min(q(x), p(x))) · (p(d) - min(q(d), p(d))) / sum_x (p(x) - min(q(x), p(x))) = p(d) - min(q(d), p(d)),
because both sums equal the same total variation; the two add up to p(d). Induct over positions.

Greedy (temperature 0) is the same rule with one-hot p_target and q_draft: d_i is accepted iff it is
the target's argmax, and the residual is the target's argmax, so the output is greedy-target exactly.

Batch > 1 (synchronised, exact): row r accepts n_r drafts; with m = min_r n_r every row emits exactly
m+1 tokens: rows with n_r > m emit d_1..d_{m+1} (all accepted drafts), rows with n_r = m emit
d_1..d_m plus their own residual/bonus token. Each emitted token is still an exact draw from
p_target given its prefix (stopping early after an accepted prefix loses nothing), and all rows keep
the same length, so both caches are cropped rectangularly. Prompts in a batch must have equal length.

Cache invariant (both models): the cache holds a prefix of the emitted sequence that excludes its
last token. The target's holds exactly seq[:-1] after each step; the draft's may lag by one token
(after all k drafts were accepted it never processed d_k): the next draft call feeds every token it
is missing, so d_k is written into the draft cache then (gpt-fast's "fill" step, merged).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .kv_cache import KVCache
from .sampling import SamplingParams, process_logits


@dataclass
class SpecStats:
    k: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0  # per row
    accept_hist: list[int] = field(default_factory=list)  # accept_hist[n]: target calls where n drafts were accepted (rows pooled)
    drafts_proposed: int = 0  # rows pooled
    drafts_accepted: int = 0  # counted before the synchronised rule truncates a batch step
    target_calls: int = 0
    draft_calls: int = 0
    target_s: float = 0.0
    draft_s: float = 0.0
    total_s: float = 0.0
    stopped_by: str = ""  # "max_new_tokens" | "eos"

    @property
    def mean_accepted(self) -> float:
        """Mean number of drafts accepted per target call (and row), as gpt-fast prints it."""
        n = sum(self.accept_hist)
        return sum(i * c for i, c in enumerate(self.accept_hist)) / n if n else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over proposed drafts."""
        return self.drafts_accepted / self.drafts_proposed if self.drafts_proposed else float("nan")

    @property
    def tokens_per_target_call(self) -> float:
        return self.new_tokens / self.target_calls if self.target_calls else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else float("nan")

    def summary(self) -> str:
        hist = " ".join(f"{i}:{c}" for i, c in enumerate(self.accept_hist))
        return (f"acceptance histogram (drafts accepted per target call) {hist} | mean accepted {self.mean_accepted:.2f} "
                f"of k={self.k} (rate {self.acceptance_rate:.2f}) | {self.tokens_per_target_call:.2f} tokens per target call | "
                f"target {self.target_calls} calls {self.target_s:.3f}s, draft {self.draft_calls} calls {self.draft_s:.3f}s | "
                f"{self.tokens_per_s:.1f} tok/s")


# --- the three pieces of the accept/reject math, module-level so tests can break each on purpose ---

def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits (..., V) -> the float32 distribution a token is drawn from: the processed softmax, or
    one-hot at the argmax when greedy (temperature 0 is never a division by a tiny number)."""
    shape = logits.shape
    logits = logits.reshape(-1, shape[-1]).float()
    if params.greedy:
        probs = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    else:
        probs = process_logits(logits, params).softmax(-1)
    return probs.reshape(shape)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from probs (B, V) -> (B,)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def uniforms(batch: int, k: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(B, k) independent U[0,1), one per row and draft position (a shared one would correlate acceptances)."""
    return torch.rand(batch, k, generator=generator, device=device)


def residual(p_target: torch.Tensor, q_draft: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p_target - q_draft)) per row, float32. After a rejection p_target != q_draft in exact
    arithmetic, so the normaliser (the total variation) is > 0; in floating point it can round to ~0
    when the two nearly agree: then fall back to p_target (the difference is then negligible)."""
    r = (p_target.float() - q_draft.float()).clamp_min(0.0)
    z = r.sum(-1, keepdim=True)
    return torch.where(z > 1e-9, r / z.clamp_min(1e-30), p_target.float())


class SpeculativeDecoder:
    """State of one speculative decoding run: both models, their caches and the emitted sequence.

    `step()` runs one draft proposal + target verification and returns the newly emitted tokens
    (B, c), c >= 1. `seq` (B, n) is prompt + everything emitted so far."""

    def __init__(self, target, draft, prompts: torch.Tensor, k: int, max_new_tokens: int,
                 params: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
                 stats: SpecStats | None = None):
        if target.config.vocab_size != draft.config.vocab_size:
            raise ValueError(f"target and draft must share a vocabulary: target vocab_size {target.config.vocab_size}, "
                             f"draft vocab_size {draft.config.vocab_size}")
        if k < 0:
            raise ValueError(f"k (draft tokens per step) must be >= 0, got {k}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if prompts.dim() != 2 or prompts.size(1) == 0:
            raise ValueError("prompts must be a non-empty (batch, length) tensor of token ids")
        ctx = min(target.config.block_size, draft.config.block_size)
        B, P = prompts.shape
        if P + max_new_tokens - 1 > ctx:  # the last emitted token is never fed to a model
            raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                             f"{ctx} positions (the smaller of target and draft)")
        self.target, self.draft, self.k, self.params, self.generator = target, draft, k, params, generator
        self.device = target.tok_emb.weight.device
        self.seq = prompts.to(self.device)
        self.max_new_tokens, self.emitted = max_new_tokens, 0
        cache_len = max(1, min(ctx, P + max_new_tokens - 1))
        self.target_cache = KVCache.for_model(target, B, cache_len)
        self.draft_cache = KVCache.for_model(draft, B, cache_len)
        self.stats = stats if stats is not None else SpecStats()
        self.stats.k, self.stats.prompt_tokens = k, P
        if len(self.stats.accept_hist) != k + 1:  # a stats object reused across runs keeps accumulating
            self.stats.accept_hist = [0] * (k + 1)

    @property
    def done(self) -> bool:
        return self.emitted >= self.max_new_tokens

    def _propose(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft k tokens -> d (B, k) and q_draft (B, k, V), the distributions they were drawn from."""
        B = self.seq.size(0)
        d = torch.empty(B, k, dtype=torch.long, device=self.device)
        q_draft = []
        t0 = time.perf_counter()
        for i in range(k):
            # First call feeds every token the draft cache is missing (the whole prompt at first;
            # [d_k of last step, bonus] after a fully accepted step; else just `last`).
            start = self.draft_cache.length
            inp = self.seq[:, start:] if i == 0 else d[:, i - 1:i]
            logits = self.draft(inp, self.draft_cache, start)[:, -1]
            q_i = distribution(logits, self.params)  # (B, V) float32: exactly what d_i is drawn from
            d[:, i] = q_i.argmax(-1) if self.params.greedy else draw(q_i, self.generator)
            q_draft.append(q_i)
            self.stats.draft_calls += 1
        self.stats.draft_s += time.perf_counter() - t0
        V = self.target.config.vocab_size
        return d, (torch.stack(q_draft, 1) if q_draft else torch.empty(B, 0, V, device=self.device))

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        B, n = self.seq.shape
        remaining = self.max_new_tokens - self.emitted
        if remaining <= 0:
            return self.seq.new_empty(B, 0)
        k = min(self.k, remaining - 1)  # a step emits at most k+1 tokens: never overshoot max_new_tokens
        d, q_draft = self._propose(k)

        # Target: ONE forward over [missing tokens (prompt at first, else `last`), d_1..d_k]. The cache
        # holds seq[:-1], so the last k+1 logits are p_target_1..p_target_{k+1} (position i verifies d_i).
        t0 = time.perf_counter()
        start = self.target_cache.length
        logits = self.target(torch.cat([self.seq[:, start:], d], 1), self.target_cache, start)[:, -(k + 1):]
        p_target = distribution(logits, self.params)  # (B, k+1, V) float32, same processors as q_draft
        self.stats.target_calls += 1
        self.stats.target_s += time.perf_counter() - t0

        # Accept d_i iff u_i < min(1, p_target_i(d_i)/q_draft_i(d_i)). q_draft_i(d_i) > 0 (d_i was drawn
        # from it) and u_i < 1, so this is u_i * q(d_i) < p(d_i): no division, and min(1, .) is implicit.
        p_d = p_target[:, :k].gather(-1, d.unsqueeze(-1)).squeeze(-1)  # (B, k)
        q_d = q_draft.gather(-1, d.unsqueeze(-1)).squeeze(-1)  # (B, k)
        ok = uniforms(B, k, self.generator, self.device) * q_d < p_d  # (B, k)
        n_acc = ok.long().cumprod(-1).sum(-1)  # (B,) leading accepted drafts per row
        if k > 0:  # the last step may propose fewer than self.k (max_new_tokens); k = 0 proposes nothing
            for c in n_acc.tolist():
                self.stats.accept_hist[c] += 1
            self.stats.drafts_proposed += B * k
            self.stats.drafts_accepted += int(n_acc.sum())
        m = int(n_acc.min())  # synchronised rule: every row emits m+1 tokens

        # Token m+1 of each row: an accepted draft d_{m+1} where n_r > m; else the residual at
        # position m+1 (a rejection there) or, when m == k (all accepted), the bonus from p_target_{k+1}.
        if m == k:
            extra = draw(p_target[:, k], self.generator) if not self.params.greedy else p_target[:, k].argmax(-1)
        else:
            fix = residual(p_target[:, m], q_draft[:, m])  # (B, V)
            fix_tok = fix.argmax(-1) if self.params.greedy else draw(fix, self.generator)
            extra = torch.where(n_acc > m, d[:, m], fix_tok)
        new = torch.cat([d[:, :m], extra.unsqueeze(1)], 1)  # (B, m+1)

        # Roll back: the target processed seq + d_1..d_k (length n+k); keep seq + d_1..d_m (= new seq
        # minus its last token, length n+m). The draft processed up to d_{k-1} (length n+k-1): crop it
        # to n+m too when it is longer; when m == k it lacks d_k, which its next call feeds.
        self.seq = torch.cat([self.seq, new], 1)
        self.target_cache.crop(n + m)
        self.draft_cache.crop(min(self.draft_cache.length, n + m))
        self.emitted += m + 1
        self.stats.new_tokens = self.emitted
        return new


def _check_prompt_batch(prompts) -> torch.Tensor:
    if isinstance(prompts, torch.Tensor):
        return prompts.long()
    lens = {len(p) for p in prompts}
    if len(lens) != 1:
        raise ValueError(f"speculative batch decoding needs prompts of equal length, got lengths {sorted(lens)}")
    return torch.tensor([list(p) for p in prompts], dtype=torch.long)


@torch.inference_mode()
def speculative_stream(target, draft, prompt_ids: list[int], max_new_tokens: int, k: int = 4,
                       params: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
                       eos_ids: set[int] = frozenset(), stats: SpecStats | None = None) -> Iterator[int]:
    """Batch 1: yield up to max_new_tokens token ids, each an exact draw from the target (greedy: the
    target's greedy output token for token). An EOS id stops the stream and is not emitted (also when
    it sits inside a run of accepted drafts: the tokens after it are dropped)."""
    stats = stats if stats is not None else SpecStats()
    t0 = time.perf_counter()
    dec = SpeculativeDecoder(target, draft, _check_prompt_batch([prompt_ids]), k, max_new_tokens, params, generator, stats)
    stats.stopped_by = "max_new_tokens"
    emitted = 0
    while not dec.done:
        for tok in dec.step()[0].tolist():
            if tok in eos_ids:
                stats.stopped_by, stats.new_tokens = "eos", emitted
                stats.total_s = time.perf_counter() - t0
                return
            emitted += 1
            yield tok
        stats.total_s = time.perf_counter() - t0
    stats.new_tokens = emitted


@torch.inference_mode()
def speculative_generate_batch(target, draft, prompts, max_new_tokens: int, k: int = 4,
                               params: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
                               eos_ids: set[int] = frozenset(), pad_id: int = -1,
                               stats: SpecStats | None = None) -> torch.Tensor:
    """Batch > 1 (equal-length prompts) with the synchronised rule -> (B, max_new_tokens) new ids.
    A row that emits an EOS id is finished: that position and everything after it read `pad_id`;
    the run stops early once every row is finished."""
    stats = stats if stats is not None else SpecStats()
    t0 = time.perf_counter()
    dec = SpeculativeDecoder(target, draft, _check_prompt_batch(prompts), k, max_new_tokens, params, generator, stats)
    P = dec.seq.size(1)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=dec.device)
    stats.stopped_by = "max_new_tokens"
    while not dec.done:
        dec.step()
        if eos.numel() and torch.isin(dec.seq[:, P:], eos).any(-1).all():
            stats.stopped_by = "eos"
            break
    out = dec.seq[:, P:]
    if eos.numel():
        finished = torch.isin(out, eos).long().cumsum(-1) > 0
        out = out.masked_fill(finished, pad_id)
    pad = max_new_tokens - out.size(1)
    if pad:
        out = torch.cat([out, out.new_full((out.size(0), pad), pad_id)], 1)
    stats.total_s = time.perf_counter() - t0
    return out
