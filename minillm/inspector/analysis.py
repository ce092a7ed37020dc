"""What one forward pass over a prompt says: the prefill view, the logit lens and per-head attention
scores, gathered in a Report (numbers only; tables.py, plots.py and json_report.py present them).

The display of long prompts is truncated later (tables); the computation never is. A prompt longer
than the model's context is a ValueError (generate.check_budget, the library's one context rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..generate import Stats, check_budget
from .capture import Capture

LOG2E = 1.0 / math.log(2.0)
ESCAPES = {" ": "·", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
LENS_TOP = 3  # tokens kept per logit-lens cell (the page shows them on hover)


def token_text(tokenizer, token_id: int, width: int | None = None) -> str:
    """A token as one short visible string: space -> '·', newline -> '\\n', bytes that are not
    complete UTF-8 -> \\xNN; ids the tokenizer does not know (padded vocab) -> <id N>."""
    try:
        b = tokenizer.token_bytes(int(token_id))
    except (ValueError, KeyError, IndexError):
        return f"<id {int(token_id)}>"
    s = "".join(ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 32 or ord(ch) == 127 else ch)
                for ch in b.decode("utf-8", errors="backslashreplace"))
    if width is not None and len(s) > width:
        s = s[: width - 1] + "…"
    return s


@dataclass
class Report:
    ids: list[int]
    tokens: list[str]  # display strings
    logits: torch.Tensor  # (T, V) float32, the model's output
    prefill: list[dict]
    perplexity: float | None
    mean_surprisal_bits: float | None
    lens: dict
    attention: list[torch.Tensor] = field(default_factory=list)  # per layer (nh, T, T)
    heads: list[dict] = field(default_factory=list)
    trace: list[dict] | None = None
    info: dict = field(default_factory=dict)
    trace_method: str | None = None  # "sample" | "greedy" | "contrastive" | "speculative"
    trace_stats: Stats | None = None  # the decoding loop's own stats


def encode_prompt(tokenizer, prompt: str | list[int], block_size: int) -> list[int]:
    ids = list(prompt) if isinstance(prompt, (list, tuple)) else tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    check_budget(len(ids), 0, block_size)  # the inspector never truncates the computation
    return ids


def lens_logits(model, residual: torch.Tensor) -> torch.Tensor:
    """The logit lens for one layer: residual (B, T, C) -> final norm -> output head -> logits (B, T, V).
    For the last layer's residual this is exactly what the model's forward computes."""
    return model.lm_head(model.norm(residual))


def head_scores(att: torch.Tensor) -> dict[str, torch.Tensor]:
    """att (nh, T, T) -> per head: mean entropy (bits) over query rows 1..T-1 (row 0 can only look
    at itself), previous-token and first-token scores over query rows 2..T-1 (rows 1.. if T == 2)."""
    nh, T, _ = att.shape
    plogp = torch.where(att > 0, att * att.clamp_min(1e-30).log2(), torch.zeros_like(att))
    ent = -plogp.sum(-1)  # (nh, T)
    rows = slice(1, T) if T > 1 else slice(0, T)
    entropy = ent[:, rows].mean(-1)
    lo = 2 if T > 2 else 1
    if T > 1:
        idx = torch.arange(lo, T)
        prev = att[:, idx, idx - 1].mean(-1)
        first = att[:, lo:, 0].mean(-1)
    else:
        prev = first = torch.full((nh,), float("nan"))
    return {"entropy_bits": entropy, "prev_token": prev, "first_token": first}


def prefill_view(tokenizer, ids: list[int], toks: list[str], logits: torch.Tensor, top: int) -> tuple[list[dict], float | None]:
    """Per position: the top guesses for the next token and how the actual next token fared -> (rows,
    mean surprisal in bits over the T-1 predicted positions, None for a one-token prompt)."""
    logp = logits.log_softmax(-1)  # (T, V)
    probs = logp.exp()
    top_p, top_i = probs.topk(min(top, logits.size(-1)), dim=-1)
    rows, bits = [], []
    for t in range(len(ids)):
        row = {"pos": t, "id": ids[t], "token": toks[t],
               "top": [{"id": int(i), "token": token_text(tokenizer, int(i)), "p": float(p)}
                       for p, i in zip(top_p[t], top_i[t])],
               "next": None}
        if t + 1 < len(ids):
            nxt = ids[t + 1]
            s = float(-logp[t, nxt]) * LOG2E
            rank = int((logits[t] > logits[t, nxt]).sum()) + 1
            row["next"] = {"id": nxt, "token": toks[t + 1], "p": float(probs[t, nxt]), "surprisal_bits": s, "rank": rank}
            bits.append(s)
        rows.append(row)
    return rows, (sum(bits) / len(bits) if bits else None)


def logit_lens(model, tokenizer, residual: list[torch.Tensor], logits: torch.Tensor) -> dict:
    """Row 0 = the embedding, row l = after block l: each layer's top token, its LENS_TOP best tokens
    with their probabilities ("top": [layer][position] -> [[token, p], ...]), and how it ranks the
    model's final prediction (the argmax of `logits`, (T, V))."""
    final = logits.argmax(-1)  # (T,)
    lens = {"layers": ["emb"] + [str(l + 1) for l in range(len(residual) - 1)], "final_id": final.tolist(),
            "final_token": [token_text(tokenizer, int(i)) for i in final],
            "top_id": [], "top_token": [], "top_p": [], "top": [], "final_rank": [], "final_p": []}
    for res in residual:
        lg = lens_logits(model, res)[0].float()  # (T, V)
        p = lg.softmax(-1)
        tps, tis = p.topk(min(LENS_TOP, p.size(-1)), dim=-1)  # (T, LENS_TOP), best first
        tp, ti = tps[:, 0], tis[:, 0]
        fl = lg.gather(-1, final[:, None])  # (T, 1)
        lens["top_id"].append(ti.tolist())
        lens["top_token"].append([token_text(tokenizer, int(i)) for i in ti])
        lens["top_p"].append(tp.tolist())
        lens["top"].append([[[token_text(tokenizer, int(i)), float(q)] for q, i in zip(qs, ids)]
                            for qs, ids in zip(tps, tis)])
        lens["final_rank"].append(((lg > fl).sum(-1) + 1).tolist())
        lens["final_p"].append(p.gather(-1, final[:, None])[:, 0].tolist())
    return lens


