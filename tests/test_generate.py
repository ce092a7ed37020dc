"""The decoding loop: cache vs recompute, seeds, stops, streaming, context errors, sample.py."""

import subprocess
import sys

import pytest
import torch

from minillm.checkpoint import save_model
from minillm.config import preset
from minillm.generate import GenStats, generate, stream_text, stream_tokens
from minillm.model import Transformer
from minillm.sampling import SamplingParams
from minillm.tokenizer import BPETokenizer, CharTokenizer

TEXT = "ROMEO:\nWhat light through yonder window breaks?\nJULIET:\nAy me!\n"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def char_model(request):
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(TEXT)
    extra = dict(n_kv_head=2) if request.param == "llama" else {}
    return Transformer(preset("nano", family=request.param, vocab_size=tok.vocab_size, **extra)).eval(), tok


def test_greedy_with_cache_equals_full_recompute(char_model):
    model, tok = char_model
    prompt = tok.encode("ROMEO:")
    got = list(stream_tokens(model, prompt, 20, SamplingParams(temperature=0)))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_same_seed_same_text_global_rng_untouched(char_model):
    model, tok = char_model
    params = SamplingParams(temperature=1.0, top_k=10)
    state = torch.get_rng_state()
    a = generate(model, tok, "JULIET:", 25, params, seed=3)
    b = generate(model, tok, "JULIET:", 25, params, seed=3)
    c = generate(model, tok, "JULIET:", 25, params, seed=4)
    assert a.text == b.text and a.ids == b.ids and a.ids != c.ids
    assert torch.equal(torch.get_rng_state(), state)
    assert a.stats.new_tokens == 25 and a.stats.stopped_by == "max_new_tokens" and len(a.ids) == 25


def test_stream_pieces_join_to_generate_text(char_model):
    model, tok = char_model
    params = SamplingParams(temperature=0.9)
    pieces = list(stream_text(model, tok, "ROMEO:", 15, params, seed=1))
    assert len(pieces) == 15 and "".join(pieces) == generate(model, tok, "ROMEO:", 15, params, seed=1).text


def test_eos_stops_and_is_not_emitted(char_model):
    model, tok = char_model
    greedy = list(stream_tokens(model, tok.encode("Ay"), 10, SamplingParams(temperature=0)))
    eos = greedy[3]
    stats = GenStats()
    out = list(stream_tokens(model, tok.encode("Ay"), 10, SamplingParams(temperature=0), eos_ids={eos}, stats=stats))
    assert out == greedy[:greedy.index(eos)] and stats.stopped_by == "eos"


def test_zero_new_tokens(char_model):
    model, tok = char_model
    assert generate(model, tok, "Ay", 0).ids == []


def test_prompt_longer_than_context_is_an_error(char_model):
    model, tok = char_model
    prompt = (TEXT * 2)[:40]  # context is 32
    with pytest.raises(ValueError, match="the prompt is 40 tokens; the model's context is 32"):
        generate(model, tok, prompt, 5)
    with pytest.raises(ValueError, match=r"prompt \(6 tokens\) \+ max_new_tokens \(28\) exceeds the model's context of 32"):
        generate(model, tok, "ROMEO:", 28)
    assert len(generate(model, tok, "ROMEO:", 27).ids) == 27  # exactly fills the context


def test_sliding_window_runs_past_the_context(char_model):
    model, tok = char_model
    res = generate(model, tok, (TEXT * 2)[:40], 60, SamplingParams(temperature=0), sliding_window=True)
    assert len(res.ids) == 60


def test_unknown_character_in_prompt(char_model):
    model, tok = char_model
    with pytest.raises(ValueError, match="'Z'"):
        generate(model, tok, "ZORRO", 5)


@pytest.fixture(scope="module")
def char_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(TEXT)
    model = Transformer(preset("nano", vocab_size=tok.vocab_size))
    path = tmp_path_factory.mktemp("ckpt") / "char.safetensors"
    save_model(path, model, tok)
    return path


def run_sample(*args):
    return subprocess.run([sys.executable, "sample.py", *args], capture_output=True, text=True, timeout=120)


def test_sample_cli_streams_and_is_reproducible(char_checkpoint):
    args = ["--model", str(char_checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "5"]
    a, b = run_sample(*args), run_sample(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("ROMEO:") and len(a.stdout) == len("ROMEO:") + 20 + 1
    assert "tokens/s" in a.stderr


@pytest.mark.parametrize("flag, value, match", [
    ("--top-p", "1.5", "top_p must be in"),
    ("--temperature", "-1", "temperature must be >= 0"),
    ("--prompt", "XYZ", "'X'"),
])
def test_sample_cli_bad_input(char_checkpoint, flag, value, match):
    r = run_sample("--model", str(char_checkpoint), flag, value, "--max-new-tokens", "5")
    assert r.returncode == 2 and match in r.stderr


def test_bpe_stream_never_breaks_utf8(data_dir):
    """A random GPT-2-vocab model emits arbitrary byte tokens; streamed text must equal the full decode."""
    tok = BPETokenizer.gpt2(str(data_dir / "gpt2" / "gpt2.tiktoken"))
    torch.manual_seed(0)
    model = Transformer(preset("nano", vocab_size=tok.vocab_size, block_size=128)).eval()
    stats, ids = GenStats(), []
    pieces = list(stream_text(model, tok, "Hello", 100, SamplingParams(temperature=1.5), seed=0, stats=stats, ids_out=ids))
    assert "".join(pieces) == tok.decode(ids)
