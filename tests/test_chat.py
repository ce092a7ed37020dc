"""Chat: the template renders, replies stop at end-of-turn, and later turns reuse the KV cache."""

import time

import pytest
import torch

from minillm.chat import ChatSession, render_chat
from minillm.config import preset
from minillm.generate import stream_tokens
from minillm.model import Transformer
from minillm.sampling import SamplingParams
from minillm.tokenizer import BPETokenizer

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_model(data_dir):
    gpt2 = BPETokenizer.gpt2(str(data_dir / "gpt2" / "gpt2.tiktoken"))
    tok = BPETokenizer("chatml", gpt2.pat_str, gpt2.ranks, {"<|im_start|>": 50257, "<|im_end|>": 50258},
                       bos_token="<|im_start|>", eos_tokens=["<|im_end|>"], chat_template=CHATML)
    torch.manual_seed(0)
    model = Transformer(preset("nano", family="llama", vocab_size=tok.vocab_size, block_size=256)).eval()
    return model, tok


def test_render_chatml():
    text = render_chat(CHATML, [{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("template,match", [
    ("{% for m in messages %}{{ m.content }}", r"\(line 1\): TemplateSyntaxError: .*'endfor'"),
    ("{{ nothing.here }}", "UndefinedError: 'nothing' is undefined"),
    ("{{ messages.__class__.__mro__ }}", "SecurityError: access to attribute '__class__'"),  # the sandbox
    ("{{ messages + 1 }}", "TypeError: can only concatenate list"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses without end"),
    ("{{ raise_exception('roles must alternate') }}", "^chat template: roles must alternate$"),  # the template's own
])
def test_a_template_that_cannot_render_is_a_value_error_naming_the_problem(template, match):
    with pytest.raises(ValueError, match=match) as e:
        render_chat(template, [{"role": "user", "content": "Hi"}])
    assert "\n" not in str(e.value) and str(e.value).startswith("chat template")


@pytest.mark.parametrize("template,match", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "over 2 s"),  # hung
    ("{% set r = range(100000)|list %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}", "over 2 s"),
    ("{{ lipsum(10**7) }}", "'lipsum' is undefined"),  # 2.6 GB after 17 s, then a hang
    ("{{ 'x' * 10**9 }}", "builds a value of ~1,000,000,000 items"),
    ("{{ '%0999999999d' % 1 }}", "builds a value"),
    ("{% for i in range(100000) %}{{ 'abcdefghijklmnopqrstuvwxyz' }}{% endfor %}", "writes over"),
])
def test_a_template_over_its_budget_stops_with_a_value_error(template, match):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match) as e:
        render_chat(template, [{"role": "user", "content": "Hi"}])
    assert time.perf_counter() - t0 < 10 and str(e.value).startswith("chat template")


def test_a_template_that_renders_nothing_is_named(chat_model, monkeypatch):
    model, tok = chat_model
    monkeypatch.setattr(tok, "chat_template", "{% if false %}x{% endif %}")  # was: "KVCache.crop: n must be in [0, 0], got -1"
    with pytest.raises(ValueError, match="rendered this conversation as no text"):
        list(ChatSession(model, tok).reply("Hi"))


def test_turns_reuse_the_cache_and_match_a_fresh_run(chat_model):
    model, tok = chat_model
    eos = tok.eos_ids
    session = ChatSession(model, tok, system="Be brief.", params=SamplingParams(temperature=0), max_new_tokens=12)
    first = "".join(session.reply("Hello there"))
    fed_first = session.last_stats.prompt_tokens
    second = "".join(session.reply("And again?"))
    fed_second = session.last_stats.prompt_tokens
    convo = render_chat(CHATML, session.messages[:-1])
    full_ids = tok.encode(convo)
    # the first turn's prompt (system + user) stays cached: the second turn re-reads only what follows
    # it (the re-tokenised reply may split differently from the sampled tokens, so not exactly the new turn)
    assert fed_second <= len(full_ids) - (fed_first - 1)
    fresh = list(stream_tokens(model, full_ids, 12, SamplingParams(temperature=0), eos_ids=eos))
    assert tok.decode(fresh) == second
    assert session.messages[-1] == {"role": "assistant", "content": second}
    assert session.messages[2]["content"] == first


def test_chat_needs_a_template(chat_model):
    model, _ = chat_model
    from minillm.tokenizer import CharTokenizer
    with pytest.raises(ValueError, match="no chat template"):
        ChatSession(model, CharTokenizer("abc"))
