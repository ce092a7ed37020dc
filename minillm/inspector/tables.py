"""The text tables the inspector prints: prefill view, logit lens, attention heads, decoding traces.
Long tables are elided in the middle (max_rows); the numbers behind them are all in the JSON."""

from __future__ import annotations

import math

from ..methods import Method
from .analysis import Report


def _elide(indices: list[int], max_rows: int) -> list[int | None]:
    """Indices to show: all, or the first and last max_rows/2 with None marking the gap."""
    if len(indices) <= max_rows:
        return list(indices)
    h = max(1, max_rows // 2)
    return indices[:h] + [None] + indices[-h:]


def prefill_table(rep: Report, max_rows: int = 64, top: int = 5) -> str:
    lines = [f"{'pos':>4}  {'token':<14} {'next':<14} {'p(next)':>8} {'bits':>6} {'rank':>5}   top-{top} predictions for the next token"]
    for t in _elide(list(range(len(rep.prefill))), max_rows):
        if t is None:
            lines.append(f"{'…':>4}  ({len(rep.prefill) - 2 * max(1, max_rows // 2)} positions not shown)")
            continue
        r = rep.prefill[t]
        preds = "  ".join(f"{p['token'][:14]} {p['p']:.3f}" for p in r["top"][:top])
        nx = r["next"]
        if nx is None:
            mid = f"{'—':<14} {'':>8} {'':>6} {'':>5}"
        else:
            mid = f"{nx['token'][:14]:<14} {nx['p']:>8.4f} {nx['surprisal_bits']:>6.2f} {nx['rank']:>5}"
        lines.append(f"{t:>4}  {r['token'][:14]:<14} {mid}   {preds}")
    if rep.perplexity is not None:
        lines.append(f"perplexity {rep.perplexity:.3f}  (mean surprisal {rep.mean_surprisal_bits:.3f} bits/token over "
                     f"{len(rep.prefill) - 1} predicted tokens)")
    else:
        lines.append("perplexity: undefined for a one-token prompt (nothing to predict)")
    return "\n".join(lines)


def lens_table(rep: Report, max_cols: int = 12, width: int | None = None) -> str:
    """Rows = layers, columns = the last max_cols positions; each cell: the layer's top token, marked
    '*' when it already is the final prediction. Then a per-layer detail for the last position.
    Columns are as wide as the longest token shown (4 to 13 characters) unless `width` says."""
    L = rep.lens
    T = len(rep.ids)
    cols = list(range(max(0, T - max_cols), T))
    if width is None:
        shown = [rep.tokens[t] for t in cols] + [L["top_token"][l][t] for l in range(len(L["layers"])) for t in cols]
        width = min(13, max(4, max(map(len, shown)) + 1))
    head = f"{'layer':>6} " + " ".join(f"{rep.tokens[t][:width]:>{width}}" for t in cols)
    lines = [f"logit lens: top token per layer (columns: input token at the last {len(cols)} of {T} positions; "
             f"* = equals the final prediction)", head]
    for l, name in enumerate(L["layers"]):
        cells = []
        for t in cols:
            mark = "*" if L["top_id"][l][t] == L["final_id"][t] else " "
            cells.append(f"{(L['top_token'][l][t][:width - 1] + mark):>{width}}")
        lines.append(f"{name:>6} " + " ".join(cells))
    t = T - 1
    lines.append(f"last position ({t}, input {rep.tokens[t]!s}), final prediction {L['final_token'][t]}:")
    lines.append(f"{'layer':>6}  {'top token':<12} {'p(top)':>7}  {'rank(final)':>11} {'p(final)':>9}")
    for l, name in enumerate(L["layers"]):
        lines.append(f"{name:>6}  {L['top_token'][l][t][:12]:<12} {L['top_p'][l][t]:>7.3f}  "
                     f"{L['final_rank'][l][t]:>11} {L['final_p'][l][t]:>9.4f}")
    return "\n".join(lines)


def _head_tag(h: dict) -> str:
    return ",".join(t for t, on in (("sink", h["first_token"] > 0.5), ("prev", h["prev_token"] > 0.5)) if on)


def heads_table(rep: Report, max_rows: int = 64) -> str:
    """Every head when they fit in max_rows; else the strongest previous-token, first-token (sink) and
    lowest-entropy heads."""
    hs = rep.heads
    if not hs:
        return "attention: not captured"
    lines = ["attention heads: mean entropy (bits), previous-token and first-token scores "
             "(sink: first > 0.5, prev: prev > 0.5)"]
    fmt = "{layer:>6} {head:>5} {entropy_bits:>9.3f} {prev_token:>7.3f} {first_token:>7.3f}  {tag}"
    hdr = f"{'layer':>6} {'head':>5} {'entropy':>9} {'prev':>7} {'first':>7}"
    if len(hs) <= max_rows:
        return "\n".join(lines + [hdr] + [fmt.format(**h, tag=_head_tag(h)) for h in hs])
    n = max(3, max_rows // 3)
    for title, key, rev in (("strongest previous-token heads", "prev_token", True),
                            ("strongest first-token (sink) heads", "first_token", True),
                            ("lowest-entropy heads", "entropy_bits", False)):
        chosen = sorted(hs, key=lambda h: (h[key] if not math.isnan(h[key]) else -1), reverse=rev)[:n]
        lines.append(f"{title} ({n} of {len(hs)} heads; all are in --json):")
        lines.append(hdr)
        lines += [fmt.format(**h, tag=_head_tag(h)) for h in chosen]
    return "\n".join(lines)


def trace_table(steps: list[dict], top: int = 5) -> str:
    """Sampling / greedy: one line per step with the alternatives the sampler kept."""
    lines = [f"{'step':>4}  {'token':<10} {'p_model':>8} {'p_sampler':>9} {'kept':>6}   alternatives kept (p_sampler)"]
    for s in steps:
        alts = "  ".join(f"{a['token'][:8]} {a['p_sampler']:.3f}" for a in s["alternatives"][:top])
        lines.append(f"{s['step']:>4}  {s['token'][:10]:<10} {s['p_model']:>8.4f} {s['p_sampler']:>9.4f} "
                     f"{s['n_kept']:>6}   {alts}" + ("   [EOS]" if s["eos"] else ""))
    return "\n".join(lines)


def spec_trace_table(steps: list[dict], top: int = 5) -> str:
    """One block per target call: the drafts with p, q, u and the verdict, then the residual / bonus token."""
    lines = []
    for s in steps:
        lines.append(f"call {s['call']} (position {s['position']}, k={s['k']}): {s['n_accepted']} of {s['k']} drafts accepted")
        for i, d in enumerate(s["drafts"]):
            ap = "—" if d["accept_prob"] is None else f"{d['accept_prob']:.3f}"
            lines.append(f"    d{i + 1} {d['token'][:10]:<10} p_target {d['p_target']:.4f}  q_draft {d['q_draft']:.4f}  "
                         f"min(1,p/q) {ap:>5}  u {d['u']:.3f}  {d['verdict']}")
        last = s["last"]
        if last["kind"] == "draft":
            how = "an accepted draft"
        else:
            src = "residual norm(max(0, p-q))" if last["kind"] == "residual" else "bonus, from p_target"
            alts = "  ".join(f"{a['token'][:8]} {a['p']:.3f}" for a in last.get("alternatives", [])[:top])
            how = f"{src} (p {last.get('p', float('nan')):.4f}; top: {alts})"
        lines.append(f"    -> {last['token'][:10]} by {how}")
        text = "".join(e["token"] for e in s["emitted"])
        lines.append(f"    emitted: {text!s}" + ("   [EOS]" if s["eos"] else ""))
    return "\n".join(lines)


def cd_trace_table(steps: list[dict], top: int = 5) -> str:
    """One line per step: the chosen token, the expert's argmax, |V_head|, and the head's best entries."""
    lines = [f"{'step':>4}  {'chosen':<10} {'expert':<10} {'|Vh|':>4}   V_head by score (score - best, p_expert / p_amateur)"]
    for s in steps:
        head = "  ".join(f"{h['token'][:8]} {h['score']:+.2f} ({h['p_expert']:.3f}/{h['p_amateur']:.3f})"
                         for h in s["head"][:top])
        mark = "*" if s["changed"] else " "
        lines.append(f"{s['step']:>4}  {s['token'][:9]:<9}{mark} {s['expert']['token'][:10]:<10} {s['head_size']:>4}   "
                     f"{head}" + ("   [EOS]" if s["eos"] else ""))
    lines.append("* = contrastive decoding chose a different token than the expert's argmax")
    return "\n".join(lines)


def trace_title(method: Method, partner_path: str | None, seed: int) -> str:
    """The line above a trace: the method and its settings."""
    m, t = method, method.params.temperature
    if m.name == "speculative":
        draft = f"prompt lookup, n <= {m.lookup_ngram}" if m.draft_lookup else partner_path
        return (f"speculative trace (draft {draft}, k={m.k}{' adaptive' if m.adaptive_k else ''}, "
                f"temperature {t}, seed {seed}):")
    if m.name == "contrastive":
        return (f"contrastive trace (amateur {partner_path}, alpha {m.alpha}, beta {m.beta}, objective {m.objective}, "
                f"amateur context {m.amateur_context}, temperature {t}):")
    return f"sampling trace ({m.name}; {m.params}, seed {seed}):"


def trace_text(method_name: str, steps: list[dict], top: int = 5) -> str:
    """The table for a trace of `method_name`."""
    table = {"speculative": spec_trace_table, "contrastive": cd_trace_table}.get(method_name, trace_table)
    return table(steps, top)
