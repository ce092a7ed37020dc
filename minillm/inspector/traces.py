"""Decoding traces: a method runs through the library's own loop (methods.stream) with its trace hook,
and each step it reports (generate.SampleStep, speculative.SpecStep, contrastive.CDStep) becomes a
plain dict, converted as it arrives. There is no decode loop here, so the traced tokens are the
tokens sample.py prints for the same flags and seed, and the loop's Stats come back with them.

    sample / greedy: the chosen token, its model probability (softmax of the raw logits) and sampler
      probability (softmax of the processed logits: after penalties, temperature, top-k / top-p /
      min-p / typical-p; one-hot when greedy), how many tokens the sampler kept, the top kept ones
      ("alternatives") and the top of the raw distribution ("raw_top"), each with both probabilities.
    speculative: per target call each draft d_i with p_target(d_i), q_draft(d_i), u_i and the verdict
      (accepted iff u_i·q < p), then the residual (after a rejection) or bonus (all accepted) token
      with the top of the distribution it was drawn from, and what the stream emitted.
    contrastive: per step the chosen token, the expert's argmax, |V_head| and the head's tokens (best
      score first) with p_expert, p_amateur and the score relative to the winner's (scores are
      defined up to a per-step constant).
A step that picks an end-of-sequence id is recorded with "eos": true; the stream stops there.
"""

from __future__ import annotations

import functools

from ..contrastive import CDStep
from ..generate import SampleStep, Stats, make_generator
from ..methods import Method, stream
from ..sampling import SamplingParams
from ..speculative import SpecStep
from .analysis import token_text


def _tok(tokenizer, i: int) -> dict:
    return {"id": int(i), "token": token_text(tokenizer, int(i))}


def sample_step(st: SampleStep, index: int, tokenizer, eos: set[int], top: int) -> dict:
    raw = st.logits[0].float().softmax(-1)
    sp = st.probs[0]  # what the token was drawn from
    token = int(st.tokens[0])
    kept = int((sp > 0).sum())
    kp, ki = sp.topk(min(top, kept))
    rp, ri = raw.topk(min(top, raw.size(-1)))
    return {"step": st.step, **_tok(tokenizer, token), "p_model": float(raw[token]), "p_sampler": float(sp[token]),
            "n_kept": kept, "eos": token in eos,
            "alternatives": [{**_tok(tokenizer, j), "p_sampler": float(p), "p_model": float(raw[j])}
                             for p, j in zip(kp, ki)],
            "raw_top": [{**_tok(tokenizer, j), "p_model": float(p), "p_sampler": float(sp[j])} for p, j in zip(rp, ri)]}


def speculative_step(st: SpecStep, index: int, tokenizer, eos: set[int], top: int) -> dict:
    n_acc = int(st.n_accepted[0])
    drafts = []
    for i in range(st.k):
        d = int(st.drafts[0, i])
        p, q, u = float(st.p_target[0, i, d]), float(st.q_draft[0, i, d]), float(st.uniforms[0, i])
        verdict = "accepted" if i < n_acc else ("rejected" if i == n_acc else "not checked")
        drafts.append({**_tok(tokenizer, d), "p_target": p, "q_draft": q, "u": u,
                       "accept_prob": min(1.0, p / q) if q > 0 else None, "verdict": verdict})
    kind, last = st.last_kind(0), int(st.emitted[0, -1])
    entry = {"call": index, "position": st.start, "k": st.k, "n_accepted": n_acc, "drafts": drafts,
             "last": {**_tok(tokenizer, last), "kind": kind}, "emitted": [], "eos": False}
    dist = st.fix[0] if kind == "residual" else st.p_target[0, st.k] if kind == "bonus" else None
    if dist is not None:
        kept = int((dist > 0).sum())
        tp, ti = dist.topk(min(top, kept))
        entry["last"].update(p=float(dist[last]), alternatives=[{**_tok(tokenizer, j), "p": float(v)} for v, j in zip(tp, ti)],
                             n_kept=kept)
    for tok in st.emitted[0].tolist():  # what the stream yields from this step
        if tok in eos:
            entry["eos"] = True
            break
        entry["emitted"].append(_tok(tokenizer, tok))
    return entry


