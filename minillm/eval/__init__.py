"""Evaluation, a layer on the core (`python -m minillm.eval`; the core never imports it).

    perplexity.py    strided sliding-window perplexity and bits per byte
    text_metrics.py  BLEU, chrF (sacrebleu), ROUGE (rouge-score), n-gram entropy, distinct-n, rep-n
    generation.py    generation tasks (JSONL, the ready tinyshakespeare task), continued by any method
    humaneval.py     HumanEval pass@k: prompting, code extraction, the unbiased estimator
    sandbox.py       running model-written programs: subprocess, limits, namespaces where available
    report.py        tables and JSON
    __main__.py      the command line (progress bars live only there)
"""

from .generation import continue_text, read_tasks, run_tasks, shakespeare_tasks, write_tasks
from .humaneval import ModelCompleter, build_program, evaluate, extract_code, load_problems, pass_at_k
from .perplexity import Perplexity, eval_text, perplexity, window_spans
from .sandbox import Limits, Outcome, isolation, run_program
from .text_metrics import bleu, chrf, distinct_n, generation_metrics, ngram_entropy, rep_n, rouge

__all__ = ["continue_text", "read_tasks", "run_tasks", "shakespeare_tasks", "write_tasks", "ModelCompleter",
           "build_program", "evaluate", "extract_code", "load_problems", "pass_at_k", "Perplexity", "eval_text",
           "perplexity", "window_spans", "Limits", "Outcome", "isolation", "run_program", "bleu", "chrf",
           "distinct_n", "generation_metrics", "ngram_entropy", "rep_n", "rouge"]
