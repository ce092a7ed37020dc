"""The decoding loop: cache vs recompute, seeds, EOS sets, stop strings (split across tokens, never
streamed), exact max_new_tokens, batches of unequal prompts == each row alone, history processors, context."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.generate import (Stats, StopScanner, decode_stream, generate, generate_batch, make_generator,
                              stream_batch, stream_text, stream_tokens)
from minillm.kv_cache import KVCache
from minillm.sampling import SamplingParams
from minillm.tokenizer import BPETokenizer, CharTokenizer
from tiny import lively, tiny_model

TEXT = "ROMEO:\nWhat light through yonder window breaks?\nJULIET:\nAy me!\n"
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def char_model(request):
    tok = CharTokenizer.from_text(TEXT)
    return lively(tiny_model(request.param, vocab_size=tok.vocab_size, tie_embeddings=False)), tok


def test_greedy_with_cache_equals_full_recompute(char_model):
    model, tok = char_model
    prompt = tok.encode("ROMEO:")
    got = list(stream_tokens(model, prompt, 20, GREEDY))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_penalised_greedy_equals_a_hand_written_loop(char_model):
    """History processors see prompt + generated: a no-cache loop applying the formulas by hand."""
    model, tok = char_model
    prompt = tok.encode("Ay me")
    params = SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.3, no_repeat_ngram_size=2)
    got = list(stream_tokens(model, prompt, 20, params))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            z = model(torch.tensor([ids]))[0, -1].clone()
            for v in set(ids):
                z[v] = z[v] / 1.5 if z[v] > 0 else z[v] * 1.5
                z[v] -= 0.3 * ids.count(v)
            for i in range(len(ids) - 1):
                if ids[i] == ids[-1]:
                    z[ids[i + 1]] = float("-inf")
            ids.append(int(z.argmax()))
    assert got == ids[len(prompt):]


def test_no_repeat_ngram_output_never_repeats_an_ngram(char_model):
    model, tok = char_model
    plain = list(stream_tokens(model, tok.encode("Ay"), 25, GREEDY))
    for n in (2, 3):
        seq = tok.encode("Ay") + list(stream_tokens(model, tok.encode("Ay"), 25,
                                                    SamplingParams(temperature=0, no_repeat_ngram_size=n)))
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        assert len(grams) == len(set(grams))
    seq = tok.encode("Ay") + plain  # an untrained model repeats itself: the ban had work to do
    assert len({tuple(seq[i:i + 2]) for i in range(len(seq) - 1)}) < len(seq) - 1


def test_same_seed_same_text_global_rng_untouched(char_model):
    model, tok = char_model
    params = SamplingParams(temperature=1.0, top_k=10, repetition_penalty=1.1)
    state = torch.get_rng_state()
    a = generate(model, tok, "JULIET:", 25, params, seed=3)
    b = generate(model, tok, "JULIET:", 25, params, seed=3)
    c = generate(model, tok, "JULIET:", 25, params, seed=4)
    d = generate(model, tok, "JULIET:", 25, params, generator=torch.Generator().manual_seed(3))
    assert a.text == b.text == d.text and a.ids == b.ids and a.ids != c.ids
    assert torch.equal(torch.get_rng_state(), state)
    assert a.stats.new_tokens == 25 and a.stats.stopped_by == "max_new_tokens" and len(a.ids) == 25
    with pytest.raises(ValueError, match="give seed or generator, not both"):
        generate(model, tok, "JULIET:", 5, params, seed=1, generator=torch.Generator())


def test_stream_pieces_join_to_generate_text(char_model):
    model, tok = char_model
    params = SamplingParams(temperature=0.9)
    pieces = list(stream_text(model, tok, "ROMEO:", 15, params, seed=1))
    assert len(pieces) == 15 and "".join(pieces) == generate(model, tok, "ROMEO:", 15, params, seed=1).text


@pytest.mark.parametrize("n", [0, 1, 7, 26])
def test_max_new_tokens_is_exact(char_model, n):
    model, tok = char_model
    res = generate(model, tok, "ROMEO:", n, SamplingParams(temperature=1.5), seed=0)
    assert len(res.ids) == n == res.stats.new_tokens and len(res.text) == n


def test_eos_set_stops_at_the_first_of_any_and_is_not_emitted(char_model):
    model, tok = char_model
    greedy = list(stream_tokens(model, tok.encode("Ay"), 12, GREEDY))
    a, b = greedy[5], greedy[3]
    first = min(greedy.index(a), greedy.index(b))
    stats = Stats()
    out = list(stream_tokens(model, tok.encode("Ay"), 12, GREEDY, eos_ids={a, b}, stats=stats))
    assert out == greedy[:first] and stats.stopped_by == "eos" and stats.new_tokens == first
    res = generate(model, tok, "Ay", 12, GREEDY, eos_ids={a, b})
    assert res.ids == greedy[:first] and res.text == tok.decode(greedy[:first])


# ----------------------------------------------------------------------------- stop strings

@pytest.mark.parametrize("pieces, stop, want", [
    (["st", "op"], "stop", ""),
    (["sto", "pper"], "stop", ""),
    (["las", "topper"], "stop", "la"),
    (["a s", "t", "o", "p", "x"], "stop", "a "),
    (["ab", "c st", "ill"], "stop", "abc still"),  # "st" held back, then released
    (["xx", "s"], "stop", "xxs"),  # held back until the end, then flushed
])
def test_stop_string_split_across_pieces(pieces, stop, want):
    scanner = StopScanner([stop])
    out = "".join(scanner.feed(p) for p in pieces) + (scanner.flush() if not scanner.stopped else "")
    assert out == want


def test_earliest_of_several_stop_strings_wins():
    scanner = StopScanner(["world", "lo w"])
    assert scanner.feed("hello world") == "hel" and scanner.stopped
    assert scanner.feed("more") == ""


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="abc ", max_size=30), stops=st.lists(st.text(alphabet="abc ", min_size=1, max_size=4),
                                                                  min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_stop_scanner_property(text, stops, cuts):
    """However the text is cut into pieces: the output is the text up to the first stop string, and
    every intermediate output is a prefix of it (nothing streamed is ever taken back). The first stop
    string is the one that ends first (generation stops there): with stops "b" and "aba", "aba" stops
    at "a"."""
    hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in stops) if i >= 0]
    want = text[:min(hits)[1]] if hits else text
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    scanner, shown = StopScanner(stops), ""
    for a, b in zip(bounds, bounds[1:]):
        shown += scanner.feed(text[a:b])
        assert want.startswith(shown)
    shown += scanner.flush()
    assert shown == want and scanner.stopped == bool(hits)


def test_the_stop_string_that_ends_first_wins_however_the_text_is_cut():
    for pieces in (["aba"], ["ab", "a"], ["a", "b", "a"]):
        scanner = StopScanner(["b", "aba"])
        assert "".join(scanner.feed(p) for p in pieces) + scanner.flush() == "a" and scanner.stopped


def test_stop_string_in_real_generation_is_trimmed_and_never_streamed(char_model):
    model, tok = char_model
    full = generate(model, tok, "ROMEO:", 25, GREEDY).text
    stop = full[10:13]
    cut = full.find(stop)
    stats = Stats()
    pieces = list(stream_text(model, tok, "ROMEO:", 25, GREEDY, stop=[stop], stats=stats))
    assert "".join(pieces) == full[:cut] and stats.stopped_by == "stop"
    res = generate(model, tok, "ROMEO:", 25, GREEDY, stop=["\u2603", stop])  # a stop that never occurs, too
    assert res.text == full[:cut] and len(res.ids) == cut + len(stop)  # ids run up to the completing token


def test_stop_string_across_bpe_tokens(data_dir):
    """GPT-2 BPE: pick a stop string that straddles a token boundary of the greedy output."""
    tok = BPETokenizer.gpt2(str(data_dir / "gpt2" / "gpt2.tiktoken"))
    model = tiny_model("gpt2", vocab_size=tok.vocab_size, block_size=64)
    ids = generate(model, tok, "Hello", 30, GREEDY).ids
    texts = [tok.decode([i]) for i in ids]
    j = next(j for j in range(1, len(ids)) if len(texts[j - 1]) >= 2 and len(texts[j]) >= 2)
    before = "".join(texts[:j - 1])
    stop = texts[j - 1][-2:] + texts[j][:2]
    assert stop not in before + texts[j - 1]  # the stop is only complete once token j arrives
    res = generate(model, tok, "Hello", 30, GREEDY, stop=[stop])
    full = tok.decode(ids)
    assert res.text == full[:full.find(stop)] and res.stats.stopped_by == "stop" and len(res.ids) <= j + 1


def test_decode_stream_closes_the_loop_at_a_stop():
    class Stats:
        stopped_by = ""
    tok = CharTokenizer.from_text(TEXT)
    fed = []

    def tokens():
        for c in "Ay me! What light":
            fed.append(c)
            yield tok.encode(c)[0]
    stats = Stats()
    assert "".join(decode_stream(tok, tokens(), ["me!"], stats)) == "Ay " and stats.stopped_by == "stop"
    assert "".join(fed) == "Ay me!"  # nothing decoded past the stop


def test_bad_stop_strings(char_model):
    model, tok = char_model
    with pytest.raises(ValueError, match="stop strings must be non-empty strings, got ''"):
        generate(model, tok, "Ay", 5, stop=[""])


# ----------------------------------------------------------------------------- batches

PROMPTS = ["ROMEO:\nWhat", "Ay", "JULIET:\n", "w"]


def batch_models():
    out = []
    tok = CharTokenizer.from_text(TEXT)
    for family in ("gpt2", "llama"):
        for impl in ("manual", "sdpa"):
            out.append(lively(tiny_model(family, 1, vocab_size=tok.vocab_size, attn_impl=impl, tie_embeddings=False)))
    return out, tok


@pytest.fixture(scope="module")
def batch_setup():
    return batch_models()


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=0, repetition_penalty=1.3,
                                                           presence_penalty=0.2, no_repeat_ngram_size=3)])
def test_batch_rows_equal_their_batch_one_output(batch_setup, params):
    models, tok = batch_setup
    for model in models:
        batch = generate_batch(model, tok, PROMPTS, 20, params)
        for prompt, got in zip(PROMPTS, batch):
            alone = generate(model, tok, prompt, 20, params)
            assert got.ids == alone.ids and got.text == alone.text
            assert got.stats.prompt_tokens == len(prompt) and got.stats.stopped_by == "max_new_tokens"


def test_batch_rows_stop_independently(batch_setup):
    """EOS in one row and a stop string in another: each row equals its own batch-1 run, finished rows
    never change, and the others run on to max_new_tokens."""
    models, tok = batch_setup
    model = models[0]
    alone = [generate(model, tok, p, 20, GREEDY) for p in PROMPTS]
    eos = alone[0].ids[4]
    stop = alone[1].text[6:9]
    batch = generate_batch(model, tok, PROMPTS, 20, GREEDY, eos_ids={eos}, stop=[stop])
    for prompt, got in zip(PROMPTS, batch):
        want = generate(model, tok, prompt, 20, GREEDY, eos_ids={eos}, stop=[stop])
        assert (got.ids, got.text, got.stats.stopped_by) == (want.ids, want.text, want.stats.stopped_by)
        assert got.stats.new_tokens == len(got.ids)
    assert batch[0].stats.stopped_by == "eos" and batch[1].stats.stopped_by == "stop"
    steps = list(stream_batch(model, [tok.encode(p) for p in PROMPTS], 20, GREEDY, eos_ids={eos}))
    col = [s[0] for s in steps]
    new = [i for i, t in enumerate(col) if t is not None]  # row 0's new tokens: a run, then EOS ends it
    assert len(new) == 4 and new == list(range(new[0], new[0] + 4))
    assert all(t is None for t in col[new[-1] + 1:])  # once stopped, always None


def test_batch_sampling_is_seeded(batch_setup):
    models, tok = batch_setup
    params = SamplingParams(temperature=1.2, top_p=0.95)
    a = generate_batch(models[1], tok, PROMPTS, 15, params, seed=7)
    b = generate_batch(models[1], tok, PROMPTS, 15, params, seed=7)
    c = generate_batch(models[1], tok, PROMPTS, 15, params, seed=8)
    assert [g.ids for g in a] == [g.ids for g in b] != [g.ids for g in c]


def test_batch_errors(batch_setup):
    models, tok = batch_setup
    with pytest.raises(ValueError, match=r"the prompt \(row 1\) is empty"):
        list(stream_batch(models[0], [[1, 2], []], 5))
    with pytest.raises(ValueError, match=r"the longest prompt is 40 tokens; the model's context is 32"):
        list(stream_batch(models[0], [[1] * 40, [2]], 5))
    with pytest.raises(ValueError, match=r"a sliding window needs prompts of equal length, got lengths \[1, 2\]"):
        list(stream_batch(models[0], [[1, 2], [2]], 5, sliding_window=True))
    with pytest.raises(ValueError, match="continuing a cache works with one prompt"):
        list(stream_batch(models[0], [[1], [2]], 5, cache=KVCache.for_model(models[0], 2)))


# ----------------------------------------------------------------------------- context and misc

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
    res = generate(model, tok, (TEXT * 2)[:40], 60, GREEDY, sliding_window=True)
    assert len(res.ids) == 60


def test_unknown_character_in_prompt(char_model):
    model, tok = char_model
    with pytest.raises(ValueError, match="'Z'"):
        generate(model, tok, "ZORRO", 5)


def test_make_generator_is_per_call():
    assert make_generator(None, torch.device("cpu")) is None
    a, b = make_generator(5, torch.device("cpu")), make_generator(5, torch.device("cpu"))
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


def test_bpe_stream_never_breaks_utf8(data_dir):
    """A random GPT-2-vocab model emits arbitrary byte tokens; streamed text must equal the full decode."""
    tok = BPETokenizer.gpt2(str(data_dir / "gpt2" / "gpt2.tiktoken"))
    model = tiny_model("gpt2", vocab_size=tok.vocab_size, block_size=128)
    stats, ids = Stats(), []
    pieces = list(stream_text(model, tok, "Hello", 100, SamplingParams(temperature=1.5), seed=0, stats=stats, ids_out=ids))
    assert "".join(pieces) == tok.decode(ids)
