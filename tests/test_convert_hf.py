"""Hugging Face -> minillm: tiny random GPT-2 / LLaMA / Mistral / Qwen2 / Qwen3 models saved with
save_pretrained, converted, and compared with transformers (logits with and without our KV cache, greedy
generation), plus the tokenizer paths and every bad input we promise a clear error for."""

import json
import os
import shutil
import sys
import unicodedata

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minillm.checkpoint import load_model  # noqa: E402
from minillm.convert import LLAMA3_PAT, ConvertError, convert  # noqa: E402
from minillm.convert.__main__ import main as convert_main  # noqa: E402
from minillm.convert.hf import config_from_hf  # noqa: E402
from minillm.convert.vocab import QWEN2_PAT  # noqa: E402
from minillm.export import export_hf, hf_tokenizer_files  # noqa: E402
from minillm.kv_cache import KVCache  # noqa: E402
from minillm.tokenizer import BPETokenizer, bytes_to_token, merges_from_ranks  # noqa: E402

TOL = 1e-4  # fp32; observed max |diff| ~1e-6 on these models

LLAMA_CASES = {
    "llama-gqa-tied-theta1e4": dict(tie_word_embeddings=True, rope_theta=10000.0),
    "llama-gqa-untied-theta5e5": dict(tie_word_embeddings=False, rope_theta=500000.0),
    "llama-gqa-untied-llama3-scaling": dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    # the same family under other names: (HF class, its own config keys)
    "mistral-head_dim32": dict(arch="mistral", head_dim=32, sliding_window=None, tie_word_embeddings=False),
    "qwen2-untied-qkv_bias": dict(arch="qwen2", tie_word_embeddings=False, rope_theta=1e6),
    "qwen3-qk_norm-head_dim32": dict(arch="qwen3", head_dim=32, tie_word_embeddings=False, rope_theta=1e6),
}
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
GPT2_CASES = {"gpt2-tied": dict(tie_word_embeddings=True), "gpt2-untied": dict(tie_word_embeddings=False)}


# ----------------------------------------------------------------------------- tiny HF checkpoints

def write_gpt2_tokenizer(d, ranks):
    """vocab.json + merges.txt as GPT-2 ships them (printable byte alphabet), with <|endoftext|> last."""
    vocab = {bytes_to_token(b): r for b, r in ranks.items()}
    vocab["<|endoftext|>"] = len(ranks)
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = [f"{bytes_to_token(a)} {bytes_to_token(b)}" for a, b in merges_from_ranks(ranks)]
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def llama3_style_tokenizer(ranks) -> BPETokenizer:
    n = len(ranks)
    return BPETokenizer("tiny-llama3", LLAMA3_PAT, ranks, {"<|begin_of_text|>": n, "<|end_of_text|>": n + 1},
                        bos_token="<|begin_of_text|>", eos_tokens=["<|end_of_text|>"], add_bos=True,
                        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")


def write_llama3_tokenizer(d, ranks):
    """tokenizer.json (Split(Llama-3 regex) + ByteLevel, BOS added by the post-processor) + tokenizer_config.json."""
    for name, content in hf_tokenizer_files(llama3_style_tokenizer(ranks), 128).items():
        (d / name).write_text(json.dumps(content), encoding="utf-8")


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_qwen2_tokenizer(d, ranks):
    """As Qwen2.5-Instruct ships it: NFC normalizer, Split(Qwen2 regex: single digits) + ByteLevel, no BOS,
    ChatML; tokenizer_config's eos <|im_end|>, generation_config's stop ids <|im_end|> and <|endoftext|>."""
    n = len(ranks)
    tok = BPETokenizer("tiny-qwen2", QWEN2_PAT, ranks, {"<|endoftext|>": n, "<|im_start|>": n + 1, "<|im_end|>": n + 2},
                       eos_tokens=["<|im_end|>"], chat_template=CHATML, normalize="NFC")
    for name, content in hf_tokenizer_files(tok, 128).items():
        (d / name).write_text(json.dumps(content), encoding="utf-8")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [n + 2, n]}), encoding="utf-8")


