"""The inspector page's routes (app.py mounts them beside /v1):

    GET  /api/methods             the loaded model, which methods it can run (speculative needs --draft,
                                  contrastive --amateur; "lookup", speculative with prompt lookup, needs
                                  neither), the limits and the defaults the form starts with
    POST /api/inspect             {prompt, method, max_tokens, temperature, top_k, top_p, min_p, seed, k,
                                  draft_lookup, lookup_ngram, alpha, beta, top} -> the views of
                                  minillm.inspector.views: prefill, logit lens, attention, head scores
                                  and the recorded decoding steps
    GET  /api/source?name=NAME    the source of a function the page cites (inspector.sources' allow-list)

A request is checked field by field before it is queued (fields.Fields: unknown fields, wrong types
and out-of-range values are a 400 naming the field; a method the loaded models cannot run, a prompt
over the cap or longer than the context too). It then runs as one session in the worker thread that
every model call goes through (state.Served.run_exclusive), so it never shares a KV cache with a
/v1 request; the JSON is encoded there too, off the event loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..generate import check_budget
from ..inspector.sources import source_of
from ..inspector.views import attention_cap, build_views
from ..methods import MAX_K, METHODS, PARTNER, Method
from ..sampling import SamplingParams
from .errors import RequestError, error_response
from .fields import Fields
from .openai_api import read_json
from .jobs import build_method, encode, lookup_settings
from .state import Busy, Served

MAX_INSPECT_TOKENS = 256  # tokens one inspection decodes (each step is recorded), under the server's cap
MAX_TOP = 20  # alternatives shown per position / step
DEFAULTS = {"method": "greedy", "max_tokens": 16, "seed": 1337, "top": 5, "k": 4, "alpha": 0.1, "beta": 0.5}


@dataclass(frozen=True)
class Inspection:
    prompt_ids: list[int]
    method: Method
    max_tokens: int
    seed: int
    top: int


def routes(served: Served) -> list[Route]:
    async def methods(request: Request):
        return JSONResponse(methods_reply(served))

    async def inspect(request: Request):
        try:
            job = inspection(served, await read_json(request))
            async with served.session():
                body = await served.run_exclusive(run_inspection, served, job)
        except RequestError as e:
            return error_response(e)
        except Busy as e:
            return error_response(RequestError(str(e), None, status=429))
        return Response(body, media_type="application/json")

    async def source(request: Request):
        name = request.query_params.get("name", "")
        try:
            return JSONResponse(source_of(name))
        except KeyError as e:
            return error_response(RequestError(e.args[0], "name", status=404))

    return [Route("/api/methods", methods, methods=["GET"]), Route("/api/inspect", inspect, methods=["POST"]),
            Route("/api/source", source, methods=["GET"])]


def methods_reply(served: Served) -> dict:
    cfg = served.model.config
    return {"model": {"id": served.model_id, "family": cfg.family, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                      "vocab_size": cfg.vocab_size, "block_size": cfg.block_size,
                      "attention_up_to_tokens": attention_cap(cfg.n_layer, cfg.n_head)},
            "methods": {**{m: m not in PARTNER or served.partner(PARTNER[m]) is not None for m in METHODS},
                        "lookup": True},  # speculative with prompt lookup: no second model
            "needs": dict(PARTNER),
            "limits": {"max_prompt_tokens": served.limits.max_prompt_tokens, "max_tokens": max_tokens_cap(served)},
            "defaults": DEFAULTS}


def max_tokens_cap(served: Served) -> int:
    return min(served.limits.max_tokens, MAX_INSPECT_TOKENS)


def inspection(served: Served, body) -> Inspection:
    """Check an /api/inspect body -> what to run; RequestError (400, naming the field) otherwise."""
    f = Fields(body)
    prompt = f.string("prompt", required=True)
    name = f.string("method", choices=METHODS) or DEFAULTS["method"]
    max_tokens = f.integer("max_tokens", 0, max_tokens_cap(served), default=DEFAULTS["max_tokens"])
    temperature = f.number("temperature", low=0)
    params = SamplingParams(0.0, top_k=f.integer("top_k", 1), top_p=f.number("top_p", 0, 1, low_open=True),
                            min_p=f.number("min_p", 0, 1))
    extra = dict(k=f.integer("k", 1, MAX_K, default=DEFAULTS["k"]),
                 alpha=f.number("alpha", 0, 1, low_open=True, default=DEFAULTS["alpha"]),
                 beta=f.number("beta", 0, default=DEFAULTS["beta"]), **lookup_settings(f, name))
    seed = f.integer("seed", 0, default=DEFAULTS["seed"])
    top = f.integer("top", 1, MAX_TOP, default=DEFAULTS["top"])
    f.finish()
    method = build_method(served, name, params, temperature, "method", **extra)
    ids = encode(served, prompt, "prompt")
    fit(served, method, len(ids), max_tokens)
    return Inspection(ids, method, max_tokens, seed, top)


def fit(served: Served, method: Method, prompt_tokens: int, max_tokens: int) -> None:
    """The prompt and max_tokens must fit every model the method runs (no sliding window here: each
    recorded step is one the page can explain)."""
    for role, loaded in [("model", served.model)] + ([(method.partner, served.partner(method.partner))]
                                                     if method.partner else []):
        try:
            check_budget(prompt_tokens, max_tokens, loaded.config.block_size, who=f"the {role}")
        except ValueError as e:
            raise RequestError(str(e).replace("max_new_tokens", "max_tokens"),
                               "prompt" if prompt_tokens > loaded.config.block_size else "max_tokens") from None


def run_inspection(served: Served, job: Inspection) -> bytes:
    """In the worker thread: inspect and trace, then encode the views as JSON bytes."""
    partner = served.partner(job.method.partner) if job.method.partner else None
    try:
        views = build_views(served.model, job.prompt_ids, job.method, job.max_tokens, partner, job.seed, job.top)
    except ValueError as e:  # a check of the library's that the request checks above did not foresee
        raise RequestError(str(e), None) from None
    views["info"]["model_id"] = served.model_id
    views["info"]["prompt"] = served.model.tokenizer.decode(job.prompt_ids)
    return json.dumps(views, ensure_ascii=False, allow_nan=False).encode("utf-8")
