"""Everything the inspector found, machine-readable: plain floats (NaN becomes null), the attention
matrices as [layer][head][query][key] up to MAX_JSON_ATTN_POSITIONS prompt tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..generate import Stats
from .analysis import Report

MAX_JSON_ATTN_POSITIONS = 256  # attention matrices go to JSON only up to this prompt length


def clean(v):
    if isinstance(v, float):
        return None if math.isnan(v) else v
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [clean(x) for x in v]
    return v


def stats_dict(stats: Stats, method: str | None) -> dict:
    """The decoding loop's Stats: its summary, the counts every method fills, and the method's own."""
    d = {"summary": stats.summary(), "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
         "stopped_by": stats.stopped_by, "calls": dict(stats.calls)}
    if method == "speculative":
        d.update(accept_hist=list(stats.accept_hist), drafts_proposed=stats.drafts_proposed,
                 drafts_accepted=stats.drafts_accepted, target_calls=stats.calls.get("target", 0),
                 draft_calls=stats.calls.get("draft", 0), plain_calls=stats.plain_calls,
                 empirical_alpha=stats.empirical_alpha)
    elif method == "contrastive":
        d.update(head_sizes=list(stats.head_sizes), differs_from_expert=stats.differs_from_expert,
                 amateur_weight=stats.amateur_weight)
    return d


def report_dict(rep: Report) -> dict:
    """Everything machine-readable (floats are plain; NaN becomes null)."""
    d = {"info": rep.info, "ids": rep.ids, "tokens": rep.tokens, "prefill": rep.prefill,
         "perplexity": rep.perplexity, "mean_surprisal_bits": rep.mean_surprisal_bits,
         "logit_lens": rep.lens, "heads": rep.heads}
    if rep.attention and len(rep.ids) <= MAX_JSON_ATTN_POSITIONS:
        d["attention"] = [[[[round(float(v), 6) for v in row] for row in head] for head in layer.tolist()]
                          for layer in rep.attention]  # [layer][head][query][key]
    elif rep.attention:
        d["attention"] = None
        d["attention_note"] = f"matrices omitted: prompt longer than {MAX_JSON_ATTN_POSITIONS} tokens"
    if rep.trace is not None:
        d["trace"] = rep.trace
        d["trace_method"] = rep.trace_method
        if rep.trace_stats is not None:
            d["trace_stats"] = stats_dict(rep.trace_stats, rep.trace_method)
    return clean(d)


def write_json(rep: Report, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_dict(rep)))
    return path
