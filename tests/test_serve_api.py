"""`python -m minillm.serve`'s OpenAI-style API, driven by the official `openai` client against a live
server on loopback: completions and chat, streamed and not, stop strings, seeds, n > 1, usage, greedy
text equal to sample.py's, bad input as 400s naming the field, clients that leave, and 8 clients at
once. A tiny char model (with a second one as draft and amateur) serves most tests; SmolLM2 serves
the chat test and one greedy == sample.py check."""

import http.client
import importlib.util
import json
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

openai = pytest.importorskip("openai", reason="the API tests need the openai client: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install -e '.[serve]'")

from conftest import exit_status
from live_server import live_server

from minillm.chat import ChatSession, render_chat
from minillm.checkpoint import load_model, save_model
from minillm.config import preset
from minillm.model import Transformer
from minillm.sampling import SamplingParams
from minillm.serve.state import Limits, Served
from minillm.speed import speed_up
from minillm.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = "ROMEO:\nWhat light through yonder window breaks?\nJULIET:\nAy me!\n"
LONG = 200_000  # max_tokens that would decode for minutes: only a stopped decode ends in time


def load_sample_py():
    spec = importlib.util.spec_from_file_location("sample_cli_serve", ROOT / "sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def lively(model: Transformer) -> Transformer:
    """Larger random weights, so that greedy output varies (as tests/test_sample_cli.py does)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "emb" in name else 0.3)
    return model


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    save_model(d / "target.safetensors", lively(Transformer(preset("nano", vocab_size=tok.vocab_size, block_size=64,
                                                                   tie_embeddings=False))), tok)
    torch.manual_seed(1)
    small = preset("nano", family="llama", n_layer=1, vocab_size=tok.vocab_size, block_size=64, tie_embeddings=False)
    save_model(d / "small.safetensors", lively(Transformer(small)), tok)
    return {"target": str(d / "target.safetensors"), "small": str(d / "small.safetensors")}


def loaded(path):
    m = load_model(path)
    speed_up(m.model)  # as sample.py and the server do
    return m


@pytest.fixture(scope="session")
def tiny_models(tiny_paths):
    return loaded(tiny_paths["target"]), loaded(tiny_paths["small"])


@pytest.fixture(scope="session")
def tiny(tiny_paths, tiny_models):
    """(url, served) of the tiny model with a draft and an amateur; max_tokens up to LONG."""
    model, small = tiny_models
    served = Served(model, small, small, Limits(max_prompt_tokens=48, max_tokens=LONG), tiny_paths["target"])
    with live_server(served) as url:
        yield url, served


@pytest.fixture(scope="session")
def smol(smollm2_converted):
    served = Served(loaded(smollm2_converted), limits=Limits(max_tokens=64), model_path=str(smollm2_converted))
    with live_server(served) as url:
        yield url, served


def client(url, **kwargs):
    return openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0, **kwargs)


def complete(url, prompt="ROMEO:", **kwargs):
    return client(url).completions.create(model="tiny", prompt=prompt, **kwargs)


def streamed(url, prompt="ROMEO:", **kwargs):
    """(text per choice, finish_reason per choice, the usage chunk or None) of a streamed completion."""
    texts, finish, usage = {}, {}, None
    for chunk in client(url).completions.create(model="tiny", prompt=prompt, stream=True, **kwargs):
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, usage


def sample_py(capsys, model, prompt, n):
    code = exit_status(SAMPLE.main, ["--model", model, "--prompt", prompt, "--method", "greedy",
                                     "--max-new-tokens", str(n)])
    out = capsys.readouterr().out
    assert code == 0
    return out


SAMPLE = load_sample_py()


# ----------------------------------------------------------------------------- completions

def test_models_lists_the_served_model(tiny):
    url, served = tiny
    assert [m.id for m in client(url).models.list().data] == ["target"] == [served.model_id]


def test_greedy_completion_equals_sample_py_and_counts_usage(tiny, tiny_paths, capsys):
    url, _ = tiny
    r = complete(url, "Ay", max_tokens=30, temperature=0)
    assert "Ay" + r.choices[0].text + "\n" == sample_py(capsys, tiny_paths["target"], "Ay", 30)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, 30, 32)


def test_greedy_completion_equals_sample_py_on_smollm2(smol, smollm2_converted, capsys):
    url, served = smol
    prompt = "The capital of France is"
    r = client(url).completions.create(model=served.model_id, prompt=prompt, max_tokens=8, temperature=0)
    assert prompt + r.choices[0].text + "\n" == sample_py(capsys, str(smollm2_converted), prompt, 8)
    assert r.usage.prompt_tokens == len(served.model.tokenizer.encode(prompt))


def test_stream_equals_whole_and_reports_usage(tiny):
    url, _ = tiny
    whole = complete(url, max_tokens=25, temperature=0.9, seed=11)
    texts, finish, usage = streamed(url, max_tokens=25, temperature=0.9, seed=11, stream_options={"include_usage": True})
    assert texts == {0: whole.choices[0].text} and finish == {0: "length"}
    assert usage.completion_tokens == whole.usage.completion_tokens == 25


def test_seed_reproduces_and_n_choices_use_consecutive_seeds(tiny):
    url, _ = tiny
    a, b = (complete(url, max_tokens=20, temperature=1.0, seed=5).choices[0].text for _ in range(2))
    assert a == b != complete(url, max_tokens=20, temperature=1.0, seed=6).choices[0].text
    three = complete(url, max_tokens=20, temperature=1.0, seed=5, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.text for c in three.choices] == [complete(url, max_tokens=20, temperature=1.0, seed=5 + i).choices[0].text
                                               for i in range(3)]
    assert three.usage.completion_tokens == 60 and three.usage.prompt_tokens == len("ROMEO:")
    texts, _, _ = streamed(url, max_tokens=20, temperature=1.0, seed=5, n=3)
    assert texts == {c.index: c.text for c in three.choices}


def test_stop_strings_cut_the_text_whole_and_streamed(tiny):
    url, _ = tiny
    full = complete(url, "Ay", max_tokens=30, temperature=0).choices[0].text
    stop = full[10:12]
    want = full[:full.find(stop)]
    r = complete(url, "Ay", max_tokens=30, temperature=0, stop=["\u2603", stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    assert r.usage.completion_tokens < 30
    assert streamed(url, "Ay", max_tokens=30, temperature=0, stop=stop)[:2] == ({0: want}, {0: "stop"})


def test_the_minillm_field_runs_speculative_and_contrastive(tiny):
    """Greedy speculative decoding (a draft model, or prompt lookup) and contrastive with beta = 0 all
    equal plain greedy."""
    url, _ = tiny
    greedy = complete(url, "Ay", max_tokens=30, temperature=0).choices[0].text
    for ext in ({"method": "speculative", "k": 3}, {"method": "contrastive", "beta": 0},
                {"method": "speculative", "draft_lookup": True, "lookup_ngram": 2, "k": 5}):
        r = complete(url, "Ay", max_tokens=30, temperature=0, extra_body={"minillm": ext})
        assert r.choices[0].text == greedy, ext


# ----------------------------------------------------------------------------- chat

def test_chat_on_smollm2_follows_the_template_whole_and_streamed(smol):
    url, served = smol
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    c = client(url).chat.completions
    r = c.create(model=served.model_id, messages=messages, max_tokens=8, temperature=0)
    text = r.choices[0].message.content
    tok = served.model.tokenizer
    session = ChatSession(served.model.model, tok, None, SamplingParams(temperature=0), 0, 8)
    assert text == "".join(session.reply(messages[0]["content"]))  # sample.py --chat's library path
    assert "Paris" in text and r.choices[0].message.role == "assistant"
    prompt_ids = tok.encode(render_chat(tok.chat_template, messages, tok.bos_token or "", tok.eos_tokens[0]))
    assert r.usage.prompt_tokens == len(prompt_ids)
    pieces, roles = [], []
    for chunk in c.create(model=served.model_id, messages=messages, max_tokens=8, temperature=0, stream=True):
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            roles.append(ch.delta.role)
    assert "".join(pieces) == text and roles[0] == "assistant"


def test_chat_needs_a_chat_template(tiny):
    url, _ = tiny
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert e.value.param == "messages" and "chat template" in e.value.message


# ----------------------------------------------------------------------------- bad input

BAD = [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": LONG + 1}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 99}, "n"),
    ({"seed": -1}, "seed"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"prompt": "x" * 49}, "prompt"),  # over --max-prompt-tokens (48)
    ({"prompt": "ROMEO: \u2603"}, "prompt"),  # not in the char model's vocabulary
    ({"prompt": ""}, "prompt"),
    ({"extra_body": {"minillm": {"method": "beam"}}}, "minillm.method"),
    ({"extra_body": {"minillm": {"k": 0}}}, "minillm.k"),
    ({"extra_body": {"minillm": {"draft_lookup": True}}}, "minillm.draft_lookup"),  # not a draft of sample
    ({"extra_body": {"minillm": {"method": "speculative", "draft_lookup": True, "lookup_ngram": 17}}},
     "minillm.lookup_ngram"),
    ({"temperature": 0.5, "extra_body": {"minillm": {"method": "greedy"}}}, "temperature"),
    ({"max_tokens": 100, "extra_body": {"minillm": {"method": "speculative"}}}, "max_tokens"),  # past the context
]


@pytest.mark.parametrize("kwargs, param", BAD, ids=[p for _, p in BAD])
def test_bad_input_is_a_400_naming_the_field(tiny, kwargs, param):
    url, _ = tiny
    kwargs = {"prompt": "ROMEO:", "max_tokens": 5, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client(url).completions.create(model="tiny", **kwargs)
    assert e.value.status_code == 400 and e.value.param == param and e.value.type == "invalid_request_error"
    assert param.split(".")[-1] in e.value.message


def post(url, path, body: bytes):
    """(status, JSON) of a raw POST."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def test_malformed_json_and_a_method_without_its_model_and_the_server_keeps_serving(tiny, tiny_models):
    url, _ = tiny
    status, body = post(url, "/v1/completions", b'{"prompt": "ROMEO:", ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert post(url, "/v1/completions", b"[1, 2]")[0] == 400
    status, body = post(url, "/v1/completions", b'{"prompt": "Ay", "temperature": NaN}')  # the client cannot send NaN
    assert status == 400 and body["error"]["param"] == "temperature"
    alone = Served(tiny_models[0], limits=Limits(max_tokens=8))
    with live_server(alone) as url2:
        status, body = post(url2, "/v1/completions", json.dumps({"prompt": "Ay", "minillm": {"method": "contrastive"}}).encode())
        assert status == 400 and body["error"]["param"] == "minillm.method" and "--amateur" in body["error"]["message"]
        status, body = post(url2, "/v1/completions", json.dumps({"prompt": "Ay", "minillm": {"method": "speculative"}}).encode())
        assert status == 400 and '"draft_lookup": true' in body["error"]["message"]
        lookup = {"prompt": "Ay", "max_tokens": 6, "temperature": 0, "minillm": {"method": "speculative", "draft_lookup": True}}
        status, body = post(url2, "/v1/completions", json.dumps(lookup).encode())  # prompt lookup needs no draft model
        assert status == 200 and body["usage"]["completion_tokens"] == 6
    assert complete(url, max_tokens=3).usage.completion_tokens == 3


# ----------------------------------------------------------------------------- leaving, limits, load

def wait_idle(served, seconds=10.0):
    deadline = time.monotonic() + seconds
    while served.open_sessions and time.monotonic() < deadline:
        time.sleep(0.02)
    return served.open_sessions == 0


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_leaves_stops_its_decode(tiny, stream):
    url, served = tiny
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "ROMEO:", "max_tokens": LONG, "stream": stream}),
                 {"Content-Type": "application/json"})
    if stream:
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
    else:
        time.sleep(0.3)  # the decode has begun
    conn.sock.close()
    conn.close()
    t0 = time.monotonic()
    assert wait_idle(served)
    assert complete(url, max_tokens=3, timeout=10).usage.completion_tokens == 3  # the worker is free again
    assert time.monotonic() - t0 < 10


