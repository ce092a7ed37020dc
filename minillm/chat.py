"""Multi-turn chat on one KV cache.

Each turn renders the whole conversation with the checkpoint's chat template (SmolLM2-Instruct:
ChatML, `<|im_start|>role\\n...<|im_end|>\\n`), compares its tokens with what the cache already
holds, crops the cache to the common prefix and feeds only the rest. Earlier turns are therefore
read once, not recomputed; the reply stops at the end-of-turn token.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Iterator

from .generate import Stats, make_generator, stream_tokens
from .kv_cache import KVCache
from .sampling import SamplingParams
from .tokenizer import IncrementalDecoder


TEMPLATE_SECONDS = 2.0  # a chat template renders within this time ...
TEMPLATE_CHARS = 1 << 20  # ... and writes at most this many characters beyond the messages' own


def render_chat(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "") -> str:
    """Render a Hugging Face-style Jinja chat template in Jinja's sandbox (templates are data, not code),
    under a budget: TEMPLATE_SECONDS of time (checked on every line the template runs) and
    TEMPLATE_CHARS of output and of any string or list it builds. A template over budget (nested loops,
    lipsum(10**7), 'x' * 10**9) is a ValueError that says so, never a hang or an exhausted memory."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise RuntimeError("chat templates need jinja2: pip install jinja2 (it comes with the 'convert' extra)") from e

    def raise_exception(msg):
        raise TemplateRaised(f"chat template: {msg}")
    env = _budgeted(ImmutableSandboxedEnvironment)(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals.pop("lipsum", None)  # Jinja's filler-text generator: a template has no use for it
    budget = TEMPLATE_CHARS + sum(len(str(m.get("content", ""))) for m in messages)
    try:
        gen = env.from_string(template).generate(messages=messages, add_generation_prompt=True,
                                                 bos_token=bos_token, eos_token=eos_token)
        return _within_budget(gen, budget, time.monotonic() + TEMPLATE_SECONDS)
    except (TemplateRaised, TemplateOverBudget):
        raise
    except RecursionError:
        raise ValueError("chat template cannot be rendered: it recurses without end") from None
    except Exception as e:  # a syntax error, an undefined name, what the sandbox blocks (SecurityError), a
        # TypeError inside the template...: a template is data, so its failure is a ValueError that names it
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"chat template cannot be rendered{where}: {type(e).__name__}: {first}") from None


def render_for(tokenizer, messages: list[dict]) -> str:
    """render_chat with a tokenizer's own template, its BOS token and its first EOS token (a chat turn,
    HumanEval's prompt and the server's chat requests all render this way)."""
    eos = tokenizer.eos_tokens[0] if getattr(tokenizer, "eos_tokens", None) else ""
    return render_chat(tokenizer.chat_template, messages, getattr(tokenizer, "bos_token", None) or "", eos)


def _within_budget(chunks, chars: int, deadline: float) -> str:
    """Join the template's output, stopping it once past `deadline` (a line tracer) or `chars`."""
    def tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateOverBudget(f"chat template takes over {TEMPLATE_SECONDS:g} s to render (a loop without end?)")
        return tracer
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        out, n = [], 0
        for chunk in chunks:
            out.append(chunk)
            n += len(chunk)
            if n > chars:
                raise TemplateOverBudget(f"chat template writes over {chars:,} characters")
        return "".join(out)
    finally:
        sys.settrace(previous)


def _budgeted(base):
    """Jinja's sandbox with *, ** and % checked before they run: no string, list or number beyond the budget."""
    class Budgeted(base):
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context, operator, left, right):
            size = _binop_size(operator, left, right)
            if size > TEMPLATE_CHARS:
                raise TemplateOverBudget(f"chat template builds a value of ~{size:,} items with {operator!r}")
            return super().call_binop(context, operator, left, right)
    return Budgeted


def _binop_size(operator: str, left, right) -> int:
    """About how big the result of `left operator right` would be (0 when small by nature)."""
    if operator == "*":
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        return len(seq) * n if isinstance(seq, (str, list, tuple)) and isinstance(n, int) else 0
    if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        return max(1, abs(left).bit_length()) * right // 8
    if operator == "%" and isinstance(left, str):  # a width or precision of its own: '%09999999d'
        return max([int(w) for w in re.findall(r"%[-+ #0]*(\d+)", left) + re.findall(r"\.(\d+)", left)] or [0])
    return 0


class TemplateOverBudget(ValueError):
    """A chat template past its time or size budget (render_chat)."""


class TemplateRaised(ValueError):
    """The template's own raise_exception(msg): the template refuses these messages."""


class ChatSession:
    def __init__(self, model, tokenizer, system: str | None = None, params: SamplingParams = SamplingParams(),
                 seed: int | None = None, max_new_tokens: int = 512):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this checkpoint has no chat template (a base or char model): use plain sampling")
        self.model, self.tokenizer, self.params, self.max_new_tokens = model, tokenizer, params, max_new_tokens
        self.messages = [{"role": "system", "content": system}] if system else []
        self.cache = KVCache.for_model(model, batch_size=1)
        self.cached_ids: list[int] = []  # the tokens whose K/V the cache holds, in order
        self.generator = make_generator(seed, model.tok_emb.weight.device)
        self.last_stats = Stats()

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the assistant's answer to user_text; the conversation (and cache) keep it."""
        self.messages.append({"role": "user", "content": user_text})
        tok = self.tokenizer
        ids = tok.encode(render_for(tok, self.messages))
        if not ids:
            raise ValueError("the chat template rendered this conversation as no text at all: the checkpoint's "
                             "template does not handle these messages")
        common = 0
        while common < min(len(ids), len(self.cached_ids)) and ids[common] == self.cached_ids[common]:
            common += 1
        common = min(common, len(ids) - 1)  # feed at least one token to get the next prediction
        self.cache.crop(common)
        room = self.model.config.block_size - len(ids) + 1
        if room < 1:
            raise ValueError(f"the conversation ({len(ids)} tokens) no longer fits the context "
                             f"({self.model.config.block_size}): start a new chat")
        new_ids = ids[common:]
        self.cached_ids = ids[:common]
        self.last_stats = Stats()
        decoder, answer = IncrementalDecoder(tok), []
        for token in stream_tokens(self.model, new_ids, min(self.max_new_tokens, room), self.params, self.generator,
                                   set(tok.eos_ids), stats=self.last_stats, cache=self.cache):
            answer.append(token)
            piece = decoder.feed(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail
        self.cached_ids = (ids + answer)[:self.cache.length]
        self.messages.append({"role": "assistant", "content": tok.decode(answer)})
