"""Turning logits into a token: penalties, n-gram bans, temperature, truncation, and the draw itself.

Each processor is a small pure function on float32 logits (B, V) that returns new logits; a token a
processor removes gets -inf. `process_logits` runs them in Hugging Face transformers' order
(`GenerationMixin._get_logits_processor`), `distribution` is the softmax of the result, and `choose`
(the one function every decoding loop, the speculative draft and contrastive decoding use to choose a
token) returns the tokens with the distribution they were chosen from, as gpt-fast's `sample` does:

    1. repetition_penalty      history   CTRL: a seen token's logit z becomes z/θ if z > 0, else z·θ
    2. presence_penalty        history   z -= presence · [count > 0]      (OpenAI-style; not in transformers)
    3. frequency_penalty       history   z -= frequency · count           (OpenAI-style; not in transformers)
    4. no_repeat_ngram_size    history   ban every token that would repeat an n-gram already in the history
    5. temperature             z / T     (T = 0: greedy, a real argmax; steps 6-9 are then skipped)
    6. top_k                   keep exactly the k largest (ties broken by lower index)
    7. top_p                   keep the smallest most-likely set whose probability reaches p
    8. min_p                   keep tokens with p >= min_p · max p
    9. typical_p               keep the tokens whose surprise -log p is closest to the entropy, until
                               their mass reaches typical_p

Defaults mean "off": temperature 1, penalties neutral (1, 0, 0), no n-gram ban, no truncation. So
SamplingParams() is pure ancestral sampling (unlike transformers, whose default top_k is 50).

History: steps 1-4 look at the previous token ids of each row, `history` (B, T), which the decoding
loop passes as prompt + generated so far. The prompt counts, for all four: transformers does so for
repetition_penalty and no_repeat_ngram_size (llama.cpp does too for presence/frequency; vLLM counts
only generated tokens there; we keep one rule).

Greedy (temperature 0) still applies steps 1-4, then takes the argmax; truncation cannot change the
argmax, so it is skipped. `process_logits` returns, for greedy, logits that are 0 at the argmax and
-inf elsewhere, so `softmax(process_logits(...))` is ALWAYS the distribution the token is drawn
from (one-hot when greedy); speculative decoding relies on knowing that distribution exactly.

Where we differ from transformers on purpose: top-k keeps exactly k tokens when the k-th largest
logit is tied (transformers keeps every tied token). Like transformers, every truncation keeps at
least `min_tokens_to_keep` tokens. Top-k, top-p and min-p always keep the most likely token;
typical-p may drop it (a token far more likely than the rest is not "typical"), by design.
If no_repeat_ngram_size would ban every token of a row, that row's ban is lifted (nothing else could
be drawn; transformers would produce NaN there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0: greedy (argmax); < 1 sharper, > 1 flatter
    top_k: int | None = None  # keep exactly the k most likely tokens (ties broken by index)
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches top_p
    min_p: float | None = None  # keep tokens whose probability is >= min_p times the largest one
    typical_p: float | None = None  # locally typical sampling: keep the most typical tokens up to this mass
    repetition_penalty: float = 1.0  # > 1 discourages every token seen in the history (1: off)
    presence_penalty: float = 0.0  # subtracted once from a seen token's logit (0: off; < 0 encourages)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the history (0: off; < 0 encourages)
    no_repeat_ngram_size: int = 0  # n > 0: never repeat an n-gram of the history (0: off)
    min_tokens_to_keep: int = 1  # no truncation (top-k/p, min-p, typical-p) keeps fewer tokens than this

    def __post_init__(self):
        if not self.temperature >= 0 or math.isinf(self.temperature):  # `not >=` also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy) and finite, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None for off), got {self.top_k}")
        for name in ("top_p", "typical_p"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1] (or None for off), got {v}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (or None for off), got {self.min_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number (0 = off), got {getattr(self, name)}")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be an integer >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        if not isinstance(self.min_tokens_to_keep, int) or self.min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be an integer >= 1, got {self.min_tokens_to_keep}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        """True when a processor looks at the previous tokens (steps 1-4)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.no_repeat_ngram_size > 0)