def make_hf(family, case, d, ranks, seed=0):
    """A tiny random model of `family` ("gpt2", or "llama" with case["arch"] naming the HF class), its
    1-D parameters (norm gains, biases) randomized too, saved with its tokenizer into d."""
    torch.manual_seed(seed)
    case = dict(case)
    arch = case.pop("arch", "llama")
    V = len(ranks) + 2 + (arch == "qwen2")
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      initializer_range=0.1, bos_token_id=V - 2, eos_token_id=V - 2, **case)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        config_class, model_class = (getattr(transformers, c) for c in HF_CLASSES[arch])
        cfg = config_class(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=V - 2, eos_token_id=V - 1, **case)
        model = model_class(cfg)
    with torch.no_grad():  # HF initializes norms to 1 and biases to 0: a swapped or dropped one would not show
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    model.save_pretrained(d)
    writer = {"gpt2": write_gpt2_tokenizer, "qwen2": write_qwen2_tokenizer}.get(family if family == "gpt2" else arch)
    (writer or write_llama3_tokenizer)(d, ranks)
    return model


def greedy_ours(model, prompt, n):
    """Prefill the prompt into a KV cache, then one token at a time, always the argmax."""
    cache = KVCache.for_model(model, max_len=len(prompt) + n)
    logits = model(torch.tensor([prompt]), cache=cache, start_pos=0, last_only=True)
    out, pos = [], len(prompt)
    for _ in range(n):
        t = int(logits[0, -1].argmax())
        out.append(t)
        logits = model(torch.tensor([[t]]), cache=cache, start_pos=pos)
        pos += 1
    return out


def greedy_hf(model, prompt, n):
    model.generation_config.eos_token_id = None  # never stop early
    model.generation_config.pad_token_id = 0
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=[*GPT2_CASES, *LLAMA_CASES])
def converted(request, tmp_path_factory, gpt2_ranks_512):
    name = request.param
    family = "gpt2" if name.startswith("gpt2") else "llama"
    case = GPT2_CASES.get(name) or LLAMA_CASES[name]
    d = tmp_path_factory.mktemp(name)
    hf = make_hf(family, case, d / "hf", gpt2_ranks_512)
    out = convert(d / "hf", d / "ours.safetensors", progress=False)
    return name, hf, load_model(out), d


# ----------------------------------------------------------------------------- parity

def test_logits_match(converted):
    name, hf, ours, _ = converted
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, hf.config.vocab_size, (3, 40), generator=g)
    with torch.no_grad():
        ref = hf(x).logits
        for impl in ("sdpa", "manual"):
            ours.model.config.attn_impl = impl
            diff = (ours.model(x) - ref).abs().max().item()
            assert diff <= TOL, f"{name} {impl}: max |diff| {diff}"
    ours.model.config.attn_impl = "sdpa"


def test_cached_logits_match(converted):
    """Prefill 12 positions into our KV cache, then decode one position at a time: same logits as HF's full pass."""
    name, hf, ours, _ = converted
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, hf.config.vocab_size, (2, 30), generator=g)
    with torch.no_grad():
        ref = hf(x).logits
        cache = KVCache.for_model(ours.model, batch_size=2)
        parts = [ours.model(x[:, :12], cache=cache, start_pos=0)]
        for t in range(12, 30):
            parts.append(ours.model(x[:, t:t + 1], cache=cache, start_pos=t))
        diff = (torch.cat(parts, 1) - ref).abs().max().item()
    assert diff <= TOL, f"{name}: cached max |diff| {diff}"


def test_greedy_32_matches_generate(converted):
    name, hf, ours, _ = converted
    prompt = [5, 300, 77, 12, 480, 9, 256, 33]
    with torch.no_grad():
        assert greedy_ours(ours.model, prompt, 32) == greedy_hf(hf, prompt, 32), name


