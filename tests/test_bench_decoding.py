"""The pieces behind bench/decoding.py, bench/speculative.py and bench/decode.py: text metrics on
hand-worked examples, the truncated-layer draft against the full model's own hidden state (logit
lens), and each bench's measuring function on tiny random models (through the decoding core)."""

import math

import pytest
import torch

from bench import decode as decode_bench
from bench import decoding as decoding_bench
from bench import speculative as speculative_bench
from bench import truncate_layers
from minillm import checkpoint
from minillm.config import preset
from minillm.eval import text_metrics as tm
from minillm.model import Transformer
from minillm.speed import speed_up
from minillm.tokenizer import CharTokenizer
from tiny import tiny_model

CORPUS = ["a b a b", "a c"]


def test_ngram_entropy_by_hand():
    assert tm.ngram_entropy(["a b a b"], 1) == pytest.approx(1.0)  # a, b: 1/2 each
    # bigrams (a b), (b a), (a b): 2/3, 1/3
    assert tm.ngram_entropy(["a b a b"], 2) == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    # pooled over the corpus: a a a b b c -> 1/2, 1/3, 1/6
    assert tm.ngram_entropy(CORPUS, 1) == pytest.approx(-sum(p * math.log2(p) for p in (1 / 2, 1 / 3, 1 / 6)))


def test_distinct_n_is_corpus_distinct_over_all_ngrams():
    assert tm.distinct_n(CORPUS, 1) == pytest.approx(3 / 6)  # {a, b, c} of a b a b a c
    assert tm.distinct_n(CORPUS, 2) == pytest.approx(3 / 4)  # {ab, ba, ac} of ab ba ab ac
    assert tm.distinct_n(["x y z"], 3) == 1.0


def test_rep_n_counts_repeats_within_each_text():
    # text 1: 2 unique of 3 bigrams; text 2: 1 of 1 -> 100 * (1 - 3/4)
    assert tm.rep_n(CORPUS, 2) == pytest.approx(25.0)
    # the same sentence in two texts is not a repeat for rep-n, but lowers distinct-n
    assert tm.rep_n(["p q r", "p q r"], 2) == 0.0
    assert tm.distinct_n(["p q r", "p q r"], 2) == pytest.approx(0.5)
    # a loop: "u v u v u v" has bigrams uv vu uv vu uv: 2 unique of 5
    assert tm.rep_n(["u v u v u v"], 2) == pytest.approx(60.0)


