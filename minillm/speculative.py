"""Speculative decoding: a draft proposes k tokens, the target checks them in ONE forward.

Notation (the papers swap letters; we do not): p_target is the target's processed next-token
distribution, q_draft the distribution the draft actually chose its token from (a draft model's
processed by the same SamplingParams, or one-hot when greedy; prompt lookup's one-hot). One step,
from a sequence whose last token is `last`:

1. The draft proposes d_1..d_k with d_i ~ q_draft_i, storing q_draft_i (float32).
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

Cache invariant (the target, and a draft model): the cache holds a prefix of the emitted sequence
that excludes its last token. The target's holds exactly seq[:-1] after each step; the draft's may
lag by one token (after all k drafts were accepted it never processed d_k): the next draft call
feeds every token it is missing, so d_k is written into the draft cache then (gpt-fast's "fill"
step, merged).

Processors that read earlier tokens (repetition / presence / frequency penalties, n-gram bans) see
the right history at every position: q_draft_i and p_target_i are both processed with history
seq + d_1..d_{i-1}, the prefix the token at that position follows, exactly as plain sampling would.

Adaptive k (optional, `adaptive_k=True`; the Hugging Face "heuristic" schedule): after a step in
which every draft was accepted, k grows by 2 (up to k_max); after any rejection it shrinks by 1
(down to 1). The choice of k only uses tokens already emitted, so every step is still exact.

Two drafts, one loop: the decoder asks its draft for proposals (`propose(decoder, k)` -> d, q_draft,
at most k of them) and tells it how much of the step was kept (`keep(length)`).
  * ModelDraft: a smaller model with the target's vocabulary and its own KV cache (a model passed as
    the draft is wrapped in one). It samples d_i ~ q_draft_i autoregressively, one forward per draft.
  * PromptLookup: no model (prompt lookup decoding; Hugging Face's `prompt_lookup_num_tokens`, vLLM's
    n-gram speculator). For n = max_ngram down to 1 it looks for the most recent earlier occurrence of
    the sequence's last n tokens (prompt and text so far) and proposes the k tokens that followed it
    (`lookup`); with no occurrence it proposes nothing, and that step is a plain step (k = 0: the
    target's call yields the bonus token only). q_draft is one-hot on the proposed token, so step 3
    accepts d_i with probability p_target_i(d_i) and the residual is norm(max(0, p_target_i -
    onehot(d_i))): p_target_i without d_i, renormalised. The proof above holds for any q_draft the
    token was really drawn from, a point mass included, and the proposal depends only on tokens
    already emitted: the output is exact, sampled or greedy. In a batch, a row with no match makes
    the step a plain one for every row (rows stay in step).

Tracing (optional, `trace=callable`): after each step the callable receives a SpecStep holding
the step's drafts, q_draft, p_target, uniforms, acceptance counts and emitted tokens (the loop's
own tensors; nothing extra is computed when no trace is given). The inspector prints these.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .generate import Stats, check_budget, check_prompts, check_same_vocab, next_logits
from .kv_cache import KVCache
from .sampling import SamplingParams, choose, choose_from, distribution, one_hot


@dataclass
class SpecStep:
    """One draft-and-verify step, as a `trace` callable receives it. Tensors are the loop's own (read
    them, do not modify them); B rows, k drafts, V vocabulary entries, all float32 distributions."""
    start: int  # sequence length (prompt + emitted) before this step
    drafts: torch.Tensor  # (B, k) d_1..d_k
    q_draft: torch.Tensor  # (B, k, V) the distributions the drafts were drawn from
    p_target: torch.Tensor  # (B, k+1, V) the target's processed distributions at the k+1 positions
    uniforms: torch.Tensor  # (B, k) u_i; d_i accepted iff u_i * q_draft_i(d_i) < p_target_i(d_i)
    n_accepted: torch.Tensor  # (B,) leading accepted drafts per row
    m: int  # min over rows of n_accepted: every row emits m+1 tokens
    emitted: torch.Tensor  # (B, m+1) the tokens this step emitted
    fix: torch.Tensor | None  # (B, V) norm(max(0, p - q)) at position m+1; None when m == k (bonus step)

    @property
    def k(self) -> int:
        return self.drafts.size(1)

    def last_kind(self, row: int = 0) -> str:
        """How the row's last emitted token was chosen: 'bonus' (all k accepted; drawn from p_target_{k+1}),
        'residual' (drawn from fix after d_{m+1} was rejected) or 'draft' (an accepted draft: another row's
        rejection cut the step short)."""
        if self.m == self.k:
            return "bonus"
        return "draft" if int(self.n_accepted[row]) > self.m else "residual"


@dataclass
class SpecStats(Stats):
    """Speculative decoding's statistics, beside the core's tokens, times and calls."""
    k: int = 0  # drafts asked per target call (with adaptive k: the starting value)
    batch: int = 1
    accept_hist: list[int] = field(default_factory=list)  # [n]: target calls where n drafts were accepted (rows pooled)
    drafts_proposed: int = 0  # rows pooled
    drafts_accepted: int = 0  # counted before the synchronised batch rule truncates a step
    overlap_sum: float = 0.0  # sum over verified positions of sum_x min(p_target, q_draft) = 1 - TV

    @property
    def mean_accepted(self) -> float:
        """Mean number of drafts accepted per target call (and row), as gpt-fast prints it."""
        n = sum(self.accept_hist)
        return sum(i * c for i, c in enumerate(self.accept_hist)) / n if n else math.nan

    @property
    def acceptance_rate(self) -> float:
        return self.drafts_accepted / self.drafts_proposed if self.drafts_proposed else math.nan

    @property
    def empirical_alpha(self) -> float:
        """1 - mean total variation between p_target and q_draft: the chance that one draft is accepted
        (Leviathan et al.'s alpha), measured without sampling noise."""
        return self.overlap_sum / self.drafts_proposed if self.drafts_proposed else math.nan

    @property
    def mean_k(self) -> float:
        """Drafts proposed per target call (= k unless adaptive, or clamped by max_new_tokens)."""
        calls = self.calls.get("target", 0)
        return self.drafts_proposed / (self.batch * calls) if calls else math.nan

    @property
    def tokens_per_target_call(self) -> float:
        calls = self.calls.get("target", 0)
        return self.new_tokens / calls if calls else math.nan

    @property
    def plain_calls(self) -> int:
        """Target calls with no draft to check (prompt lookup without a match, or a last step of one token)."""
        return self.calls.get("target", 0) - sum(self.accept_hist)

    def method_parts(self) -> list[str]:
        if not self.accept_hist:
            return []
        hist = " ".join(f"{i}:{c}" for i, c in enumerate(self.accept_hist))
        return [f"acceptance histogram (drafts accepted per target call) {hist} | mean accepted "
                f"{self.mean_accepted:.2f} of k={self.mean_k:.2f} (rate {self.acceptance_rate:.2f}, "
                f"alpha = 1 - TV {self.empirical_alpha:.2f}) | {self.tokens_per_target_call:.2f} tokens per target call "
                f"({self.plain_calls} of them with no draft)"]


# --- the pieces of the accept/reject math, module-level so tests can break each on purpose ---

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


class ModelDraft:
    """The draft is a smaller model with the target's vocabulary and its own KV cache: it samples
    d_i ~ q_draft_i autoregressively, q_draft_i processed by the run's SamplingParams (one-hot when greedy)."""

    def __init__(self, model, target, batch: int, prompt_len: int, max_new_tokens: int):
        check_same_vocab(target, model, ("target", "draft"))
        check_budget(prompt_len, max_new_tokens, model.config.block_size, who="the draft")
        self.model, self.cache = model, KVCache.for_run(model, batch, prompt_len, max_new_tokens)

    def propose(self, dec: SpeculativeDecoder, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft k tokens after dec.seq -> d (B, k) and q_draft (B, k, V), the distributions they were drawn from."""
        B = dec.seq.size(0)
        d = torch.empty(B, k, dtype=torch.long, device=dec.device)
        q_draft = []
        for i in range(k):
            # First call feeds every token the draft cache is missing (the whole prompt at first;
            # [d_k of last step, bonus] after a fully accepted step; else just `last`).
            t0 = time.perf_counter()
            inp = dec.seq[:, self.cache.length:] if i == 0 else d[:, i - 1:i]
            logits = next_logits(self.model, inp, self.cache)
            # the draft's token d_i and q_draft_i, the distribution d_i was ACTUALLY chosen from (processed
            # like the target's; one-hot when greedy): storing the raw softmax instead is a classic bug
            d[:, i], q_i = choose(logits, dec.params, dec.generator, dec._history(d, i))
            q_draft.append(q_i)
            dec.stats.timed("draft", time.perf_counter() - t0)
        V = self.model.config.vocab_size
        return d, (torch.stack(q_draft, 1) if q_draft else torch.empty(B, 0, V, device=dec.device))

    def keep(self, length: int) -> None:
        """The step kept seq[:length] in the target's cache: crop the draft's to it when longer (when every
        draft was accepted it lacks d_k, which its next call feeds)."""
        self.cache.crop(min(self.cache.length, length))


def lookup(ids: torch.Tensor, max_ngram: int, k: int) -> torch.Tensor:
    """Prompt lookup in one sequence ids (L,): for n = max_ngram down to 1, the most recent earlier
    occurrence of its last n tokens, and the k tokens that followed it -> (k,); empty (0,) when no
    n-gram of its end occurred before. Where the k tokens would run past the end of ids, the copy goes
    on from the tokens it proposes (an overlapping copy, as LZ77's): a text that repeats a run of p
    tokens is continued with that run, k tokens long."""
    for n in range(min(max_ngram, ids.size(0) - 1), 0, -1):
        earlier = ids.unfold(0, n, 1)[:-1]  # (L-n, n): every n-gram but the last one (the end itself)
        hits = (earlier == ids[-n:]).all(-1).nonzero()
        if len(hits):
            followed = ids[int(hits[-1]) + n:]  # after the most recent match, to the end: >= 1 token
            return followed.repeat(-(-k // followed.size(0)))[:k]  # position L+i copies position L+i-len(followed)
    return ids[:0]


@dataclass(frozen=True)
class PromptLookup:
    """The draft that costs nothing: proposes what followed the latest earlier occurrence of the text's
    last n tokens (n = max_ngram .. 1) in the prompt and the text so far (`lookup`), with a one-hot
    q_draft; nothing when there is none (module docstring). Holds no state: one object serves any run."""
    max_ngram: int = 3

    def __post_init__(self):
        if self.max_ngram < 1:
            raise ValueError(f"max_ngram (longest n-gram prompt lookup matches) must be >= 1, got {self.max_ngram}")

    def propose(self, dec: SpeculativeDecoder, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """d (B, c) and q_draft = onehot(d) (B, c, V): c = k where every row's lookup found a match, else 0."""
        t0 = time.perf_counter()
        found = [lookup(row, self.max_ngram, k) for row in dec.seq]
        c = min(len(f) for f in found)  # a batch's rows stay in step: a row with no match, none for all
        d = torch.stack([f[:c] for f in found])  # (B, c)
        V = dec.target.config.vocab_size
        q_draft = one_hot(d.reshape(-1), V).view(*d.shape, V)  # (B, c, V)
        dec.stats.timed("lookup", time.perf_counter() - t0)
        return d, q_draft

    def keep(self, length: int) -> None:
        """Nothing to roll back: the lookup reads dec.seq afresh at every step."""


class SpeculativeDecoder:
    """State of one speculative decoding run: the target, its cache, the draft and the emitted sequence.

    `draft`: a model (the target's vocabulary; wrapped in a ModelDraft, which keeps its cache) or a
    draft object such as PromptLookup. `step()` runs one draft proposal + target verification and
    returns the newly emitted tokens (B, c), c >= 1. `seq` (B, n) is prompt + everything emitted so
    far. With `adaptive_k`, `k` is the starting value and the number of drafts per step moves within
    [1, k_max] (default max(k, 16)); a draft may propose fewer than asked (prompt lookup)."""

    def __init__(self, target, draft, prompts: torch.Tensor, k: int, max_new_tokens: int,
                 params: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
                 stats: SpecStats | None = None, adaptive_k: bool = False, k_max: int | None = None,
                 trace: Callable[[SpecStep], None] | None = None):
        if k < 0 or (adaptive_k and k < 1):
            raise ValueError(f"k (draft tokens per step) must be >= {1 if adaptive_k else 0}, got {k}")
        k_max = max(k, 16) if k_max is None else k_max
        if adaptive_k and k_max < k:
            raise ValueError(f"k_max must be >= k (the starting k), got k_max {k_max} < k {k}")
        if prompts.dim() != 2:
            raise ValueError("prompts must be a (batch, length) tensor of token ids")
        check_prompts(prompts)
        B, P = prompts.shape
        check_budget(P, max_new_tokens, target.config.block_size, who="the target")
        if isinstance(draft, torch.nn.Module):
            draft = ModelDraft(draft, target, B, P, max_new_tokens)
        self.target, self.draft, self.k, self.params, self.generator = target, draft, k, params, generator
        self.adaptive_k, self.k_max, self.trace = adaptive_k, (k_max if adaptive_k else k), trace
        self.device = target.tok_emb.weight.device
        self.seq = prompts.to(self.device)
        self.max_new_tokens, self.emitted = max_new_tokens, 0
        self.target_cache = KVCache.for_run(target, B, P, max_new_tokens)
        self.stats = stats if stats is not None else SpecStats()
        self.stats.k, self.stats.batch, self.stats.prompt_tokens = k, B, P
        if len(self.stats.accept_hist) != self.k_max + 1:  # a stats object reused across runs keeps accumulating
            self.stats.accept_hist = [0] * (self.k_max + 1)

    @property
    def done(self) -> bool:
        return self.emitted >= self.max_new_tokens

    def _history(self, d: torch.Tensor, i: int) -> torch.Tensor | None:
        """The ids before draft position i (0-based): seq + d_1..d_i, or None when no processor reads them."""
        return torch.cat([self.seq, d[:, :i]], 1) if self.params.needs_history else None

    def _verify(self, d: torch.Tensor) -> torch.Tensor:
        """Target: ONE forward over [missing tokens (prompt at first, else `last`), d_1..d_k]. The cache
        holds seq[:-1], so the last k+1 logits are p_target_1..p_target_{k+1} (position i verifies d_i)."""
        B, k = d.shape
        t0 = time.perf_counter()
        start = self.target_cache.length
        logits = self.target(torch.cat([self.seq[:, start:], d], 1), self.target_cache, start)[:, -(k + 1):]
        if self.params.needs_history:  # each position has its own prefix: process them one by one
            p_target = torch.stack([distribution(logits[:, i], self.params, self._history(d, i))
                                    for i in range(k + 1)], 1)
        else:  # (B, k+1, V) in one call
            p_target = distribution(logits.reshape(B * (k + 1), -1), self.params).view(B, k + 1, -1)
        self.stats.timed("target", time.perf_counter() - t0)
        return p_target  # (B, k+1, V) float32, same processors as q_draft

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        B, n = self.seq.shape
        remaining = self.max_new_tokens - self.emitted
        if remaining <= 0:
            return self.seq.new_empty(B, 0)
        k = min(self.k, remaining - 1)  # a step emits at most k+1 tokens: never overshoot max_new_tokens
        d, q_draft = self.draft.propose(self, k)
        k = d.size(1)  # what the draft proposed: k, or fewer (prompt lookup: none without a match)
        p_target = self._verify(d)

        # Accept d_i iff u_i < min(1, p_target_i(d_i)/q_draft_i(d_i)). q_draft_i(d_i) > 0 (d_i was drawn
        # from it) and u_i < 1, so this is u_i * q(d_i) < p(d_i): no division, and min(1, .) is implicit.
        p_d = p_target[:, :k].gather(-1, d.unsqueeze(-1)).squeeze(-1)  # (B, k)
        q_d = q_draft.gather(-1, d.unsqueeze(-1)).squeeze(-1)  # (B, k)
        u = uniforms(B, k, self.generator, self.device)
        ok = u * q_d < p_d  # (B, k)
        n_acc = ok.long().cumprod(-1).sum(-1)  # (B,) leading accepted drafts per row
        if k > 0:  # k = 0 (nothing proposed) is a plain step: no acceptance to count
            for c in n_acc.tolist():
                self.stats.accept_hist[c] += 1
            self.stats.drafts_proposed += B * k
            self.stats.drafts_accepted += int(n_acc.sum())
            self.stats.overlap_sum += float(torch.minimum(p_target[:, :k], q_draft).sum())
        m = int(n_acc.min())  # synchronised rule: every row emits m+1 tokens

        # Token m+1 of each row: an accepted draft d_{m+1} where n_r > m; else the residual at
        # position m+1 (a rejection there) or, when m == k (all accepted), the bonus from p_target_{k+1}.
        fix = None
        if m == k:
            extra = choose_from(p_target[:, k], self.params.greedy, self.generator)
        else:
            fix = residual(p_target[:, m], q_draft[:, m])  # (B, V)
            fix_tok = choose_from(fix, self.params.greedy, self.generator)
            extra = torch.where(n_acc > m, d[:, m], fix_tok)
        new = torch.cat([d[:, :m], extra.unsqueeze(1)], 1)  # (B, m+1)

        # Roll back: the target processed seq + d_1..d_k (length n+k); keep seq + d_1..d_m (= new seq
        # minus its last token, length n+m). A draft model processed up to d_{k-1} (length n+k-1): it
        # crops to n+m too when longer; when m == k it lacks d_k, which its next call feeds.
        self.seq = torch.cat([self.seq, new], 1)
        self.target_cache.crop(n + m)
        self.draft.keep(n + m)
        self.emitted += m + 1
        self.stats.new_tokens = self.emitted
        if self.adaptive_k and k > 0:  # Hugging Face's heuristic schedule: +2 after a full acceptance, else -1
            self.k = min(self.k_max, self.k + 2) if m == k else max(1, self.k - 1)
        if self.trace is not None:
            self.trace(SpecStep(n, d, q_draft, p_target, u, n_acc, m, new, fix))
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
                       eos_ids: set[int] = frozenset(), stats: SpecStats | None = None, adaptive_k: bool = False,
                       k_max: int | None = None, trace: Callable[[SpecStep], None] | None = None) -> Iterator[int]:
    """Batch 1: yield up to max_new_tokens token ids, each an exact draw from the target (greedy: the
    target's greedy output token for token); `draft` is a model or PromptLookup(max_ngram). An EOS id
    stops the stream and is not emitted (also when it sits inside a run of accepted drafts: the tokens
    after it are dropped). `trace` gets a SpecStep after every step (before that step's tokens are yielded)."""
    stats = stats if stats is not None else SpecStats()
    t0 = time.perf_counter()
    dec = SpeculativeDecoder(target, draft, _check_prompt_batch([prompt_ids]), k, max_new_tokens, params, generator,
                             stats, adaptive_k, k_max, trace)
    stats.stopped_by = "max_new_tokens"
    emitted = 0
    while not dec.done:
        first = dec.emitted == 0
        new = dec.step()[0].tolist()
        stats.clock(t0, first)
        for tok in new:
            if tok in eos_ids:
                stats.stopped_by, stats.new_tokens = "eos", emitted
                return
            emitted += 1
            yield tok
    stats.new_tokens = emitted


@torch.inference_mode()
def speculative_generate_batch(target, draft, prompts, max_new_tokens: int, k: int = 4,
                               params: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
                               eos_ids: set[int] = frozenset(), pad_id: int = -1,
                               stats: SpecStats | None = None, adaptive_k: bool = False, k_max: int | None = None,
                               trace: Callable[[SpecStep], None] | None = None) -> torch.Tensor:
    """Batch > 1 (equal-length prompts) with the synchronised rule -> (B, max_new_tokens) new ids.
    A row that emits an EOS id is finished: that position and everything after it read `pad_id`;
    the run stops early once every row is finished."""
    stats = stats if stats is not None else SpecStats()
    t0 = time.perf_counter()
    dec = SpeculativeDecoder(target, draft, _check_prompt_batch(prompts), k, max_new_tokens, params, generator, stats,
                             adaptive_k, k_max, trace)
    P = dec.seq.size(1)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=dec.device)
    stats.stopped_by = "max_new_tokens"
    while not dec.done:
        first = dec.emitted == 0
        dec.step()
        stats.clock(t0, first)
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
    return out
