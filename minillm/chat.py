"""Multi-turn chat on one KV cache.

Each turn renders the whole conversation with the checkpoint's chat template (SmolLM2-Instruct:
ChatML, `<|im_start|>role\\n...<|im_end|>\\n`), compares its tokens with what the cache already
holds, crops the cache to the common prefix and feeds only the rest. Earlier turns are therefore
read once, not recomputed; the reply stops at the end-of-turn token.
"""

from __future__ import annotations

from typing import Iterator

from .generate import Stats, make_generator, stream_tokens
from .kv_cache import KVCache
from .sampling import SamplingParams
from .tokenizer import IncrementalDecoder


def render_chat(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "") -> str:
    """Render a Hugging Face-style Jinja chat template, sandboxed (templates are data, not code)."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise RuntimeError("chat templates need jinja2: pip install jinja2 (it comes with the 'convert' extra)") from e

    def raise_exception(msg):
        raise TemplateRaised(f"chat template: {msg}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                bos_token=bos_token, eos_token=eos_token)
    except TemplateRaised:
        raise
    except RecursionError:
        raise ValueError("chat template cannot be rendered: it recurses without end") from None
    except Exception as e:  # a syntax error, an undefined name, what the sandbox blocks (SecurityError), a
        # TypeError inside the template...: a template is data, so its failure is a ValueError that names it
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"chat template cannot be rendered{where}: {type(e).__name__}: {first}") from None


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
        ids = tok.encode(render_chat(tok.chat_template, self.messages, tok.bos_token or "",
                                     tok.eos_tokens[0] if tok.eos_tokens else ""))
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
