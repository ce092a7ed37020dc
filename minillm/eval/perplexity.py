"""Perplexity with strided sliding windows, and bits per byte.

    window_spans(n, context, stride)      the windows: (begin, end, first scored position)
    perplexity(model, ids, tokenizer, ...) -> Perplexity (nll, tokens, bytes, ppl, bits per byte)
    eval_text(text, split, max_chars)     the text a run scores: a whole file, or its train / val part

Long texts are scored in windows of up to `context` tokens that start every `stride` tokens (the
recipe of Hugging Face's "Perplexity of fixed-length models"). Each window is one forward pass
without a cache; of its tokens, only those after the previous window's end are scored, so with
stride < context every token is scored exactly once, and (except in the first window) with at
least context - stride tokens before it. A window's first token has nothing before it in the
window and is never scored: for the first window that is the text's first token; with stride ==
context (disjoint windows, the fastest) it is every window's first token, as in that recipe.

    ids     t0 t1 t2 t3 t4 t5 t6 t7 t8 t9          context 6, stride 3
    win 1   t0 t1 t2 t3 t4 t5                      scores t1..t5 (5 tokens)
    win 2            t3 t4 t5 t6 t7 t8             scores t6..t8 (3 tokens, 3..5 tokens of context)
    win 3                     t6 t7 t8 t9          scores t9    (ends at the text's end: the last window)

    perplexity    = exp(total NLL / scored tokens)                    (NLL in nats, natural log)
    bits per byte = total NLL / ln 2 / UTF-8 bytes of the scored tokens

Perplexity per token depends on the tokenizer (a char model predicts ~4x more, easier tokens than
a BPE model on the same text); bits per byte does not, so it compares any two models on one text.
stride 1 gives every token a full context (one forward per token).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..data import VAL_FRACTION, train_val_cut


@dataclass
class Perplexity:
    nll: float  # total negative log-likelihood of the scored tokens, nats
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the scored tokens
    windows: int
    context: int
    stride: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan

    @property
    def nll_per_token(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl": self.ppl, "nll_per_token": self.nll_per_token,
                "bits_per_byte": self.bits_per_byte}


def window_spans(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first): the window is ids[begin:end], and it scores positions first..end-1."""
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}: a larger stride "
                         f"would leave tokens unscored")
    spans, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        spans.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return spans


def _batches(spans, batch_size: int):
    """Consecutive windows of one length, at most batch_size at a time (only the last window is shorter)."""
    group: list = []
    for span in spans:
        if group and (len(group) == batch_size or span[1] - span[0] != group[0][1] - group[0][0]):
            yield group
            group = []
        group.append(span)
    if group:
        yield group


@torch.inference_mode()
def perplexity(model, ids: list[int] | torch.Tensor, tokenizer=None, context: int | None = None,
               stride: int | None = None, batch_size: int | None = None,
               progress: Callable[[int], None] | None = None) -> Perplexity:
    """Score the token ids with strided sliding windows (module docstring). context defaults to the
    model's block_size, stride to context // 2; `tokenizer` (for the byte count) may be None (bytes 0).
    batch_size windows go through the model at once (default: as many as keep the logits near 512 MiB,
    at most 8); progress(n) is called after every n windows."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(ids)}")
    context = context or model.config.block_size
    if context > model.config.block_size:
        raise ValueError(f"context {context} exceeds the model's block_size ({model.config.block_size})")
    stride = stride or max(1, context // 2)
    spans = window_spans(len(ids), context, stride)
    batch_size = batch_size or max(1, min(8, 2**27 // (context * model.config.vocab_size)))
    device = model.tok_emb.weight.device
    nll = 0.0
    for group in _batches(spans, batch_size):
        x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)  # (B, T)
        logits = model(x)  # (B, T, V): row t predicts token t + 1
        for row, (b, e, first) in enumerate(group):
            z = logits[row, first - b - 1:e - b - 1].float()  # (scored, V)
            nll += F.cross_entropy(z, x[row, first - b:e - b], reduction="sum").item()
        if progress is not None:
            progress(len(group))
    scored = [t for _, end, first in spans for t in ids[first:end].tolist()]
    n_bytes = sum(len(tokenizer.token_bytes(t)) for t in scored) if tokenizer is not None else 0
    return Perplexity(nll, len(scored), n_bytes, len(spans), context, stride)


def eval_text(text: str, split: str = "all", max_chars: int | None = None, val_fraction: float = VAL_FRACTION) -> str:
    """The part of `text` to score: "all", or "train" / "val" cut at the same character (the first
    1 - val_fraction of the characters are train, as data.split_train_val cuts a char model's ids),
    so that every model, whatever its tokenizer, scores the same characters; then at most max_chars."""
    if split not in ("all", "train", "val"):
        raise ValueError(f"split must be all, train or val, got {split!r}")
    cut = train_val_cut(len(text), val_fraction)
    part = text if split == "all" else text[:cut] if split == "train" else text[cut:]
    return part[:max_chars] if max_chars is not None else part
