"""Metrics of generated text: overlap with a reference (from the libraries that define them) and
diversity / repetition (each defined once here, its normaliser named).

Overlap with references, hypotheses[i] against references[i] (one reference each):
    bleu(hyps, refs)     sacrebleu's corpus BLEU (its default 13a tokenizer, exp smoothing), 0..100.
                         Corpus level, as BLEU is defined: n-gram counts are pooled over all pairs
                         before the precisions are taken (not a mean of sentence BLEUs).
    chrf(hyps, refs)     sacrebleu's corpus chrF (character 6-grams, beta 2), 0..100.
    rouge(hyps, refs)    rouge-score's ROUGE-1, ROUGE-2, ROUGE-L F1, each the mean over pairs (ROUGE is a
                         per-pair score), x100. Its tokenizer lowercases and keeps only [a-z0-9] runs,
                         so text in other scripts scores 0; no stemming.

Diversity and repetition. Each takes a corpus: a list of continuations (prompt already stripped: a
metric over prompt + continuation mostly measures the prompt). Tokens are whitespace-separated
words, `text.split()`, as in SimCTG, whatever the model's tokenizer is, so char-level and BPE
models are scored alike.

    ngram_entropy(texts, n)  Ent-n (Zhang et al. 2018): -sum_g f(g) log2 f(g), f = the n-gram
                             frequencies pooled over the whole corpus. Bits. Higher: more varied.
    distinct_n(texts, n)     distinct n-grams in the corpus / all n-grams in the corpus (the
                             "per n-gram" normaliser; Li et al. 2016 divided by tokens instead).
    rep_n(texts, n)          SimCTG's rep-n: 100 * (1 - sum_t unique_t / sum_t total_t), unique
                             n-grams counted within each text. Percent; lower: less repetition.
                             Unlike SimCTG's loop, the last n-gram of each text is counted.

distinct-n looks across texts (two samples that say the same thing lower it); rep-n looks only
inside each text (a loop that repeats itself raises it).

    generation_metrics(hyps, refs)  all of the above in one dict (the table generate-metrics prints)
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


# ----------------------------------------------------------------------------- overlap with references

def _pairs(hyps: list[str], refs: list[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references: give one reference per hypothesis")
    if not hyps:
        raise ValueError("no hypotheses to score")


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError as e:
        raise RuntimeError("BLEU and chrF need sacrebleu: pip install 'minillm[eval]' (or pip install sacrebleu)") from e
    return sacrebleu


def bleu(hyps: list[str], refs: list[str]) -> float:
    _pairs(hyps, refs)
    return _sacrebleu().corpus_bleu(hyps, [refs]).score  # [refs]: one reference stream, refs[i] for hyps[i]


def chrf(hyps: list[str], refs: list[str]) -> float:
    _pairs(hyps, refs)
    return _sacrebleu().corpus_chrf(hyps, [refs]).score


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hyps: list[str], refs: list[str]) -> dict[str, float]:
    _pairs(hyps, refs)
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise RuntimeError("ROUGE needs rouge-score: pip install 'minillm[eval]' (or pip install rouge-score)") from e
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    scores = [scorer.score(r, h) for h, r in zip(hyps, refs)]  # score(target, prediction)
    return {t: 100.0 * sum(s[t].fmeasure for s in scores) / len(scores) for t in ROUGE_TYPES}


def generation_metrics(hyps: list[str], refs: list[str] | None = None) -> dict[str, float]:
    """BLEU, chrF, ROUGE-1/2/L (with references), entropy-1..3, distinct-1/2, rep-2/rep-4."""
    out: dict[str, float] = {}
    if refs is not None:
        out.update(bleu=bleu(hyps, refs), chrf=chrf(hyps, refs), **rouge(hyps, refs))
    for n in (1, 2, 3):
        out[f"entropy{n}"] = ngram_entropy(hyps, n)
    out.update(distinct1=distinct_n(hyps, 1), distinct2=distinct_n(hyps, 2), rep2=rep_n(hyps, 2), rep4=rep_n(hyps, 4))
    return out
