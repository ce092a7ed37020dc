"""Look inside a running model: per-position predictions, the logit lens, attention maps, a sampling trace.

    python -m minillm.inspect --model weights/shakespeare-char.safetensors --prompt "ROMEO:\\nWhat light" \\
        [--out DIR] [--json FILE] [--top 5] [--generate N --method sample|greedy|contrastive|speculative
        --temperature T --top-k K --top-p P --min-p M --seed S] [--draft PATH --k K --adaptive-k]
        [--amateur PATH --alpha A --beta B --objective obrien|li --amateur-temperature T --amateur-context C]

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
  4. With --generate N, a decoding trace, by --method:
       sample / greedy: each new token with the alternatives the sampler kept (after penalties,
         temperature, top-k / top-p / min-p / typical-p) and their probabilities (same tokens as generate());
       contrastive (--amateur PATH): per step the plausible head V_head, and for each token in it the
         expert's and amateur's probabilities and the contrastive score that decided (same tokens as
         contrastive_stream);
       speculative (--draft PATH): per target call each draft proposal d_i with p_target(d_i),
         q_draft(d_i), the uniform u_i and the verdict (accepted iff u_i·q < p), then the residual sample
         (after a rejection) or the bonus token (all accepted), with the acceptance statistics (same
         tokens as speculative_stream). The draft / amateur must use the same tokenizer.

How attention is captured: forward hooks only read, so the model's outputs do not change. A hook on
each Attention module recomputes q and k from the module's input exactly as the written-out ("manual")
path does (q·kᵀ/√d, causal mask, softmax). While inspecting, the inspector forces the model onto that
explicit path (config.attn_impl = "manual"), so the maps are bit for bit the probabilities the model
multiplied with V; the model's own attn_impl is restored afterwards. (SDPA agrees to ~1e-6.)

The display of long prompts is truncated (--max-rows); the computation never is. A prompt longer
than the model's context is a ValueError.

Note on the name: this module is minillm.inspect; run it with `python -m minillm.inspect` (not as
`python minillm/inspect.py`, which would put minillm/ on sys.path and shadow the standard library's
`inspect`). Everything inside the package imports absolutely or relatively, so `import inspect`
elsewhere still gets the standard library.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .contrastive import CDStats, CDStep, contrastive_stream
from .kv_cache import KVCache
from .model import apply_rope
from .sampling import SamplingParams, process_logits, sample
from .speculative import SpecStats, SpecStep, speculative_stream

LOG2E = 1.0 / math.log(2.0)
MAX_JSON_ATTN_POSITIONS = 256  # attention matrices go to JSON only up to this prompt length


# ----------------------------------------------------------------------------- tokens as text

def token_text(tokenizer, token_id: int, width: int | None = None) -> str:
    """A token as one short visible string: space -> '·', newline -> '\\n', bytes that are not
    complete UTF-8 -> \\xNN; ids the tokenizer does not know (padded vocab) -> <id N>."""
    try:
        b = tokenizer.token_bytes(int(token_id))
    except (ValueError, KeyError, IndexError):
        return f"<id {int(token_id)}>"
    s = b.decode("utf-8", errors="backslashreplace")
    out = []
    for ch in s:
        if ch == " ":
            out.append("·")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    s = "".join(out)
    if width is not None and len(s) > width:
        s = s[: width - 1] + "…"
    return s


# ----------------------------------------------------------------------------- capture (hooks)

def attention_probs(attn, x: torch.Tensor, rope, mask) -> torch.Tensor:
    """Recompute an Attention module's probabilities from its input x (B, T, C), exactly as the
    written-out path in model.py does: q·kᵀ/√hd, causal mask, softmax in float32. -> (B, nh, T, T) float32."""
    cfg = attn.cfg
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if cfg.n_kv_head != cfg.n_head:
        k = k.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(cfg.head_dim))
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return F.softmax(att.float(), dim=-1)


class Capture:
    """Context manager: while active, a forward pass over a prompt (no KV cache) records
    `residual` [embedding output, after block 1, ..., after block L], each (B, T, C), and
    `attention` [per layer (B, nh, T, T)]. Forces attn_impl="manual" and restores it on exit."""

    def __init__(self, model, attention: bool = True):
        self.model, self.want_attention = model, attention
        self.residual: list[torch.Tensor] = []
        self.attention: list[torch.Tensor] = []
        self._handles = []
        self._saved_impl = None

    def __enter__(self):
        m = self.model
        self._saved_impl = m.config.attn_impl
        m.config.attn_impl = "manual"
        self._handles.append(m.drop.register_forward_hook(lambda mod, args, out: self.residual.append(out.detach())))
        for block in m.blocks:
            self._handles.append(block.register_forward_hook(lambda mod, args, out: self.residual.append(out.detach())))
            if self.want_attention:
                self._handles.append(block.attn.register_forward_hook(self._attn_hook))
        return self

    def _attn_hook(self, attn, args, out):
        x, rope, mask, cache = args[0], args[1], args[2], args[3]
        if cache is not None:
            raise RuntimeError("Capture records attention over a prompt run without a KV cache")
        self.attention.append(attention_probs(attn, x, rope, mask).detach())

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.model.config.attn_impl = self._saved_impl
        return False


# ----------------------------------------------------------------------------- the analyses

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
    trace_stats: dict | None = None  # the decoding loop's own stats (contrastive, speculative)


def encode_prompt(tokenizer, prompt: str | list[int], block_size: int) -> list[int]:
    ids = list(prompt) if isinstance(prompt, (list, tuple)) else tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    if len(ids) > block_size:
        raise ValueError(f"the prompt is {len(ids)} tokens but the model's context is {block_size} positions; "
                         f"shorten the prompt (the inspector never truncates the computation)")
    return ids


@torch.inference_mode()
def inspect_prompt(model, tokenizer, prompt: str | list[int], top: int = 5, attention: bool = True) -> Report:
    """Run the prompt once with capture hooks and compute the prefill view, logit lens and attention stats."""
    cfg = model.config
    ids = encode_prompt(tokenizer, prompt, cfg.block_size)
    T = len(ids)
    device = model.tok_emb.weight.device
    x = torch.tensor([ids], device=device)
    with Capture(model, attention=attention) as cap:
        logits = model(x)  # (1, T, V)
    logits = logits[0].float()
    toks = [token_text(tokenizer, i) for i in ids]

    # 1. prefill view
    logp = logits.log_softmax(-1)  # (T, V)
    probs = logp.exp()
    k = min(top, logits.size(-1))
    top_p, top_i = probs.topk(k, dim=-1)
    rows, bits = [], []
    for t in range(T):
        row = {"pos": t, "id": ids[t], "token": toks[t],
               "top": [{"id": int(i), "token": token_text(tokenizer, int(i)), "p": float(p)}
                       for p, i in zip(top_p[t], top_i[t])],
               "next": None}
        if t + 1 < T:
            nxt = ids[t + 1]
            s = float(-logp[t, nxt]) * LOG2E
            rank = int((logits[t] > logits[t, nxt]).sum()) + 1
            row["next"] = {"id": nxt, "token": toks[t + 1], "p": float(probs[t, nxt]), "surprisal_bits": s, "rank": rank}
            bits.append(s)
        rows.append(row)
    mean_bits = sum(bits) / len(bits) if bits else None
    ppl = 2.0 ** mean_bits if bits else None

    # 2. logit lens: row 0 = embedding, row l = after block l
    final = logits.argmax(-1)  # (T,)
    lens = {"layers": ["emb"] + [str(l + 1) for l in range(cfg.n_layer)], "final_id": final.tolist(),
            "final_token": [token_text(tokenizer, int(i)) for i in final],
            "top_id": [], "top_token": [], "top_p": [], "final_rank": [], "final_p": []}
    for res in cap.residual:
        lg = lens_logits(model, res)[0].float()  # (T, V)
        p = lg.softmax(-1)
        tp, ti = p.max(-1)
        fl = lg.gather(-1, final[:, None])  # (T, 1)
        lens["top_id"].append(ti.tolist())
        lens["top_token"].append([token_text(tokenizer, int(i)) for i in ti])
        lens["top_p"].append(tp.tolist())
        lens["final_rank"].append(((lg > fl).sum(-1) + 1).tolist())
        lens["final_p"].append(p.gather(-1, final[:, None])[:, 0].tolist())

    # 3. attention
    att = [a[0].cpu() for a in cap.attention]
    heads = []
    for l, a in enumerate(att):
        sc = head_scores(a)
        for h in range(a.size(0)):
            heads.append({"layer": l, "head": h, **{name: float(v[h]) for name, v in sc.items()}})
    info = {"family": cfg.family, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head,
            "vocab_size": cfg.vocab_size, "block_size": cfg.block_size, "prompt_tokens": T,
            "attn_impl_model": cfg.attn_impl, "attn_impl_inspected": "manual"}
    return Report(ids, toks, logits.cpu(), rows, ppl, mean_bits, lens, att, heads, None, info)


@torch.inference_mode()
def trace_sampling(model, tokenizer, ids: list[int], n: int, params: SamplingParams, seed: int | None = None,
                   top: int = 5) -> list[dict]:
    """Generate n tokens with plain sampling (KV cache), recording per step the chosen token, its model
    probability (softmax of raw logits) and sampler probability (after penalties, temperature and
    truncation: softmax(process_logits), one-hot when greedy), how many
    tokens the sampler kept, and the top kept alternatives. Uses sampling.sample with a generator seeded
    as generate.make_generator does, so the tokens equal generate()'s for the same seed. Stops at EOS
    (the EOS step is recorded with "eos": true)."""
    ctx = model.config.block_size
    if len(ids) + n - 1 > ctx:
        raise ValueError(f"prompt ({len(ids)} tokens) + {n} new tokens exceeds the model's context of {ctx}")
    device = model.tok_emb.weight.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = set(getattr(tokenizer, "eos_ids", set()) or set())
    cache = KVCache.for_model(model, batch_size=1)
    logits = model(torch.tensor([ids], device=device), cache, 0, last_only=True)[:, -1]
    steps, seen = [], list(ids)
    for i in range(n):
        raw = logits.float().softmax(-1)[0]
        history = torch.tensor([seen], device=device) if params.needs_history else None
        sp = process_logits(logits, params, history).softmax(-1)[0]  # one-hot when greedy
        token = int(sample(logits, params, gen, history))
        seen.append(token)
        kept = int((sp > 0).sum())
        kp, ki = sp.topk(min(top, kept))
        steps.append({"step": i, "id": token, "token": token_text(tokenizer, token), "p_model": float(raw[token]),
                      "p_sampler": float(sp[token]), "n_kept": kept, "eos": token in eos,
                      "alternatives": [{"id": int(j), "token": token_text(tokenizer, int(j)), "p_sampler": float(p),
                                        "p_model": float(raw[j])} for p, j in zip(kp, ki)]})
        if token in eos or i == n - 1:
            break
        logits = model(torch.tensor([[token]], device=device), cache, cache.length)[:, -1]
    return steps


def check_same_tokenizer(tok_a, tok_b, name_a: str = "model", name_b: str = "other model") -> None:
    """Contrastive and speculative decoding compare two models' distributions id by id: the ids must
    mean the same text in both. A ValueError names the two checkpoints when their tokenizers differ."""
    if tok_a.to_dict() != tok_b.to_dict():
        raise ValueError(f"{name_a} and {name_b} have different tokenizers; contrastive and speculative decoding "
                         f"need the same tokenizer (the same ids for the same text)")


def _tok(tokenizer, i: int) -> dict:
    return {"id": int(i), "token": token_text(tokenizer, int(i))}


def trace_speculative(target, draft, tokenizer, ids: list[int], n: int, k: int, params: SamplingParams,
                      seed: int | None = None, adaptive_k: bool = False, top: int = 5) -> tuple[list[dict], SpecStats]:
    """Run speculative_stream (batch 1) with a trace and turn each SpecStep into a dict: the drafts with
    p_target(d), q_draft(d), u and the verdict, then how the last token was chosen (residual or bonus)
    with the top `top` entries of the distribution it was drawn from. Stops at EOS as the loop does."""
    device = target.tok_emb.weight.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = set(getattr(tokenizer, "eos_ids", set()) or set())
    raw: list[SpecStep] = []
    stats = SpecStats()
    out = list(speculative_stream(target, draft, ids, n, k, params, gen, eos, stats, adaptive_k, trace=raw.append))
    steps, emitted = [], 0
    for call, st in enumerate(raw):
        drafts = []
        for i in range(st.k):
            d = int(st.drafts[0, i])
            p, q, u = float(st.p_target[0, i, d]), float(st.q_draft[0, i, d]), float(st.uniforms[0, i])
            n_acc = int(st.n_accepted[0])
            verdict = "accepted" if i < n_acc else ("rejected" if i == n_acc else "not checked")
            drafts.append({**_tok(tokenizer, d), "p_target": p, "q_draft": q, "u": u,
                           "accept_prob": min(1.0, p / q) if q > 0 else None, "verdict": verdict})
        kind = st.last_kind(0)
        last = int(st.emitted[0, -1])
        dist = st.fix[0] if kind == "residual" else st.p_target[0, st.k] if kind == "bonus" else None
        entry = {"call": call, "position": st.start, "k": st.k, "n_accepted": int(st.n_accepted[0]), "drafts": drafts,
                 "last": {**_tok(tokenizer, last), "kind": kind}, "emitted": [], "eos": False}
        if dist is not None:
            kept = int((dist > 0).sum())
            tp, ti = dist.topk(min(top, kept))
            entry["last"]["p"] = float(dist[last])
            entry["last"]["alternatives"] = [{**_tok(tokenizer, j), "p": float(v)} for v, j in zip(tp, ti)]
            entry["last"]["n_kept"] = kept
        for tok in st.emitted[0].tolist():  # what the stream yielded from this step
            if tok in eos:
                entry["eos"] = True
                break
            entry["emitted"].append(_tok(tokenizer, tok))
        emitted += len(entry["emitted"])
        steps.append(entry)
    assert emitted == len(out)  # the trace covers exactly what the loop emitted
    return steps, stats


def trace_contrastive(expert, amateur, tokenizer, ids: list[int], n: int, alpha: float = 0.1, beta: float = 0.5,
                      objective: str = "obrien", amateur_temperature: float = 1.0, amateur_context: str = "full",
                      params: SamplingParams = SamplingParams(temperature=0), seed: int | None = None,
                      max_head: int = 10) -> tuple[list[dict], CDStats]:
    """Run contrastive_stream with a trace: per step the chosen token, the expert's own argmax, |V_head|
    and the head's tokens (best score first, at most max_head) with p_expert, p_amateur and the score
    relative to the winner's (scores are defined up to a per-step constant). The EOS step is kept."""
    device = expert.tok_emb.weight.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = set(getattr(tokenizer, "eos_ids", set()) or set())
    raw: list[CDStep] = []
    stats = CDStats()
    list(contrastive_stream(expert, amateur, ids, n, alpha, beta, objective, amateur_temperature, amateur_context,
                            params, gen, eos, stats, trace=raw.append))
    steps = []
    for st in raw:
        p_e, p_a = st.z_expert[0].softmax(-1), st.z_amateur[0].softmax(-1)
        head_ids = st.head[0].nonzero()[:, 0]
        order = st.scores[0, head_ids].argsort(descending=True)
        best = float(st.scores[0, head_ids[order[0]]])
        head = [{**_tok(tokenizer, j), "p_expert": float(p_e[j]), "p_amateur": float(p_a[j]),
                 "score": float(st.scores[0, j]) - best} for j in head_ids[order][:max_head].tolist()]
        steps.append({"step": st.step, **_tok(tokenizer, st.token), "expert": _tok(tokenizer, st.expert_token),
                      "changed": st.token != st.expert_token, "in_head": bool(st.head[0, st.token]),
                      "head_size": int(st.head.sum()), "head": head, "eos": st.token in eos})
    return steps, stats


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