def test_metrics_on_too_short_text_are_nan_and_bad_n_raises():
    assert math.isnan(tm.distinct_n(["one"], 2))
    assert math.isnan(tm.rep_n([""], 2))
    assert math.isnan(tm.ngram_entropy([], 1))
    with pytest.raises(ValueError, match="n must be >= 1"):
        tm.ngrams(["a"], 0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_truncated_model_is_the_logit_lens_of_the_full_model(tmp_path, family):
    torch.manual_seed(0)
    tok = CharTokenizer.from_text("abcdefghij ")
    full = Transformer(preset("nano", family=family, n_layer=3, vocab_size=tok.vocab_size)).eval()
    src = tmp_path / "full.safetensors"
    checkpoint.save_model(src, full, tok, {"source": "test"})
    out = tmp_path / "first2.safetensors"
    assert truncate_layers.main([str(src), "--layers", "2", "--out", str(out)]) == 0

    cut = checkpoint.load_model(out)
    assert cut.config.n_layer == 2 and cut.provenance["kept_layers"] == "0..1 of 3"
    x = torch.randint(0, tok.vocab_size, (2, 9))
    seen = {}
    full.blocks[1].register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
    with torch.no_grad():
        full(x)
        lens = full.lm_head(full.norm(seen["h"]))  # read the full model after its 2nd layer
        torch.testing.assert_close(cut.model(x), lens, rtol=0, atol=1e-5)


def test_truncate_rejects_a_layer_count_out_of_range():
    model = Transformer(preset("nano", n_layer=2))
    with pytest.raises(ValueError, match=r"--layers must be in 1..2"):
        truncate_layers.truncate(model, 3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_keep_skips_middle_layers_exactly(tmp_path, family):
    """--keep 0,2 of 3 layers == the full model with block 1 replaced by the identity (the residual
    stream passes through untouched), from the saved file and in memory with a KV cache."""
    from minillm.kv_cache import KVCache
    torch.manual_seed(1)
    tok = CharTokenizer.from_text("abcdefghij ")
    full = Transformer(preset("nano", family=family, n_layer=3, vocab_size=tok.vocab_size)).eval()
    src, out = tmp_path / "full.safetensors", tmp_path / "skip.safetensors"
    checkpoint.save_model(src, full, tok, {"source": "test"})
    assert truncate_layers.main([str(src), "--keep", "0,2", "--out", str(out)]) == 0
    x = torch.randint(0, tok.vocab_size, (1, 10))
    with torch.no_grad():
        cut = checkpoint.load_model(out).model
        got = cut(x)
        full.blocks[1].forward = lambda h, *args: h  # skip layer 1
        want = full(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # in memory: the kept blocks write KV-cache slots 0 and 1, not 0 and 2
        mem = truncate_layers.keep_blocks(checkpoint.load_model(src).model, [0, 2])
        cache = KVCache.for_model(mem, 1, 10)
        stepwise = torch.cat([mem(x[:, :6], cache, 0)] + [mem(x[:, t:t + 1], cache, t) for t in range(6, 10)], 1)
        torch.testing.assert_close(stepwise, want, rtol=0, atol=1e-5)


def test_parse_keep_reads_ranges_and_rejects_bad_ones():
    assert truncate_layers.parse_keep("0-3,26-29", 30) == [0, 1, 2, 3, 26, 27, 28, 29]
    assert truncate_layers.parse_keep("5", 30) == [5]
    for bad in ("3-1", "0-3,2-5", "28-30", "x"):
        with pytest.raises(ValueError, match="--keep"):
            truncate_layers.parse_keep(bad, 30)


SHAPE = dict(vocab_size=11, block_size=64)  # the benches' tiny models (tests/tiny.py), sped up as the benches run them


def test_decode_bench_times_both_ways_through_the_core_and_they_agree():
    """bench/decode.py: the cached way and NoCache (full recompute each step) pick the greedy ids
    that a hand-written full-recompute loop picks, and each reports the time of its n steps."""
    model, prompt, n = speed_up(tiny_model(n_layer=2, **SHAPE)), [1, 2, 3, 4, 5], 6
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n + 1):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], 1)
    want = seq[0, len(prompt) + 1:].tolist()  # the n tokens after the first
    for way in (model, decode_bench.NoCache(model)):
        ids, seconds = decode_bench.decode(way, prompt, n)
        assert ids == want and seconds > 0


def test_speculative_bench_measure_is_exact_at_temperature_0():
    target, draft = speed_up(tiny_model(n_layer=2, **SHAPE)), speed_up(tiny_model(seed=1, n_layer=1, **SHAPE))
    row = speculative_bench.measure(target, draft, [[1, 2, 3], [4, 5]], n=6, k=2, temperature=0)
    assert row.identical is True
    assert row.stats.new_tokens == 12 and row.stats.calls["target"] >= 4 and row.stats.calls["draft"] > 0
    assert row.plain_s > 0 and row.spec_s > 0


def test_speculative_bench_measures_the_exact_mode_and_prompt_lookup():
    """--batch-invariant: plain both ways, speculative in the mode, the target left as it was; --draft lookup."""
    target = speed_up(tiny_model(n_layer=2, **SHAPE).bfloat16())
    row = speculative_bench.measure(target, None, [[1, 2, 3, 1, 2], [4, 5, 4]], n=8, k=3, temperature=0,
                                    lookup=True, exact_rows=4)
    assert row.identical is True and row.identical_to_default is not None and row.exact_s > 0
    assert row.stats.calls["target"] >= 4 and "draft" not in row.stats.calls
    assert not any(type(m).__name__ in ("BlockedLinear", "OneQueryAttention") for m in target.modules())


@pytest.mark.parametrize("name", list(decoding_bench.SETTINGS))
def test_decoding_bench_runs_every_setting(name):
    """bench/decoding.py: each setting runs through methods.stream for the full length (EOS never
    stops it); contrastive settings record a V_head size per token."""
    expert, amateur = speed_up(tiny_model(n_layer=2, **SHAPE)), speed_up(tiny_model(seed=1, n_layer=1, **SHAPE))
    tok = CharTokenizer.from_text("abcdefghij ")
    setting = decoding_bench.SETTINGS[name]
    run = decoding_bench.run_method(setting, expert, amateur, tok, ["abc", "j a"], 5, seed=0)
    assert run.n_tokens == 10 and len(run.texts) == 2 and math.isfinite(run.nll)
    assert len(run.head_sizes) == (10 if setting.method.name == "contrastive" else 0)