def head_rows(attention: list[torch.Tensor]) -> list[dict]:
    """One dict per (layer, head) with its head_scores."""
    heads = []
    for l, a in enumerate(attention):
        sc = head_scores(a)
        heads += [{"layer": l, "head": h, **{name: float(v[h]) for name, v in sc.items()}} for h in range(a.size(0))]
    return heads


@torch.inference_mode()
def inspect_prompt(model, tokenizer, prompt: str | list[int], top: int = 5, attention: bool = True) -> Report:
    """Run the prompt once with capture hooks and compute the prefill view, logit lens and attention stats."""
    cfg = model.config
    ids = encode_prompt(tokenizer, prompt, cfg.block_size)
    x = torch.tensor([ids], device=model.tok_emb.weight.device)
    with Capture(model, attention=attention) as cap:
        logits = model(x)[0].float()  # (T, V)
    toks = [token_text(tokenizer, i) for i in ids]
    rows, mean_bits = prefill_view(tokenizer, ids, toks, logits, top)
    lens = logit_lens(model, tokenizer, cap.residual, logits)
    att = [a[0].cpu() for a in cap.attention]  # per layer (nh, T, T)
    info = {"family": cfg.family, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head,
            "vocab_size": cfg.vocab_size, "block_size": cfg.block_size, "prompt_tokens": len(ids),
            "attn_impl_model": cfg.attn_impl,  # what the model ran (untouched)
            "attn_impl_inspected": "manual"}  # the path the attention maps were recomputed on
    ppl = 2.0 ** mean_bits if mean_bits is not None else None
    return Report(ids, toks, logits.cpu(), rows, ppl, mean_bits, lens, att, head_rows(att), None, info)
