"""One prompt and one decoding run as the data the inspector's page draws (a JSON-able dict).

    views = build_views(loaded, prompt, method, max_new_tokens, partner, seed)   # run it and describe it
    views = views_from_report(rep, method, seed)                                 # describe a Report

Nothing is computed here that the inspector does not already compute: the prefill view, logit lens
and head scores are report_dict's numbers (so the page shows exactly what `--json` writes), the
attention maps are the Report's, and the decoding steps are traces.trace_decoding's, recorded
through the library loop's trace hook. What this adds is the shape the page wants: one entry per
panel, each naming the minillm functions that computed it (sources.CITED), the attention rounded
and capped (MAX_ATTENTION_CELLS), and the running acceptance statistics of a speculative run.
"""

from __future__ import annotations

import dataclasses

from ..methods import Method
from .analysis import Report, inspect_prompt
from .json_report import clean, report_dict
from .sources import CITED
from .traces import record_trace

FORMAT = "minillm-views-1"
MAX_ATTENTION_CELLS = 1_500_000  # layers x heads x T x T values sent to the page; more: a note instead
ATTENTION_DIGITS = 4  # attention weights are rounded to this many decimals for the page


def build_views(loaded, prompt: str | list[int], method: Method, max_new_tokens: int, partner=None,
                seed: int | None = None, top: int = 5) -> dict:
    """Inspect the prompt on loaded.model (a checkpoint.Loaded), trace max_new_tokens tokens decoded
    by `method` (partner: the Loaded draft / amateur it needs), and describe both. A prompt that is
    empty or too long for the context is a ValueError (the library's own checks)."""
    rep = inspect_prompt(loaded.model, loaded.tokenizer, prompt, top=top)
    rep.info["prompt"] = prompt if isinstance(prompt, str) else None
    if max_new_tokens > 0:
        record_trace(rep, method, loaded, max_new_tokens, partner, seed, top)
    return views_from_report(rep, method, seed)


def views_from_report(rep: Report, method: Method | None = None, seed: int | None = None) -> dict:
    """The page's data for a Report (its trace, if it has one, was decoded by `method` with `seed`)."""
    d = report_dict(dataclasses.replace(rep, attention=[]))  # the inspector's JSON, attention aside
    views = {
        "format": FORMAT, "info": d["info"], "ids": d["ids"], "tokens": d["tokens"],
        "prefill": {"functions": CITED["prefill"], "rows": d["prefill"], "perplexity": d["perplexity"],
                    "mean_surprisal_bits": d["mean_surprisal_bits"]},
        "lens": {"functions": CITED["lens"], **d["logit_lens"]},
        "attention": attention_view(rep),
        "heads": {"functions": CITED["heads"], "rows": d["heads"]},
        "trace": trace_view(d, method, seed) if rep.trace is not None else None,
    }
    return clean(views)


def attention_cap(n_layer: int, n_head: int) -> int:
    """The longest prompt whose attention maps the page gets (MAX_ATTENTION_CELLS)."""
    return int((MAX_ATTENTION_CELLS / (n_layer * n_head)) ** 0.5)


def attention_view(rep: Report) -> dict:
    """[layer][head][query][key] rounded to ATTENTION_DIGITS, or None with a note saying why."""
    view = {"functions": CITED["attention"], "maps": None, "note": None}
    if not rep.attention:
        view["note"] = "attention was not captured for this prompt"
        return view
    L, (nh, T, _) = len(rep.attention), rep.attention[0].shape
    if L * nh * T * T > MAX_ATTENTION_CELLS:
        view["note"] = (f"the prompt is {T} tokens: {L} layers x {nh} heads x {T}x{T} weights is more than the "
                        f"page's cap of {MAX_ATTENTION_CELLS:,}; attention maps are shown up to {attention_cap(L, nh)} "
                        f"tokens on this model (the head scores below cover the whole prompt)")
        return view
    scale = 10.0 ** ATTENTION_DIGITS  # in float64, k / 10^d is the double nearest the decimal: short JSON
    view["maps"] = [a.double().mul(scale).round().div(scale).tolist() for a in rep.attention]
    return view


def method_settings(method: Method | None, seed: int | None) -> dict:
    """The knobs of the run that the page prints beside the trace (only the ones the method reads)."""
    if method is None:
        return {}
    p = method.params
    s = {"method": method.name, "temperature": p.temperature, "seed": seed}
    s.update({k: v for k, v in (("top_k", p.top_k), ("top_p", p.top_p), ("min_p", p.min_p)) if v is not None})
    if method.name == "speculative":
        s.update(k=method.k, adaptive_k=method.adaptive_k)
        if method.draft_lookup:
            s.update(draft="prompt lookup", lookup_ngram=method.lookup_ngram)
    elif method.name == "contrastive":
        s.update(alpha=method.alpha, beta=method.beta, objective=method.objective)
    return s


def running_acceptance(steps: list[dict]) -> None:
    """Add to each speculative call the acceptance statistics of the run up to and including it."""
    calls = proposed = accepted = emitted = 0
    for s in steps:
        calls += 1
        proposed += s["k"]
        accepted += s["n_accepted"]
        emitted += len(s["emitted"])
        s["running"] = {"calls": calls, "drafts_proposed": proposed, "drafts_accepted": accepted,
                        "acceptance_rate": accepted / proposed if proposed else None, "tokens": emitted,
                        "tokens_per_call": emitted / calls}


def trace_view(d: dict, method: Method | None, seed: int | None) -> dict:
    """The recorded steps (copies: report_dict made them), as the step panel walks through them."""
    name = d["trace_method"]
    steps = d["trace"]
    if name == "speculative":
        running_acceptance(steps)
    return {"functions": CITED[name], "trace_functions": CITED["trace"], "method": name,
            "settings": method_settings(method, seed), "steps": steps, "stats": d.get("trace_stats")}