def test_session_limits_refuse_and_end_requests(tiny_models):
    served = Served(tiny_models[0], limits=Limits(max_tokens=LONG, max_sessions=1, session_seconds=0.5))
    with live_server(served) as url:
        t0 = time.monotonic()
        r = complete(url, max_tokens=LONG, temperature=0)  # ended by the lifetime
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens < LONG
        assert time.monotonic() - t0 < 5
        stream = client(url).completions.create(model="tiny", prompt="ROMEO:", max_tokens=LONG, stream=True)
        next(iter(stream))  # holds the one session
        with pytest.raises(openai.RateLimitError) as e:
            complete(url, max_tokens=3)
        assert e.value.status_code == 429
        stream.close()


def test_eight_concurrent_clients_each_get_their_own_answer(tiny):
    """Requests queue (one decode at a time): each streamed answer equals the one it gets alone."""
    url, served = tiny
    args = [{"max_tokens": 40, "temperature": 1.0, "seed": 100 + i} for i in range(8)]
    alone = [complete(url, **a).choices[0].text for a in args]
    got, seconds, errors = [None] * 8, [0.0] * 8, []

    def one(i):
        try:
            t = time.perf_counter()
            got[i] = streamed(url, **args[i])[0][0]
            seconds[i] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    total = time.perf_counter() - t0
    assert not errors and got == alone
    print(f"8 concurrent clients x 40 tokens: {total:.2f} s in all, per request "
          f"min {min(seconds):.2f} / max {max(seconds):.2f} s")
    assert wait_idle(served)
