"""A /v1/completions or /v1/chat/completions body -> a Job: the prompt's token ids and the decoding
method, built with the same library calls sample.py makes (methods.Method, with_temperature,
sampling.SamplingParams), so a request and a command line with the same settings decode alike.

Defaults follow sample.py, not OpenAI: temperature 0.8 for sampling (0 for contrastive), and
sampling / greedy keep going past the context by re-reading its last half (sample.py's default
sliding window). Everything a request asks for is checked here, before it is queued; a failure is a
RequestError naming the field (see fields.py), raised on the event loop.

The minillm extension, e.g. {"minillm": {"method": "speculative", "k": 4}}, picks a method the
loaded models can run (speculative needs --draft, or "draft_lookup": true for prompt lookup, which
needs no model; contrastive needs --amateur) and the sampler flags OpenAI's API lacks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..chat import render_for
from ..generate import check_budget
from ..methods import MAX_K, MAX_LOOKUP_NGRAM, METHODS, Method, with_temperature
from ..sampling import SamplingParams
from .errors import RequestError
from .fields import Fields
from .state import Served

MAX_N = 8  # choices per request
MAX_STOPS = 4  # as OpenAI


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    method: Method
    max_tokens: int
    n: int
    seed: int  # choice i decodes with seed + i, as sample.py's --num-samples
    stop: list[str]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def completion_job(served: Served, body) -> Job:
    f = Fields(body)
    f.string("model")
    prompt = f.get("prompt")
    if not isinstance(prompt, str):
        what = "a string" if prompt is not None else "given"
        raise RequestError(f"prompt must be {what} (one prompt per request)" +
                           ("" if prompt is None else f", got {type(prompt).__name__}"), "prompt")
    ids = encode(served, prompt, "prompt")
    return _job(served, f, ids, "prompt", max_tokens_key="max_tokens")


def chat_job(served: Served, body) -> Job:
    f = Fields(body)
    f.string("model")
    messages = _messages(f.get("messages"))
    tok = served.model.tokenizer
    if not getattr(tok, "chat_template", None):
        raise RequestError(f"the model {served.model_id} has no chat template (a base or char model): "
                           "use /v1/completions", "messages")
    try:
        text = render_for(tok, messages)
    except ValueError as e:
        raise RequestError(str(e), "messages") from None
    ids = encode(served, text, "messages")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"  # newer name
    if key == "max_completion_tokens" and body.get("max_tokens") is not None:
        raise RequestError("give max_tokens or max_completion_tokens, not both", "max_tokens")
    return _job(served, f, ids, "messages", max_tokens_key=key)


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RequestError(f"messages must be a non-empty list of {{role, content}} objects, got {value!r}"[:300],
                           "messages")
    out = []
    for i, m in enumerate(value):
        f = Fields(m, f"messages[{i}].")
        role = f.string("role", required=True, choices=("system", "user", "assistant"))
        content = f.string("content", required=True)
        f.ignore("name")
        f.finish()
        out.append({"role": role, "content": content})
    return out


def encode(served: Served, text: str, param: str) -> list[int]:
    """The prompt's ids, refused when empty, over the prompt cap or longer than a loaded model's context."""
    cap = served.limits.max_prompt_tokens
    if len(text) > 64 * cap:  # no tokenizer makes fewer tokens than this; spare the encode
        raise RequestError(f"{param} is {len(text):,} characters, over the limit of {cap} tokens", param)
    try:
        ids = served.model.tokenizer.encode(text)
    except ValueError as e:
        raise RequestError(f"{param}: {e}", param) from None
    if not ids:
        raise RequestError(f"{param} is empty: give at least one token", param)
    if len(ids) > cap:
        raise RequestError(f"{param} is {len(ids)} tokens, over this server's limit of {cap} (--max-prompt-tokens)",
                           param)
    if len(ids) > served.model.config.block_size:
        raise RequestError(f"{param} is {len(ids)} tokens, longer than the model's context of "
                           f"{served.model.config.block_size}", param)
    return ids


def _job(served: Served, f: Fields, ids: list[int], prompt_key: str, max_tokens_key: str) -> Job:
    cap = served.limits.max_tokens
    max_tokens = f.integer(max_tokens_key, 1, cap)
    temperature = f.number("temperature", low=0)
    sampler = {"top_p": f.number("top_p", 0, 1, low_open=True),
               "presence_penalty": f.number("presence_penalty", -2, 2, default=0.0),
               "frequency_penalty": f.number("frequency_penalty", -2, 2, default=0.0)}
    n = f.integer("n", 1, MAX_N, default=1)
    seed = f.integer("seed", 0)
    stop = f.strings("stop", MAX_STOPS)
    stream = f.boolean("stream")
    options = f.nested("stream_options")
    include_usage = bool(options and options.boolean("include_usage"))
    if options:
        options.finish()
    f.ignore("user")
    method = _method(served, f.nested("minillm"), sampler, temperature)
    f.finish()
    max_tokens = _fit(served, method, len(ids), max_tokens, max_tokens_key, prompt_key)
    seed = seed if seed is not None else random.SystemRandom().randrange(2**62)
    return Job(ids, method, max_tokens, n, seed, stop, stream, include_usage)


def _method(served: Served, ext: Fields | None, sampler: dict, temperature: float | None) -> Method:
    """The Method a request asks for: "greedy" at temperature 0, else "sample", unless minillm.method says."""
    name = "greedy" if temperature == 0 else "sample"
    extra = {}
    if ext is not None:
        name = ext.string("method", choices=METHODS) or name
        sampler.update(top_k=ext.integer("top_k", 1), min_p=ext.number("min_p", 0, 1),
                       repetition_penalty=ext.number("repetition_penalty", 0, low_open=True, default=1.0))
        extra = {k: v for k, v in (("k", ext.integer("k", 1, MAX_K)), ("alpha", ext.number("alpha", 0, 1, low_open=True)),
                                   ("beta", ext.number("beta", 0))) if v is not None}
        extra.update(lookup_settings(ext, name))
        ext.finish()
    return build_method(served, name, SamplingParams(0.0, **sampler), temperature, "minillm.method",
                        sliding_window=name in ("sample", "greedy"), **extra)


def lookup_settings(f: Fields, method: str) -> dict:
    """draft_lookup (speculative decoding with prompt lookup, no draft model) and lookup_ngram, as given."""
    settings = {}
    if f.boolean("draft_lookup"):
        if method != "speculative":
            raise RequestError(f"draft_lookup is a draft of method speculative, not of {method}", f.name("draft_lookup"))
        settings["draft_lookup"] = True
    ngram = f.integer("lookup_ngram", 1, MAX_LOOKUP_NGRAM)
    return settings if ngram is None else {**settings, "lookup_ngram": ngram}


def build_method(served: Served, name: str, params: SamplingParams, temperature: float | None, method_field: str,
                 **settings) -> Method:
    """The Method, built and checked by the library (a greedy request with a temperature is the one
    refusal a checked request can meet: a 400 on temperature), and runnable by the loaded models."""
    try:
        method = Method(name, with_temperature(name, params, temperature), **settings)
    except ValueError as e:
        raise RequestError(str(e), "temperature") from None
    if method.partner and served.partner(method.partner) is None:
        lookup = ' (or ask for "draft_lookup": true)' if method.partner == "draft" else ""
        raise RequestError(f"method {name} needs the {method.partner} model, and this server has none: start it with "
                           f"--{method.partner} PATH{lookup}", method_field)
    return method


def _fit(served: Served, method: Method, prompt_tokens: int, max_tokens: int | None, key: str, prompt_key: str) -> int:
    """max_tokens, or by default as many as the cap allows and (without a sliding window) the context fits."""
    models = [served.model] + ([served.partner(method.partner)] if method.partner else [])
    context = min(m.config.block_size for m in models)
    if prompt_tokens > context:
        raise RequestError(f"{prompt_key} is {prompt_tokens} tokens, longer than the {method.partner}'s context "
                           f"of {context}", prompt_key)
    if method.sliding_window:
        return max_tokens or served.limits.max_tokens
    if max_tokens is None:
        return max(1, min(served.limits.max_tokens, context - prompt_tokens + 1))
    try:
        check_budget(prompt_tokens, max_tokens, context)
    except ValueError:
        raise RequestError(f"{key} {max_tokens} does not fit the context: the {prompt_key} is {prompt_tokens} tokens "
                           f"of {context}, so at most {context - prompt_tokens + 1} new tokens (method {method.name} "
                           "has no sliding window)", key) from None
    return max_tokens
