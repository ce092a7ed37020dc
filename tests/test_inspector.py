"""The inspector: it never changes the model (outputs, config, weights, hooks), the lens ends at the
model's own distribution, attention maps are exact probability rows, exactly causal and what the
model multiplied V by (SDPA: to ~1e-6), traces are the library loop's tokens, errors, JSON."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minillm.checkpoint import load_model, save_model
from minillm.config import preset
from minillm.generate import make_generator, stream_tokens
from minillm.contrastive import contrastive_stream
from minillm.inspector import (Capture, head_scores, inspect_prompt, lens_logits, token_text, trace_contrastive,
                               trace_sampling, trace_speculative)
from minillm.inspector.cli import main
from minillm.kv_cache import KVCache
from minillm.speculative import speculative_stream
from minillm.model import Transformer
from minillm.sampling import SamplingParams
from minillm.tokenizer import CharTokenizer, check_same_tokenizer


ROOT = Path(__file__).resolve().parents[1]
CHARS = " \nabcdefghijklmnopqrstuvwxyzABCDE:.,!?'"
FAMILIES = {
    "gpt2": dict(family="gpt2"),
    "llama-gqa": dict(family="llama", n_kv_head=2),
    "llama-untied": dict(family="llama", n_kv_head=1, tie_embeddings=False),
}
PROMPT = "hello world:\nto be, or not!"


@pytest.fixture(scope="module")
def tok():
    t = CharTokenizer(CHARS)
    assert t.vocab_size == len(CHARS)
    return t


def make(name, attn_impl="manual", vocab=None):
    torch.manual_seed(0)
    cfg = preset("nano", vocab_size=vocab or len(CHARS), attn_impl=attn_impl, **FAMILIES[name])
    return Transformer(cfg).eval()


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
@pytest.mark.parametrize("name", FAMILIES)
def test_hooks_do_not_change_logits(name, attn_impl, tok):
    """The model runs its own attention (SDPA too) and is never changed: config, weights, hooks."""
    model = make(name, attn_impl)
    x = torch.tensor([tok.encode(PROMPT)])
    cfg, config_before = model.config, dataclasses.replace(model.config)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(x)[0]
    seen_impl = []
    probe = model.blocks[0].attn.register_forward_pre_hook(lambda m, a: seen_impl.append(m.cfg.attn_impl))
    rep = inspect_prompt(model, tok, PROMPT)
    probe.remove()
    assert seen_impl == [attn_impl]  # not switched while inspecting either
    assert model.config is cfg and model.config == config_before
    assert torch.equal(rep.logits, plain)  # bit for bit, whatever attn_impl
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    with torch.no_grad():  # and the model is untouched afterwards: no hooks left behind
        assert torch.equal(model(x)[0], plain)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
@pytest.mark.parametrize("name", FAMILIES)
def test_captured_attention_is_what_the_model_multiplied(name, attn_impl, tok):
    """o_proj(probs @ v) rebuilt from the captured maps equals the attention module's output: bit for
    bit on the written-out path, to ~1e-6 relative under SDPA (which never materialises the probabilities)."""
    model = make(name, attn_impl)
    x = torch.tensor([tok.encode(PROMPT)])
    seen = []
    hooks = [b.attn.register_forward_hook(lambda m, a, o: seen.append((m, a[0], o))) for b in model.blocks]
    with torch.no_grad(), Capture(model) as cap:
        model(x)
    for h in hooks:
        h.remove()
    cfg = model.config
    for (attn, inp, out), probs in zip(seen, cap.attention):
        B, T, _ = inp.shape
        v = attn.v_proj(inp).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = v.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
        y = (probs.type_as(v) @ v).transpose(1, 2).reshape(B, T, -1)
        if attn_impl == "manual":
            assert torch.equal(attn.o_proj(y), out)
        else:
            assert (attn.o_proj(y) - out).abs().max().item() <= 1e-6 * out.abs().max().item()  # relative


@pytest.mark.parametrize("name", FAMILIES)
def test_capture_with_a_kv_cache_reads_the_cached_keys(name, tok):
    """Prefill + one-token decode steps through a cache: each call's maps are the rows a whole-prompt
    capture gives at those positions (to ~1e-6: other matmul shapes)."""
    model = make(name, "sdpa")
    ids = tok.encode(PROMPT)
    with torch.no_grad(), Capture(model) as full:
        model(torch.tensor([ids]))
    cache = KVCache.for_model(model)
    with torch.no_grad(), Capture(model) as cached:
        model(torch.tensor([ids[:-2]]), cache, 0)
        model(torch.tensor([ids[-2:-1]]), cache, len(ids) - 2)
        model(torch.tensor([ids[-1:]]), cache, len(ids) - 1)
    L, T = model.config.n_layer, len(ids)
    for l in range(L):
        whole = full.attention[l][0]  # (nh, T, T)
        pre, d1, d2 = (cached.attention[l + i * L][0] for i in range(3))
        assert pre.shape[-2:] == (T - 2, T - 2) and d1.shape[-2:] == (1, T - 1) and d2.shape[-2:] == (1, T)
        assert (pre - whole[:, :T - 2, :T - 2]).abs().max().item() <= 1e-6
        assert (d1[:, 0] - whole[:, T - 2, :T - 1]).abs().max().item() <= 1e-6
        assert (d2[:, 0] - whole[:, T - 1]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", FAMILIES)
def test_logit_lens_last_layer_is_the_output_distribution(name, tok):
    model = make(name, "sdpa")
    x = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad(), Capture(model) as cap:
        out = model(x)
        lens = lens_logits(model, cap.residual[-1])
    assert len(cap.residual) == model.config.n_layer + 1  # embedding + every block
    assert torch.equal(lens.softmax(-1), out.softmax(-1))
    rep = inspect_prompt(model, tok, PROMPT)
    probs = rep.logits.softmax(-1)
    assert rep.lens["final_rank"][-1] == [1] * len(rep.ids)
    assert rep.lens["top_id"][-1] == rep.lens["final_id"] == probs.argmax(-1).tolist()
    assert rep.lens["final_p"][-1] == probs.max(-1).values.tolist()
    assert len(rep.lens["layers"]) == model.config.n_layer + 1


@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
@pytest.mark.parametrize("name", FAMILIES)
def test_attention_rows_sum_to_one_and_are_causal(name, attn_impl, tok):
    model = make(name, attn_impl)
    rep = inspect_prompt(model, tok, PROMPT)
    T, cfg = len(rep.ids), model.config
    assert len(rep.attention) == cfg.n_layer
    for a in rep.attention:
        assert a.shape == (cfg.n_head, T, T)
        assert (a.sum(-1) - 1).abs().max().item() <= 1e-6
        assert torch.all(torch.triu(a, diagonal=1) == 0)  # exactly zero above the diagonal
        assert torch.all(a >= 0)
    assert len(rep.heads) == cfg.n_layer * cfg.n_head


def test_prefill_numbers(tok):
    model = make("gpt2")
    rep = inspect_prompt(model, tok, PROMPT, top=3)
    ids = rep.ids
    ce = F.cross_entropy(rep.logits[:-1], torch.tensor(ids[1:]))  # nats per token
    assert rep.perplexity == pytest.approx(math.exp(ce.item()), rel=1e-5)
    assert len(rep.prefill) == len(ids) and rep.prefill[-1]["next"] is None
    for r in rep.prefill[:-1]:
        nx = r["next"]
        assert nx["surprisal_bits"] == pytest.approx(-math.log2(nx["p"]), rel=1e-5)
        assert len(r["top"]) == 3 and r["top"][0]["p"] >= r["top"][1]["p"] >= r["top"][2]["p"]
        assert (nx["rank"] == 1) == (nx["id"] == r["top"][0]["id"])
    assert inspect_prompt(model, tok, "a").perplexity is None  # one token: nothing predicted


def test_head_scores_on_known_patterns():
    T = 5
    prev = torch.zeros(T, T)
    prev[0, 0] = 1
    prev[torch.arange(1, T), torch.arange(0, T - 1)] = 1
    first = torch.zeros(T, T)
    first[:, 0] = 1
    uniform = torch.tril(torch.ones(T, T))
    uniform = uniform / uniform.sum(-1, keepdim=True)
    s = head_scores(torch.stack([prev, first, uniform]))
    assert s["prev_token"].tolist()[:2] == [1.0, 0.0] and s["first_token"].tolist()[:2] == [0.0, 1.0]
    assert s["entropy_bits"][:2].tolist() == [0.0, 0.0]
    want = sum(math.log2(i + 1) for i in range(1, T)) / (T - 1)
    assert s["entropy_bits"][2].item() == pytest.approx(want, rel=1e-6)


def test_prompt_longer_than_context_is_an_error(tok):
    model = make("llama-gqa", "sdpa")
    with pytest.raises(ValueError, match="context is 32"):
        inspect_prompt(model, tok, "a" * 33)
    assert len(inspect_prompt(model, tok, "a" * 32).ids) == 32  # exactly the context is fine
    with pytest.raises(ValueError, match="empty"):
        inspect_prompt(model, tok, "")
    assert model.config.attn_impl == "sdpa"


def test_capture_restores_on_error(tok):
    model = make("gpt2", "sdpa")
    with pytest.raises(IndexError), Capture(model):
        model(torch.tensor([[len(CHARS) + 5]]))  # id outside the embedding
    assert model.config.attn_impl == "sdpa" and not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("params", [SamplingParams(top_k=4), SamplingParams(temperature=0.8, top_p=0.5),
                                    SamplingParams(temperature=0)])
def test_trace_matches_generate(params, tok):
    model = make("llama-gqa", "sdpa")
    ids = tok.encode("to be")
    steps = trace_sampling(model, tok, ids, 12, params, seed=3)
    want = list(stream_tokens(model, ids, 12, params, make_generator(3, torch.device("cpu"))))
    assert [s["id"] for s in steps] == want
    for s in steps:
        assert s["p_sampler"] > 0 and s["p_model"] > 0
        assert s["id"] in [a["id"] for a in s["alternatives"]] or s["n_kept"] > 5
        if params.top_k:
            assert s["n_kept"] == 4 and sum(a["p_sampler"] for a in s["alternatives"]) == pytest.approx(1, rel=1e-5)
        if params.greedy:
            assert s["n_kept"] == 1 and s["p_sampler"] == 1.0
    with pytest.raises(ValueError, match="context"):
        trace_sampling(model, tok, ids, 40, params)


def test_token_text():
    t = CharTokenizer(" \nab\t")
    assert [token_text(t, i) for i in t.encode(" \n\tab")] == ["·", "\\n", "\\t", "a", "b"]
    assert token_text(t, 99) == "<id 99>"  # a padded vocabulary's unused id
    assert token_text(CharTokenizer("abcdefghij"), 0, width=3) == "a"


def test_cli_json_and_pngs(tmp_path, tok, capsys):
    model = make("llama-gqa", "sdpa", vocab=len(CHARS) + 3)  # padded vocab: ids the tokenizer lacks
    path = tmp_path / "tiny.safetensors"
    save_model(path, model, tok, {"source": "test"})
    out, js = tmp_path / "png", tmp_path / "r.json"
    main(["--model", str(path), "--prompt", "to be,\\nor not", "--out", str(out), "--json", str(js),
          "--generate", "4", "--top-k", "5", "--top", "3", "--layers", "all"])
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "logit lens" in printed and "sampling trace" in printed
    d = json.loads(js.read_text())
    for key in ("info", "ids", "tokens", "prefill", "perplexity", "mean_surprisal_bits", "logit_lens", "heads",
                "attention", "trace"):
        assert key in d, key
    T = len(d["ids"])
    assert d["tokens"][6] == "\\n" and T == 13  # the \n escape became a newline token
    assert set(d["prefill"][0]) == {"pos", "id", "token", "top", "next"} and len(d["prefill"][0]["top"]) == 3
    assert set(d["logit_lens"]) >= {"layers", "top_token", "top_p", "final_rank", "final_p"}
    assert len(d["attention"]) == 2 and len(d["attention"][0]) == 4 and len(d["attention"][0][0]) == T
    assert set(d["heads"][0]) == {"layer", "head", "entropy_bits", "prev_token", "first_token"}
    assert len(d["trace"]) == 4 and d["trace"][0]["n_kept"] == 5
    # sample.py's defaults (temperature 0.8, seed 1337): the trace is the tokens sample.py would print
    want = list(stream_tokens(model, d["ids"], 4, SamplingParams(0.8, top_k=5), make_generator(1337, torch.device("cpu"))))
    assert [s["id"] for s in d["trace"]] == want and d["trace_stats"]["new_tokens"] == 4
    names = {p.name for p in out.iterdir()}
    assert names == {"logit_lens.png", "attn_layer00.png", "attn_layer01.png", "attn_overview.png", "head_scores.png"}


def test_the_command_is_python_m_minillm_inspector():
    """A package named after no standard-library module; the old minillm.inspect is gone."""
    with pytest.raises(ModuleNotFoundError):
        __import__("minillm.inspect")
    r = subprocess.run([sys.executable, "-m", "minillm.inspector", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--prompt" in r.stdout and "--amateur-context" in r.stdout and not r.stderr


def sharpened(name, seed, scale):
    torch.manual_seed(seed)
    cfg = preset("nano", vocab_size=len(CHARS), **FAMILIES[name])
    m = Transformer(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(scale)
    return m


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=6),
                                    SamplingParams(temperature=0)])
def test_speculative_trace_agrees_with_stats(params, tok):
    """Acceptances counted in the trace == the loop's count; the trace's tokens == speculative_stream's."""
    target, draft = sharpened("llama-gqa", 0, 6), sharpened("gpt2", 1, 6)  # different families, same tokenizer
    ids = tok.encode("to be")
    for adaptive in (False, True):
        steps, stats = trace_speculative(target, draft, tok, ids, 20, 3, params, seed=5, adaptive_k=adaptive)
        verdicts = [d["verdict"] for s in steps for d in s["drafts"]]
        assert verdicts.count("accepted") == sum(s["n_accepted"] for s in steps) == stats.drafts_accepted
        assert len(verdicts) == stats.drafts_proposed and len(steps) == stats.calls["target"]
        assert verdicts.count("rejected") == sum(s["last"]["kind"] == "residual" for s in steps)
        for s in steps:
            for d in s["drafts"]:
                if d["verdict"] != "not checked":  # the verdict follows from the numbers shown
                    assert (d["verdict"] == "accepted") == (d["u"] * d["q_draft"] < d["p_target"])
            assert s["last"]["kind"] in ("residual", "bonus") and s["last"]["p"] > 0
        want = list(speculative_stream(target, draft, ids, 20, 3, params, torch.Generator().manual_seed(5),
                                       adaptive_k=adaptive))
        assert [e["id"] for s in steps for e in s["emitted"]] == want
        if params.greedy:
            assert want == list(stream_tokens(target, ids, 20, params))
    assert 0 < stats.drafts_accepted < stats.drafts_proposed or params.greedy  # both verdicts shown


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=4)])
def test_contrastive_trace_chosen_is_emitted_and_in_head(params, tok):
    expert, amateur = sharpened("llama-untied", 0, 30), sharpened("llama-untied", 1, 30)
    ids = tok.encode("to be")
    steps, stats = trace_contrastive(expert, amateur, tok, ids, 16, alpha=0.05, beta=1.0, params=params, seed=2,
                                     max_head=len(CHARS))
    want = list(contrastive_stream(expert, amateur, ids, 16, 0.05, 1.0, params=params,
                                   generator=torch.Generator().manual_seed(2)))
    assert [s["id"] for s in steps] == want
    for s in steps:
        head_ids = [h["id"] for h in s["head"]]
        assert s["in_head"] and s["id"] in head_ids and len(head_ids) == s["head_size"] >= 1
        assert s["head"][0]["score"] == 0 and all(h["score"] <= 0 for h in s["head"])
        if params.greedy:
            assert s["id"] == s["head"][0]["id"]
        assert s["changed"] == (s["id"] != s["expert"]["id"])
    assert [s["head_size"] for s in steps] == stats.head_sizes
    assert sum(s["changed"] for s in steps) == stats.differs_from_expert