def contrastive_step(st: CDStep, index: int, tokenizer, eos: set[int], max_head: int) -> dict:
    p_e, p_a = st.z_expert[0].softmax(-1), st.z_amateur[0].softmax(-1)
    head_ids = st.head[0].nonzero()[:, 0]
    order = st.scores[0, head_ids].argsort(descending=True)
    best = float(st.scores[0, head_ids[order[0]]])
    head = [{**_tok(tokenizer, j), "p_expert": float(p_e[j]), "p_amateur": float(p_a[j]),
             "score": float(st.scores[0, j]) - best} for j in head_ids[order][:max_head].tolist()]
    return {"step": st.step, **_tok(tokenizer, st.token), "expert": _tok(tokenizer, st.expert_token),
            "changed": st.token != st.expert_token, "in_head": bool(st.head[0, st.token]),
            "head_size": int(st.head.sum()), "head": head, "eos": st.token in eos}


def trace_decoding(method: Method, model, tokenizer, ids: list[int], n: int, partner=None, seed: int | None = None,
                   top: int = 5, max_head: int = 10) -> tuple[list[dict], Stats]:
    """Up to n new tokens after `ids` by `method` (partner: the draft or amateur model), one dict per
    step (speculative: per target call), and the loop's Stats. `seed` seeds the generator as
    generate.make_generator does; the tokenizer's end-of-sequence ids stop the stream."""
    eos = set(tokenizer.eos_ids)
    if method.name == "speculative":
        describe = functools.partial(speculative_step, tokenizer=tokenizer, eos=eos, top=top)
    elif method.name == "contrastive":
        describe = functools.partial(contrastive_step, tokenizer=tokenizer, eos=eos, max_head=max_head)
    else:
        describe = functools.partial(sample_step, tokenizer=tokenizer, eos=eos, top=top)
    steps, stats = [], method.new_stats()
    generator = make_generator(seed, model.tok_emb.weight.device)
    out = list(stream(method, model, ids, n, partner, generator, eos, stats,
                      trace=lambda st: steps.append(describe(st, len(steps)))))
    if method.name == "speculative" and sum(len(s["emitted"]) for s in steps) != len(out):
        raise RuntimeError("the speculative trace does not cover exactly what the loop emitted")
    return steps, stats


def trace_sampling(model, tokenizer, ids: list[int], n: int, params: SamplingParams, seed: int | None = None,
                   top: int = 5) -> list[dict]:
    """Plain sampling (greedy when params.temperature == 0): the steps of trace_decoding."""
    return trace_decoding(Method("sample", params), model, tokenizer, ids, n, seed=seed, top=top)[0]


def trace_speculative(target, draft, tokenizer, ids: list[int], n: int, k: int, params: SamplingParams,
                      seed: int | None = None, adaptive_k: bool = False, top: int = 5) -> tuple[list[dict], Stats]:
    """Speculative decoding (batch 1) with k drafts per target call: trace_decoding's steps and Stats."""
    method = Method("speculative", params, k=k, adaptive_k=adaptive_k)
    return trace_decoding(method, target, tokenizer, ids, n, draft, seed, top)


def trace_contrastive(expert, amateur, tokenizer, ids: list[int], n: int, alpha: float = 0.1, beta: float = 0.5,
                      objective: str = "obrien", amateur_temperature: float = 1.0, amateur_context: str = "full",
                      params: SamplingParams = SamplingParams(temperature=0), seed: int | None = None,
                      max_head: int = 10) -> tuple[list[dict], Stats]:
    """Contrastive decoding: trace_decoding's steps (at most max_head head entries each) and Stats."""
    method = Method("contrastive", params, alpha=alpha, beta=beta, objective=objective,
                    amateur_temperature=amateur_temperature, amateur_context=amateur_context)
    return trace_decoding(method, expert, tokenizer, ids, n, amateur, seed, max_head=max_head)


def record_trace(rep, method, loaded, max_new_tokens: int, partner=None, seed: int | None = None, top: int = 5) -> None:
    """Decode max_new_tokens tokens after rep's prompt (an analysis.Report) by `method` through
    trace_decoding, and keep the run in rep: trace, trace_stats, trace_method (partner: the Loaded
    draft / amateur the method needs)."""
    rep.trace, rep.trace_stats = trace_decoding(method, loaded.model, loaded.tokenizer, rep.ids, max_new_tokens,
                                                partner.model if partner is not None else None, seed, top)
    rep.trace_method = method.name