# ----------------------------------------------------------------------------- text tables

def _elide(indices: list[int], max_rows: int) -> list[int | None]:
    """Indices to show: all, or the first and last max_rows/2 with None marking the gap."""
    if len(indices) <= max_rows:
        return list(indices)
    h = max(1, max_rows // 2)
    return indices[:h] + [None] + indices[-h:]


def prefill_table(rep: Report, max_rows: int = 64, top: int = 5) -> str:
    lines = [f"{'pos':>4}  {'token':<10} {'next':<10} {'p(next)':>8} {'bits':>6} {'rank':>5}   top-{top} predictions for the next token"]
    for t in _elide(list(range(len(rep.prefill))), max_rows):
        if t is None:
            lines.append(f"{'…':>4}  ({len(rep.prefill) - 2 * max(1, max_rows // 2)} positions not shown)")
            continue
        r = rep.prefill[t]
        preds = "  ".join(f"{p['token'][:8]} {p['p']:.3f}" for p in r["top"][:top])
        nx = r["next"]
        if nx is None:
            mid = f"{'—':<10} {'':>8} {'':>6} {'':>5}"
        else:
            mid = f"{nx['token'][:10]:<10} {nx['p']:>8.4f} {nx['surprisal_bits']:>6.2f} {nx['rank']:>5}"
        lines.append(f"{t:>4}  {r['token'][:10]:<10} {mid}   {preds}")
    if rep.perplexity is not None:
        lines.append(f"perplexity {rep.perplexity:.3f}  (mean surprisal {rep.mean_surprisal_bits:.3f} bits/token over "
                     f"{len(rep.prefill) - 1} predicted tokens)")
    else:
        lines.append("perplexity: undefined for a one-token prompt (nothing to predict)")
    return "\n".join(lines)


def lens_table(rep: Report, max_cols: int = 12, width: int = 7) -> str:
    """Rows = layers, columns = the last max_cols positions; each cell: the layer's top token, marked
    '*' when it already is the final prediction. Then a per-layer detail for the last position."""
    L = rep.lens
    T = len(rep.ids)
    cols = list(range(max(0, T - max_cols), T))
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


def heads_table(rep: Report, max_rows: int = 64) -> str:
    hs = rep.heads
    if not hs:
        return "attention: not captured"
    lines = ["attention heads: mean entropy (bits), previous-token and first-token scores "
             "(sink: first > 0.5, prev: prev > 0.5)"]
    fmt = "{layer:>6} {head:>5} {entropy_bits:>9.3f} {prev_token:>7.3f} {first_token:>7.3f}  {tag}"
    hdr = f"{'layer':>6} {'head':>5} {'entropy':>9} {'prev':>7} {'first':>7}"

    def tag(h):
        t = []
        if h["first_token"] > 0.5:
            t.append("sink")
        if h["prev_token"] > 0.5:
            t.append("prev")
        return ",".join(t)

    if len(hs) <= max_rows:
        lines.append(hdr)
        lines += [fmt.format(**h, tag=tag(h)) for h in hs]
    else:
        n = max(3, max_rows // 3)
        for title, key, rev in (("strongest previous-token heads", "prev_token", True),
                                ("strongest first-token (sink) heads", "first_token", True),
                                ("lowest-entropy heads", "entropy_bits", False)):
            chosen = sorted(hs, key=lambda h: (h[key] if not math.isnan(h[key]) else -1), reverse=rev)[:n]
            lines.append(f"{title} ({n} of {len(hs)} heads; all are in --json):")
            lines.append(hdr)
            lines += [fmt.format(**h, tag=tag(h)) for h in chosen]
    return "\n".join(lines)


def trace_table(steps: list[dict], top: int = 5) -> str:
    lines = [f"{'step':>4}  {'token':<10} {'p_model':>8} {'p_sampler':>9} {'kept':>6}   alternatives kept (p_sampler)"]
    for s in steps:
        alts = "  ".join(f"{a['token'][:8]} {a['p_sampler']:.3f}" for a in s["alternatives"][:top])
        lines.append(f"{s['step']:>4}  {s['token'][:10]:<10} {s['p_model']:>8.4f} {s['p_sampler']:>9.4f} "
                     f"{s['n_kept']:>6}   {alts}" + ("   [EOS]" if s["eos"] else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pictures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_logit_lens(rep: Report, path: Path, max_cols: int = 40) -> None:
    """Heatmap layers × positions: colour = probability the layer gives the model's final prediction;
    text = the layer's top token (when few enough positions)."""
    plt = _plt()
    L, T = rep.lens, len(rep.ids)
    cols = list(range(max(0, T - max_cols), T))
    data = torch.tensor(L["final_p"])[:, cols].numpy()
    n_rows = len(L["layers"])
    fig, ax = plt.subplots(figsize=(max(6, 0.75 * len(cols) + 2), max(3, 0.32 * n_rows + 1.8)))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.set_yticks(range(n_rows), L["layers"], fontsize=7)
    ax.set_xticks(range(len(cols)), [rep.tokens[t][:8] for t in cols], rotation=90, fontsize=7)
    ax.set_xlabel("input token (position)")
    ax.set_ylabel("residual stream after layer")
    if len(cols) <= 40 and n_rows <= 64:
        for j, t in enumerate(cols):
            for l in range(n_rows):
                ax.text(j, l, L["top_token"][l][t][:6], ha="center", va="center", fontsize=5,
                        color="white" if data[l, j] < 0.5 else "black")
    shown = "" if len(cols) == T else f" (last {len(cols)} of {T} positions)"
    ax.set_title(f"logit lens: p(final prediction) per layer; text = layer's top token{shown}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_attention_layer(rep: Report, layer: int, path: Path, label_max: int = 32) -> None:
    plt = _plt()
    a = rep.attention[layer].numpy()
    nh, T = a.shape[0], a.shape[1]
    ncol = min(nh, 4 if nh <= 8 else 5)
    nrow = math.ceil(nh / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.2 * nrow), squeeze=False)
    for h in range(nrow * ncol):
        ax = axes[h // ncol][h % ncol]
        if h >= nh:
            ax.axis("off")
            continue
        ax.imshow(a[h], cmap="Blues", vmin=0, vmax=1)
        hs = rep.heads[layer * nh + h]
        ax.set_title(f"L{layer} H{h}  H={hs['entropy_bits']:.2f}b prev={hs['prev_token']:.2f} "
                     f"first={hs['first_token']:.2f}", fontsize=6)
        if T <= label_max:  # token labels on the left column and the bottom row only (text is slow to draw)
            bottom = h + ncol >= nh
            ax.set_xticks(range(T), rep.tokens if bottom else [], rotation=90, fontsize=5)
            ax.set_yticks(range(T), rep.tokens if h % ncol == 0 else [], fontsize=5)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"layer {layer} attention (rows: query position, columns: key position)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention_overview(rep: Report, path: Path) -> None:
    plt = _plt()
    L = len(rep.attention)
    nh = rep.attention[0].shape[0]
    fig, axes = plt.subplots(L, nh, figsize=(0.9 * nh + 0.6, 0.9 * L + 0.6), squeeze=False)
    for l in range(L):
        for h in range(nh):
            ax = axes[l][h]
            ax.imshow(rep.attention[l][h].numpy(), cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if h == 0:
                ax.set_ylabel(f"L{l}", fontsize=6)
            if l == 0:
                ax.set_title(f"H{h}", fontsize=6)
    fig.suptitle("attention, all layers (rows) × heads (columns)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # leave room for the title
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_head_scores(rep: Report, path: Path) -> None:
    plt = _plt()
    L = len(rep.attention)
    nh = rep.attention[0].shape[0]
    fig, axes = plt.subplots(1, 3, figsize=(3 + 0.35 * nh * 3, max(3, 0.25 * L + 1.5)), squeeze=False)
    for ax, (key, title) in zip(axes[0], (("entropy_bits", "mean entropy (bits)"), ("prev_token", "previous-token score"),
                                          ("first_token", "first-token score"))):
        m = torch.tensor([h[key] for h in rep.heads]).view(L, nh).numpy()
        im = ax.imshow(m, cmap="magma" if key == "entropy_bits" else "viridis", aspect="auto", origin="lower",
                       vmin=0, vmax=None if key == "entropy_bits" else 1)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_pngs(rep: Report, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "logit_lens.png"]
    plot_logit_lens(rep, paths[0])
    if rep.attention:
        for l in range(len(rep.attention)):
            p = out / f"attn_layer{l:02d}.png"
            plot_attention_layer(rep, l, p)
            paths.append(p)
        paths += [out / "attn_overview.png", out / "head_scores.png"]
        plot_attention_overview(rep, paths[-2])
        plot_head_scores(rep, paths[-1])
    return paths


# ----------------------------------------------------------------------------- JSON

def report_dict(rep: Report) -> dict:
    """Everything machine-readable (floats are plain; NaN becomes null)."""
    def clean(v):
        if isinstance(v, float):
            return None if math.isnan(v) else v
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    d = {"info": rep.info, "ids": rep.ids, "tokens": rep.tokens, "prefill": rep.prefill,
         "perplexity": rep.perplexity, "mean_surprisal_bits": rep.mean_surprisal_bits,
         "logit_lens": rep.lens, "heads": rep.heads}
    T = len(rep.ids)
    if rep.attention and T <= MAX_JSON_ATTN_POSITIONS:
        d["attention"] = [[[[round(float(v), 6) for v in row] for row in head] for head in layer.tolist()]
                          for layer in rep.attention]  # [layer][head][query][key]
    elif rep.attention:
        d["attention"] = None
        d["attention_note"] = f"matrices omitted: prompt longer than {MAX_JSON_ATTN_POSITIONS} tokens"
    if rep.trace is not None:
        d["trace"] = rep.trace
        d["trace_method"] = rep.trace_method
        if rep.trace_stats is not None:
            d["trace_stats"] = rep.trace_stats
    return clean(d)


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> Report:
    ap = argparse.ArgumentParser(prog="python -m minillm.inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint in our .safetensors format")
    ap.add_argument("--prompt", required=True, help="prompt text (\\n and \\t escapes are understood)")
    ap.add_argument("--out", help="directory for the PNGs (logit lens, attention per layer, overview, head scores)")
    ap.add_argument("--json", help="write everything machine-readable to this file")
    ap.add_argument("--top", type=int, default=5, help="predictions / alternatives shown per position (default 5)")
    ap.add_argument("--max-rows", type=int, default=64, help="longest table printed before rows are elided")
    ap.add_argument("--lens-cols", type=int, default=12, help="positions shown in the logit-lens table")
    ap.add_argument("--no-attention", action="store_true", help="skip attention capture")
    ap.add_argument("--generate", type=int, default=0, metavar="N", help="also trace N generated tokens")
    ap.add_argument("--method", choices=("sample", "greedy", "contrastive", "speculative"), default="sample",
                    help="decoding method traced by --generate (default sample)")
    ap.add_argument("--temperature", type=float,
                    help="sampling temperature (default: 1 for sample and speculative, 0 = greedy for contrastive)")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--min-p", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draft", help="speculative: the draft model (same tokenizer)")
    ap.add_argument("--k", type=int, default=4, help="speculative: drafts per target call (default 4)")
    ap.add_argument("--adaptive-k", action="store_true", help="speculative: +2 after a full acceptance, else -1")
    ap.add_argument("--amateur", help="contrastive: the amateur model (same tokenizer)")
    ap.add_argument("--alpha", type=float, default=0.1, help="contrastive: plausibility threshold (default 0.1)")
    ap.add_argument("--beta", type=float, default=0.5, help="contrastive: O'Brien's contrast strength (default 0.5)")
    ap.add_argument("--objective", choices=("obrien", "li"), default="obrien")
    ap.add_argument("--amateur-temperature", type=float, default=1.0, help="contrastive, objective li: tau")
    ap.add_argument("--amateur-context", choices=("full", "last_prompt_token"), default="full")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.generate > 0 and args.method == "speculative" and not args.draft:
        ap.error("--method speculative needs --draft PATH")
    if args.generate > 0 and args.method == "contrastive" and not args.amateur:
        ap.error("--method contrastive needs --amateur PATH")

    from .checkpoint import load_model  # here, so importing this module stays light
    loaded = load_model(args.model, device=args.device)
    model, tok = loaded.model, loaded.tokenizer
    other = None  # the draft or amateur
    if args.generate > 0 and args.method in ("speculative", "contrastive"):
        other_path = args.draft if args.method == "speculative" else args.amateur
        other = load_model(other_path, device=args.device)
        check_same_tokenizer(tok, other.tokenizer, args.model, other_path)
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    rep = inspect_prompt(model, tok, prompt, top=args.top, attention=not args.no_attention)
    rep.info["model_path"] = str(args.model)
    rep.info["prompt"] = prompt
    i = rep.info
    print(f"{args.model}: {i['family']}, {i['n_layer']} layers × {i['n_head']} heads, vocab {i['vocab_size']}, "
          f"context {i['block_size']}; prompt = {i['prompt_tokens']} tokens "
          f"(attention captured on the explicit path; model's attn_impl {i['attn_impl_model']!r} restored)\n")
    print(prefill_table(rep, args.max_rows, args.top), end="\n\n")
    print(lens_table(rep, args.lens_cols), end="\n\n")
    print(heads_table(rep, args.max_rows), end="\n\n")
    if args.generate > 0:
        default_t = 0.0 if args.method in ("greedy", "contrastive") else 1.0
        t = 0.0 if args.method == "greedy" else (default_t if args.temperature is None else args.temperature)
        params = SamplingParams(t, args.top_k, args.top_p, args.min_p)
        rep.trace_method = args.method
        if args.method == "speculative":
            rep.trace, st = trace_speculative(model, other.model, tok, rep.ids, args.generate, args.k, params,
                                              args.seed, args.adaptive_k, args.top)
            rep.trace_stats = {"summary": st.summary(), "accept_hist": st.accept_hist, "drafts_proposed": st.drafts_proposed,
                               "drafts_accepted": st.drafts_accepted, "target_calls": st.target_calls,
                               "draft_calls": st.draft_calls, "new_tokens": st.new_tokens,
                               "empirical_alpha": st.empirical_alpha}
            print(f"speculative trace (draft {args.draft}, k={args.k}{' adaptive' if args.adaptive_k else ''}, "
                  f"temperature {t}, seed {args.seed}):")
            print(spec_trace_table(rep.trace, args.top))
            print(st.summary(), end="\n\n")
        elif args.method == "contrastive":
            rep.trace, st = trace_contrastive(model, other.model, tok, rep.ids, args.generate, args.alpha, args.beta,
                                              args.objective, args.amateur_temperature, args.amateur_context, params,
                                              args.seed)
            rep.trace_stats = {"summary": st.summary(), "head_sizes": st.head_sizes,
                               "differs_from_expert": st.differs_from_expert, "amateur_weight": st.amateur_weight}
            print(f"contrastive trace (amateur {args.amateur}, alpha {args.alpha}, beta {args.beta}, objective "
                  f"{args.objective}, amateur context {args.amateur_context}, temperature {t}):")
            print(cd_trace_table(rep.trace, args.top))
            print(st.summary(), end="\n\n")
        else:
            rep.trace = trace_sampling(model, tok, rep.ids, args.generate, params, args.seed, args.top)
            print(f"sampling trace ({args.method}; {params}, seed {args.seed}):")
            print(trace_table(rep.trace, args.top), end="\n\n")
    if args.out:
        paths = write_pngs(rep, args.out)
        print(f"wrote {len(paths)} PNGs to {args.out}/ ({', '.join(p.name for p in paths[:3])}{', …' if len(paths) > 3 else ''})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report_dict(rep)))
        print(f"wrote {args.json}")
    return rep


if __name__ == "__main__":
    import sys
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad prompt / checkpoint: a message, not a traceback
        sys.exit(f"error: {e}")