def test_cli_prompt_lookup_trace(tmp_path, tok, capsys):
    """--method speculative --draft-lookup: the speculative trace with no draft model; greedy, it emits the
    model's greedy tokens, each draft one-hot (q_draft 1)."""
    tp, js = tmp_path / "t.safetensors", tmp_path / "s.json"
    save_model(tp, sharpened("llama-gqa", 0, 6), tok)
    prompt = "to be, or not to be"  # the nano preset reads 32 positions
    main(["--model", str(tp), "--prompt", prompt, "--no-attention", "--generate", "12", "--method", "speculative",
          "--draft-lookup", "--lookup-ngram", "3", "--k", "4", "--temperature", "0", "--json", str(js)])
    out = capsys.readouterr().out
    assert "speculative trace (draft prompt lookup, n <= 3, k=4" in out and "acceptance histogram" in out
    d = json.loads(js.read_text())
    drafts = [x for s in d["trace"] for x in s["drafts"]]
    assert drafts and all(x["q_draft"] == 1.0 for x in drafts)
    assert sum(x["verdict"] == "accepted" for x in drafts) == d["trace_stats"]["drafts_accepted"]
    assert d["trace_stats"]["calls"]["lookup"] == d["trace_stats"]["target_calls"] == len(d["trace"])
    greedy = stream_tokens(load_model(tp).model, tok.encode(prompt), 12, SamplingParams(temperature=0))
    assert [e["id"] for s in d["trace"] for e in s["emitted"]] == list(greedy)


