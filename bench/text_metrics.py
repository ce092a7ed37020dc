"""Diversity and repetition metrics, now in the library: minillm/eval/text_metrics.py defines them
(n-gram entropy, distinct-n, rep-n, with their normalisers) beside BLEU, chrF and ROUGE. This name
stays so that `from text_metrics import ...` in the bench scripts and their tests keeps working."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from minillm.eval.text_metrics import distinct_n, ngram_entropy, ngrams, rep_n, words  # noqa: E402,F401