def test_config_and_tokenizer_carried(converted, shakespeare_text):
    name, hf, ours, d = converted
    cfg, tok = ours.config, ours.tokenizer
    assert cfg.vocab_size == hf.config.vocab_size and cfg.tie_embeddings == hf.config.tie_word_embeddings
    case = LLAMA_CASES.get(name, {})
    if cfg.family == "llama":
        assert (cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (4, 2, case.get("head_dim", 16))
        assert cfg.rope_theta == case.get("rope_theta", 10000.0)
        assert (cfg.rope_scaling is not None) == ("rope_scaling" in case)
        assert (cfg.qkv_bias, cfg.qk_norm, cfg.bias) == (case.get("arch") == "qwen2", case.get("arch") == "qwen3", False)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d / "hf")
    text = shakespeare_text[:5000] + " 1234 héllo 👋 <|endoftext|>\n\n  x cafe\u0301 \u212b \ufb01"  # NFD é, Å sign, ﬁ
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    assert tok.decode(ids[1:] if tok.add_bos else ids) == (unicodedata.normalize(tok.normalize, text) if tok.normalize else text)
    if case.get("arch") == "qwen2":  # Qwen2.5-Instruct's: NFC, single digits, no BOS, two stop tokens, ChatML
        assert (tok.normalize, tok.pat_str, tok.add_bos, tok.bos_id) == ("NFC", QWEN2_PAT, False, None)
        assert tok.eos_tokens == ["<|im_end|>", "<|endoftext|>"] and "<|im_start|>" in tok.chat_template
        assert tok.encode("x 2024") == hf_tok("x 2024")["input_ids"] and len(tok.encode("2024")) == 4
    elif cfg.family == "llama":
        assert tok.add_bos and tok.encode("hi")[0] == tok.bos_id
        assert tok.chat_template
    prov = ours.provenance
    assert prov["source_format"] == "huggingface" and prov["dtype"] == "float32"


# ----------------------------------------------------------------------------- Mistral / Qwen specifics

