"""minillm -> Hugging Face: our checkpoints exported with minillm.export load in transformers with the
same logits (<= 1e-5) and the same tokenizer ids; exporting then converting back is lossless."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minillm.checkpoint import load_model, save_model  # noqa: E402
from minillm.config import ModelConfig  # noqa: E402
from minillm.convert import LLAMA3_PAT, convert  # noqa: E402
from minillm.export import ExportError, export_hf, main as export_main  # noqa: E402
from minillm.model import Transformer  # noqa: E402
from minillm.tokenizer import GPT2_PAT, BPETokenizer, CharTokenizer  # noqa: E402

TOL = 1e-5


def baby_char_model(text, steps=10, **overrides):
    """A baby char model, trained for a few steps so its weights are not just the initialisation."""
    tok = CharTokenizer.from_text(text)
    cfg = ModelConfig(**{**dict(family="gpt2", vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4,
                                n_embd=32), **overrides})
    torch.manual_seed(0)
    model = Transformer(cfg)
    data = torch.tensor(tok.encode(text[:20000]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ix = torch.randint(0, len(data) - 33, (8,), generator=g)
        x = torch.stack([data[i:i + 32] for i in ix])
        y = torch.stack([data[i + 1:i + 33] for i in ix])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def bpe_model(ranks, family, **overrides):
    n = len(ranks)
    if family == "llama":
        tok = BPETokenizer("t", LLAMA3_PAT, ranks, {"<|begin_of_text|>": n, "<|eot_id|>": n + 1},
                           bos_token="<|begin_of_text|>", eos_tokens=["<|eot_id|>"], add_bos=True,
                           chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    else:
        tok = BPETokenizer("t", GPT2_PAT, ranks, {"<|endoftext|>": n}, eos_tokens=["<|endoftext|>"],
                           pre_split_digits=overrides.pop("split_digits", False))
    cfg = ModelConfig(**{**dict(family=family, vocab_size=n + 2, block_size=64, n_layer=2, n_head=4, n_embd=64),
                         **overrides})
    torch.manual_seed(1)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # make everything non-trivial, including norms and biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, tok


CASES = {
    "char-gpt2": lambda text, ranks: baby_char_model(text),
    "char-gpt2-nobias-untied": lambda text, ranks: baby_char_model(text, bias=False, tie_embeddings=False),
    "char-llama-gqa": lambda text, ranks: baby_char_model(text, family="llama", n_kv_head=2),
    "bpe-gpt2-digits": lambda text, ranks: bpe_model(ranks, "gpt2", split_digits=True),
    "bpe-llama-gqa-untied-llama3": lambda text, ranks: bpe_model(
        ranks, "llama", n_kv_head=2, tie_embeddings=False, rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "bpe-llama-bias": lambda text, ranks: bpe_model(ranks, "llama", bias=True),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory, shakespeare_text, gpt2_ranks_512):
    d = tmp_path_factory.mktemp(request.param)
    model, tok = CASES[request.param](shakespeare_text, gpt2_ranks_512)
    save_model(d / "ours.safetensors", model, tok, {"test": request.param})
    out = export_hf(d / "ours.safetensors", d / "hf")
    return request.param, load_model(d / "ours.safetensors"), out


def test_transformers_logits_match(exported):
    name, ours, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(x).logits - ours.model(x)).abs().max().item()
    assert diff <= TOL, f"{name}: max |diff| {diff}"


def test_transformers_tokenizer_matches(exported, shakespeare_text):
    name, ours, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    tok = ours.tokenizer
    text = shakespeare_text[:3000]
    if tok.kind == "bpe":
        text += " 1999 x42 ²³ héllo 👋🏽\t\n\n  <|endoftext|> <|eot_id|>"
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode(text), name
    assert hf_tok.decode(ids) == tok.decode(ids)
    if tok.chat_template:
        assert hf_tok.chat_template == tok.chat_template


def test_convert_back_is_lossless(exported, tmp_path):
    name, ours, out = exported
    back = load_model(convert(out, tmp_path / "back.safetensors", progress=False))
    a, b = ours.model.state_dict(), back.model.state_dict()
    cfg = ours.config
    if cfg.family == "gpt2" and not cfg.bias:  # exported with zero biases, which come back
        b = {k: v for k, v in b.items() if k in a}
        assert back.config.bias
    else:
        assert back.config == cfg
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    da, db = ours.tokenizer.to_dict(), back.tokenizer.to_dict()
    da.pop("name", None), db.pop("name", None)  # the name becomes the directory's
    assert da == db


def test_files_written(exported):
    name, ours, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == ours.config.vocab_size


def test_errors_write_nothing(tmp_path, shakespeare_text, capsys):
    model, tok = baby_char_model(shakespeare_text, steps=0)
    save_model(tmp_path / "m.safetensors", model, tok)
    with pytest.raises(ExportError, match="does not exist"):
        export_hf(tmp_path / "m.safetensors", tmp_path / "missing" / "hf")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_hf(tmp_path / "m.safetensors", tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "m.safetensors").read_bytes()[:1000])
    assert export_main([str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "hf2")]) == 2  # a user error
    assert "error:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "full", "m.safetensors"]
    assert export_main([str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "hf3")]) == 0