# ----------------------------------------------------------------------------- history processors

def token_counts(history: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """history (B, T) ids -> (B, V) float32: how often each token occurs per row."""
    counts = torch.zeros(history.size(0), vocab_size, device=history.device)
    return counts.scatter_add_(1, history, torch.ones_like(history, dtype=counts.dtype))


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token present in the history: divide a positive logit by `penalty`,
    multiply a negative one (either way the token gets less likely for penalty > 1)."""
    seen = token_counts(history, logits.size(-1)) > 0
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, history: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """z -= frequency·count + presence·[count > 0], count = occurrences in the history."""
    counts = token_counts(history, logits.size(-1))
    return logits - frequency * counts - presence * (counts > 0).float()


def ban_repeated_ngrams(logits: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """Ban (-inf) every token t such that (last n-1 tokens, t) is an n-gram already in the history.
    n = 1 bans every token seen. A row that would be left
    with no finite logit is returned unchanged (there would be nothing to draw)."""
    B, T = history.shape
    if T < n:
        return logits
    V = logits.size(-1)
    grams = history.unfold(1, n, 1)  # (B, T-n+1, n): every n-gram of each row
    context = history[:, T - n + 1:]  # (B, n-1): the n-gram the next token would complete
    hit = (grams[..., :-1] == context[:, None, :]).all(-1)  # (B, T-n+1)
    banned = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
    banned.scatter_(1, torch.where(hit, grams[..., -1], V), True)  # non-hits land in the spare column V
    out = logits.masked_fill(banned[:, :V], float("-inf"))
    stuck = torch.isneginf(out).all(-1, keepdim=True)  # every token banned: keep the row as it was
    return torch.where(stuck, logits, out)


# ----------------------------------------------------------------------------- truncation

def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Mask all but exactly k entries per row: those above the k-th largest value, then of those equal
    to it the lowest indices (torch.topk alone may return any of the tied ones)."""
    if k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    above, tied = logits > kth, logits == kth
    room = k - above.sum(-1, keepdim=True)  # how many of the tied ones fit
    keep = above | (tied & (tied.cumsum(-1) <= room))
    return logits.masked_fill(~keep, float("-inf"))


def _keep_prefix(logits: torch.Tensor, order: torch.Tensor, mass: float, min_keep: int) -> torch.Tensor:
    """Walk each row's tokens in `order` and keep the shortest prefix whose probability reaches `mass`
    (the token that crosses it included), and at least min_keep tokens. Shared by top-p and typical-p."""
    probs = logits.softmax(-1).gather(-1, order)  # (B, V) in walking order
    cum = probs.cumsum(-1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], -1)  # mass of the tokens walked before
    drop_sorted = before >= mass  # the first token has before = 0 < mass, so it always stays
    drop_sorted[:, :min_keep] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their total probability reaches p (at least min_keep)."""
    if p >= 1.0:
        return logits
    return _keep_prefix(logits, logits.argsort(-1, descending=True), p, min_keep)


def apply_min_p(logits: torch.Tensor, min_p: float, min_keep: int = 1) -> torch.Tensor:
    """Keep tokens with p >= min_p · max p. Softmax's normaliser cancels, so this is the logit test
    z >= max z + log(min_p): no tiny probabilities are formed (contrastive.py's head uses the same)."""
    if min_p <= 0:
        return logits
    drop = logits < logits.max(-1, keepdim=True).values + math.log(min_p)
    if min_keep > 1:
        drop.scatter_(-1, logits.topk(min(min_keep, logits.size(-1)), dim=-1).indices, False)
    return logits.masked_fill(drop, float("-inf"))


def apply_typical_p(logits: torch.Tensor, mass: float, min_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022): rank tokens by |-log p - H|, the distance of their
    surprise from the entropy H, and keep the most typical ones until their mass reaches `mass`."""
    if mass >= 1.0:
        return logits
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).nansum(-1, keepdim=True)  # nansum: removed tokens give 0 · -inf
    gap = (-logp - entropy).abs()  # removed tokens: inf, walked last
    return _keep_prefix(logits, gap.argsort(-1), mass, min_keep)


# ----------------------------------------------------------------------------- the pipeline

def _check_history(history, logits: torch.Tensor) -> torch.Tensor:
    if history is None:
        raise ValueError("repetition_penalty, presence_penalty, frequency_penalty and no_repeat_ngram_size need the "
                         "previous token ids: call process_logits(logits, params, history=...) with history (B, T)")
    if not isinstance(history, torch.Tensor) or history.dim() != 2 or history.size(0) != logits.size(0):
        shape = tuple(history.shape) if isinstance(history, torch.Tensor) else type(history).__name__
        raise ValueError(f"history must be a (batch, length) tensor of token ids with batch {logits.size(0)} "
                         f"(as the logits), got {shape}")
    if history.dtype.is_floating_point or history.dtype == torch.bool:
        raise ValueError(f"history must hold integer token ids, got dtype {history.dtype}")
    if history.numel() and int(history.max()) >= logits.size(-1):
        raise ValueError(f"history holds token id {int(history.max())}, outside the vocabulary of {logits.size(-1)}")
    return history.long().to(logits.device)


def apply_history_processors(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None) -> torch.Tensor:
    """Steps 1-4 of process_logits (penalties, no-repeat-ngram) on float32 logits (B, V); the rest untouched."""
    if params.needs_history:
        history = _check_history(history, logits)
        if params.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            logits = apply_presence_frequency(logits, history, params.presence_penalty, params.frequency_penalty)
        if params.no_repeat_ngram_size > 0:
            logits = ban_repeated_ngrams(logits, history, params.no_repeat_ngram_size)
    return logits


def process_logits(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, V) -> float32 logits (B, V) whose softmax is the distribution to draw from.

    history: (B, T) previous token ids per row (prompt + generated), needed only
    when a penalty or no_repeat_ngram_size is on (ValueError if missing then). Greedy (temperature 0)
    gives 0 at the argmax and -inf elsewhere. The single entry point for plain, speculative and
    contrastive decoding."""
    logits = apply_history_processors(logits.float(), params, history)
    if params.greedy:  # a real argmax (first index on ties), never a division by a tiny temperature
        return one_hot(logits.argmax(-1), logits.size(-1)).log()  # 0 at the argmax, -inf elsewhere
    if params.temperature != 1.0:
        logits = logits / params.temperature
    keep = params.min_tokens_to_keep
    if params.top_k is not None:
        logits = apply_top_k(logits, max(params.top_k, keep))
    if params.top_p is not None:
        logits = apply_top_p(logits, params.top_p, keep)
    if params.min_p is not None:
        logits = apply_min_p(logits, params.min_p, keep)
    if params.typical_p is not None:
        logits = apply_typical_p(logits, params.typical_p, keep)
    return logits


def one_hot(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Tokens (B,) -> float32 (B, vocab): 1.0 at each row's token, 0.0 elsewhere (greedy's distribution)."""
    return torch.zeros(tokens.size(0), vocab, device=tokens.device).scatter_(-1, tokens.unsqueeze(-1), 1.0)


def distribution(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, V) -> the float32 distribution (B, V) a token is chosen from: softmax(process_logits),
    one-hot at the argmax when greedy."""
    if params.greedy:
        return choose(logits, params, history=history)[1]
    return process_logits(logits, params, history).softmax(-1)


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           history: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose each row's next token: (tokens (B,), probs (B, V)), probs being the distribution they were
    chosen from (what speculative decoding's acceptance test and the inspector's trace need)."""
    if params.greedy:  # the argmax once; its distribution is the one-hot (no exp over the vocabulary)
        tokens = apply_history_processors(logits.float(), params, history).argmax(-1)
        return tokens, one_hot(tokens, logits.size(-1))
    probs = distribution(logits, params, history)
    return choose_from(probs, False, generator), probs


def choose_from(probs: torch.Tensor, greedy: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Tokens (B,) from a distribution (B, V): its argmax when greedy (first index on ties), else one
    draw per row with `generator` (the global RNG is untouched when one is given)."""
    if greedy:
        return probs.argmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
