"""Diversity and repetition of generated text, each defined once, with its normaliser named.

Every function takes a corpus: a list of continuations (prompt already stripped: a metric over
prompt + continuation, as the seed article computed it, mostly measures the prompt). Tokens are
whitespace-separated words, `text.split()`, as in SimCTG and the seed article, whatever the model's
tokenizer is, so char-level and BPE models are scored alike.

    ngram_entropy(texts, n)  Ent-n (Zhang et al. 2018): -sum_g f(g) log2 f(g), f = the n-gram
                             frequencies pooled over the whole corpus. Bits. Higher: more varied.
    distinct_n(texts, n)     distinct n-grams in the corpus / all n-grams in the corpus (the
                             "per n-gram" normaliser; Li et al. 2016 divided by tokens instead).
    rep_n(texts, n)          SimCTG's rep-n: 100 * (1 - sum_t unique_t / sum_t total_t), unique
                             n-grams counted within each text. Percent; lower: less repetition.
                             Unlike SimCTG's loop, the last n-gram of each text is counted.

distinct-n looks across texts (two samples that say the same thing lower it); rep-n looks only
inside each text (a loop that repeats itself raises it).
"""

from __future__ import annotations

import math
from collections import Counter


def words(text: str) -> list[str]:
    return text.split()


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def ngram_entropy(texts: list[str], n: int) -> float:
    counts = Counter(g for t in texts for g in ngrams(words(t), n))
    total = sum(counts.values())
    if total == 0:
        return float("nan")
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def distinct_n(texts: list[str], n: int) -> float:
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def rep_n(texts: list[str], n: int) -> float:
    unique = total = 0
    for t in texts:
        grams = ngrams(words(t), n)
        unique += len(set(grams))
        total += len(grams)
    return 100.0 * (1.0 - unique / total) if total else float("nan")