def test_sliding_window_caps_the_context_exactly(tmp_path, gpt2_ranks_512):
    """A query sees the last `sliding_window` positions (itself included): on up to that many tokens the
    model is plain causal attention, one token more and it is not. So the context is capped at the window."""
    hf = make_hf("llama", dict(arch="mistral", sliding_window=16), tmp_path / "hf", gpt2_ranks_512)
    ours = load_model(convert(tmp_path / "hf", tmp_path / "m.safetensors", progress=False))
    assert ours.config.block_size == 16 and "sliding window" in ours.provenance["context"]
    x = torch.randint(0, hf.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    full = transformers.MistralForCausalLM(transformers.MistralConfig(**{**hf.config.to_dict(), "sliding_window": None}))
    full.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert (ours.model(x[:, :16]) - hf(x[:, :16]).logits).abs().max().item() <= TOL
        assert (full.eval()(x).logits[:, -1] - hf(x).logits[:, -1]).abs().max().item() > 1e-3  # 17 tokens: the window bites


def test_qwen_sliding_window_only_when_used():
    c = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=100, hidden_size=64, intermediate_size=96,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    for use, max_window_layers, block_size in ((False, 2, 1024), (True, 4, 1024), (True, 2, 64)):
        cfg = config_from_hf({**c, "use_sliding_window": use, "sliding_window": 64, "max_window_layers": max_window_layers})
        assert cfg.block_size == block_size, (use, max_window_layers)
    assert config_from_hf({**c, "layer_types": ["full_attention"] * 4, "sliding_window": 64}).block_size == 1024
    with pytest.raises(ConvertError, match="Qwen3 attention_bias=True"):
        config_from_hf({**c, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": True})


@pytest.mark.parametrize("name", ["qwen2-untied-qkv_bias", "qwen3-qk_norm-head_dim32"])
def test_export_back_to_qwen(tmp_path, gpt2_ranks_512, name):
    """Our Qwen2 (qkv_bias) and Qwen3 (qk_norm) checkpoints export to Qwen2ForCausalLM / Qwen3ForCausalLM with
    the tokenizer (NFC included): transformers loads them and computes the original's logits."""
    hf = make_hf("llama", LLAMA_CASES[name], tmp_path / "hf", gpt2_ranks_512)
    ckpt = convert(tmp_path / "hf", tmp_path / "m.safetensors", progress=False)
    back = transformers.AutoModelForCausalLM.from_pretrained(export_hf(ckpt, tmp_path / "out"), dtype=torch.float32)
    assert type(back).__name__ == type(hf).__name__
    x = torch.randint(0, hf.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (back.eval()(x).logits - hf(x).logits).abs().max().item() <= TOL
    text = "cafe\u0301 2024 <|im_end|>"
    assert (transformers.AutoTokenizer.from_pretrained(tmp_path / "out")(text)["input_ids"]
            == transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"])


# ----------------------------------------------------------------------------- other weight layouts, dtypes, CLI

def test_sharded_and_bin_weights(tmp_path, gpt2_ranks_512):
    hf = make_hf("llama", LLAMA_CASES["llama-gqa-untied-theta5e5"], tmp_path / "sharded", gpt2_ranks_512)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    bin_dir = tmp_path / "bin"
    shutil.copytree(tmp_path / "sharded", bin_dir)
    for f in bin_dir.glob("model*.safetensors*"):
        f.unlink()
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    x = torch.randint(0, hf.config.vocab_size, (1, 20))
    with torch.no_grad():
        ref = hf(x).logits
        for src in ("sharded", "bin"):
            out = convert(tmp_path / src, tmp_path / f"{src}.safetensors", progress=False)
            assert (load_model(out).model(x) - ref).abs().max().item() <= TOL


def test_cli_and_dtype(tmp_path, gpt2_ranks_512, capsys):
    hf = make_hf("gpt2", GPT2_CASES["gpt2-tied"], tmp_path / "hf", gpt2_ranks_512)
    out = tmp_path / "m.safetensors"
    assert convert_main([str(tmp_path / "hf"), "--out", str(out), "--dtype", "bfloat16", "--quiet"]) == 0
    loaded = load_model(out)
    assert loaded.model.tok_emb.weight.dtype == torch.bfloat16
    x = torch.randint(0, hf.config.vocab_size, (1, 16))
    with torch.no_grad():
        diff = (loaded.model.float()(x) - hf(x).logits).abs().max().item()
    assert diff < 0.05  # bf16 weights: ~3 significant digits
    assert convert_main([str(tmp_path / "nope"), "--out", str(out)]) == 2  # a user error: exit 2, as argparse
    assert "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad inputs: clear error, nothing written

@pytest.fixture
def hf_dir(tmp_path, gpt2_ranks_512):
    make_hf("llama", LLAMA_CASES["llama-gqa-tied-theta1e4"], tmp_path / "hf", gpt2_ranks_512)
    (tmp_path / "out").mkdir()
    return tmp_path / "hf"


def _fails(src, out_dir, match):
    with pytest.raises(ConvertError, match=match):
        convert(src, out_dir / "m.safetensors", progress=False)
    assert list(out_dir.iterdir()) == [], "nothing may be written on failure"


def _edit_config(d, **kv):
    c = json.loads((d / "config.json").read_text())
    c.update(kv)
    (d / "config.json").write_text(json.dumps(c))


def test_truncated_safetensors(hf_dir):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _fails(hf_dir, hf_dir.parent / "out", "truncated")


@pytest.mark.parametrize("edit,match", [({"rope_theta": 0}, "rope_theta"), ({"rope_theta": -1.0}, "rope_theta"),
                                        ({"rms_norm_eps": -1e-6}, "norm_eps"), ({"rope_theta": float("nan")}, "rope_theta"),
                                        ({"max_position_embeddings": 64.5}, "block_size"),
                                        ({"max_position_embeddings": 2**40}, "block_size"),
                                        ({"num_attention_heads": 0}, "n_head|division by zero")])
def test_hf_model_that_cannot_compute_is_refused(hf_dir, edit, match):
    c = json.loads((hf_dir / "config.json").read_text())
    if "rope_theta" in edit and isinstance(c.get("rope_parameters"), dict):  # transformers 5 keeps it there
        c["rope_parameters"]["rope_theta"] = edit["rope_theta"]
    (hf_dir / "config.json").write_text(json.dumps({**c, **edit}))
    _fails(hf_dir, hf_dir.parent / "out", match)


def test_unknown_architecture(hf_dir):
    _edit_config(hf_dir, architectures=["BertForMaskedLM"], model_type="bert")
    _fails(hf_dir, hf_dir.parent / "out", "unsupported architecture 'BertForMaskedLM'")


def test_missing_tensor(hf_dir):
    from safetensors.torch import load_file, save_file
    sd = load_file(hf_dir / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, hf_dir / "model.safetensors", metadata={"format": "pt"})
    _fails(hf_dir, hf_dir.parent / "out", "missing tensor 'model.layers.1.mlp.up_proj.weight'")


def test_config_disagrees_with_shapes(hf_dir):
    _edit_config(hf_dir, intermediate_size=128)
    _fails(hf_dir, hf_dir.parent / "out", "config.json implies")


def test_unused_tensor(hf_dir):
    from safetensors.torch import load_file, save_file
    sd = load_file(hf_dir / "model.safetensors")
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(sd, hf_dir / "model.safetensors", metadata={"format": "pt"})
    _fails(hf_dir, hf_dir.parent / "out", "q_norm.weight.*not used")


def test_output_directory_missing(hf_dir):
    with pytest.raises(ConvertError, match="does not exist"):
        convert(hf_dir, hf_dir.parent / "no" / "such" / "m.safetensors", progress=False)
    assert not (hf_dir.parent / "no").exists()


class _Evil:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_bin_refused(hf_dir):
    marker = hf_dir.parent / "pwned"
    evil = _Evil()
    evil.marker = marker
    (hf_dir / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": evil}, hf_dir / "pytorch_model.bin")
    _fails(hf_dir, hf_dir.parent / "out", "weights_only")
    assert not marker.exists(), "pickled code must never run"


def test_unsupported_normalizer_refused(hf_dir):
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    tj["normalizer"] = {"type": "Lowercase"}
    (hf_dir / "tokenizer.json").write_text(json.dumps(tj))
    _fails(hf_dir, hf_dir.parent / "out", "normalizer 'Lowercase' is not supported")


def test_sentencepiece_tokenizer_refused(hf_dir):
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (hf_dir / "tokenizer.json").write_text(json.dumps(tj))
    _fails(hf_dir, hf_dir.parent / "out", "SentencePiece.*not supported")
    (hf_dir / "tokenizer.json").unlink()
    (hf_dir / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\xff\xfe")  # protobuf-ish
    _fails(hf_dir, hf_dir.parent / "out", "SentencePiece.*not supported")


# ----------------------------------------------------------------------------- hub ids

def test_hub_id_offline(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConvertError, match=r"'HuggingFaceTB/SmolLM2-135M'.*local directory"):
        convert("HuggingFaceTB/SmolLM2-135M", tmp_path / "m.safetensors", progress=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ConvertError, match=r"'gpt2'.*huggingface_hub is not installed.*local directory"):
        convert("gpt2", tmp_path / "m.safetensors", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_hub_id_downloads_then_converts(monkeypatch, tmp_path, gpt2_ranks_512):
    import huggingface_hub
    make_hf("gpt2", GPT2_CASES["gpt2-tied"], tmp_path / "snap", gpt2_ranks_512)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **k: str(tmp_path / "snap"))
    out = convert("openai-community/gpt2", tmp_path / "m.safetensors", progress=False)
    assert load_model(out).config.family == "gpt2"
