"""The inspector: look inside a running model. `python -m minillm.inspector --help` for the command.

What it computes, in the order it prints:
  1. Prefill view: for each prompt position, the token, the model's top-k guesses for the next token,
     and the probability / surprisal (bits, -log2 p) of the token that actually follows; the prompt's
     perplexity = 2 ** (mean surprisal in bits) over the T-1 predicted positions.
  2. Logit lens: the residual stream after the embedding and after each block, put through the final
     norm and the output head as if it were the last layer. Per layer and position: the top token, and
     the rank / probability of the model's final prediction. Table + heatmap (logit_lens.png).
  3. Attention maps: every head's attention probabilities over the prompt (attn_layerNN.png, one grid per
     layer; attn_overview.png, all heads small), and per head: mean attention entropy (bits), previous-
     token score (mean attention to position i-1) and first-token score (mean attention to position 0),
     both averaged over query positions 2..T-1 where the two differ (head_scores.png).
  4. With --generate N, a decoding trace of any method (methods.stream with its trace hook, so the
     tokens are the library loop's own): sample / greedy shows the alternatives the sampler kept and
     their probabilities; contrastive the plausible head V_head with both models' probabilities and
     the score; speculative each draft with p_target, q_draft, u and the verdict, then the residual or
     bonus token, with the acceptance statistics.

The package, one idea per file (the computation never imports the presentation):
    capture.py      forward hooks that record the residual stream and attention maps (read only)
    analysis.py     the prefill view, logit lens and head scores of one prompt -> Report
    traces.py       a decoding method run through the library's loop, each step as a plain dict
    tables.py       the text tables printed
    plots.py        the PNGs (matplotlib, imported only when drawing)
    json_report.py  everything machine-readable
    cli.py          the command line (`python -m minillm.inspector`)

The model is never changed: not its config, not its attn_impl, not its outputs (capture.py says how
the attention maps are recovered when the model runs SDPA).
"""

from .analysis import Report, encode_prompt, head_scores, inspect_prompt, lens_logits, token_text
from .capture import Capture, attention_probs
from .json_report import report_dict
from .plots import write_pngs
from .traces import trace_contrastive, trace_decoding, trace_sampling, trace_speculative

__all__ = ["Capture", "Report", "attention_probs", "encode_prompt", "head_scores", "inspect_prompt", "lens_logits",
           "report_dict", "token_text", "trace_contrastive", "trace_decoding", "trace_sampling", "trace_speculative",
           "write_pngs"]