def test_cli_speculative_and_contrastive_traces(tmp_path, tok, capsys):
    tp, dp, bad = tmp_path / "t.safetensors", tmp_path / "d.safetensors", tmp_path / "bad.safetensors"
    save_model(tp, sharpened("llama-gqa", 0, 6), tok)
    save_model(dp, sharpened("gpt2", 1, 6), tok)
    save_model(bad, make("gpt2"), CharTokenizer(CHARS.replace("?", "#")))  # same size, another alphabet
    js = tmp_path / "s.json"
    main(["--model", str(tp), "--prompt", "to be", "--no-attention", "--generate", "12", "--method", "speculative",
          "--draft", str(dp), "--k", "3", "--json", str(js)])
    out = capsys.readouterr().out
    assert "speculative trace" in out and "p_target" in out and "acceptance histogram" in out
    d = json.loads(js.read_text())
    assert d["trace_method"] == "speculative"
    assert sum(x["verdict"] == "accepted" for s in d["trace"] for x in s["drafts"]) == d["trace_stats"]["drafts_accepted"]
    main(["--model", str(tp), "--prompt", "to be", "--no-attention", "--generate", "8", "--method", "contrastive",
          "--amateur", str(dp), "--alpha", "0.05", "--json", str(js)])
    out = capsys.readouterr().out
    assert "contrastive trace" in out and "V_head" in out and "mean |V_head|" in out
    d = json.loads(js.read_text())
    assert d["trace_method"] == "contrastive" and len(d["trace"]) == 8 and all(s["in_head"] for s in d["trace"])
    with pytest.raises(ValueError, match="different tokenizers"):
        main(["--model", str(tp), "--prompt", "to be", "--generate", "4", "--method", "speculative", "--draft", str(bad)])
    with pytest.raises(SystemExit):
        main(["--model", str(tp), "--prompt", "to be", "--generate", "4", "--method", "contrastive"])
    assert "--method contrastive needs --amateur" in capsys.readouterr().err  # the flags are named
    check_same_tokenizer(tok, CharTokenizer(CHARS))  # equal tokenizers pass
