"""LoRA (issue 7): only adapters learn, rank 0 / disabled is the base bit for bit, merging is exact,
adapters refuse a base they were not trained on, and the trainer's LoRA path end to end."""

import json

import pytest
import torch
from safetensors import safe_open

from minillm import lora
from minillm.checkpoint import CheckpointError, load_model, load_train_state, read_metadata, save_model
from minillm.data import file_sha256
from minillm.tokenizer import CharTokenizer
from minillm.train_config import TrainConfig
from minillm.train_setup import train
from tiny import tiny_model

ALL = "q,k,v,o,gate,up,down"


def randomize_adapters(model, seed=1):
    """B starts at zero (adapters off at init); give every matrix values so they change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def tokens():
    return torch.randint(0, 40, (3, 20), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("family, targets", [("llama", ALL), ("gpt2", "q,k,v,o,up,down")])
def test_only_adapters_receive_gradients(family, targets, tokens):
    model = tiny_model(family)
    wrapped = lora.apply_lora(model, rank=4, alpha=8, targets=targets)
    assert len(wrapped) == 2 * len(targets.split(","))
    randomize_adapters(model)
    model(tokens).logsumexp(-1).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    assert len(trainable) == 2 * len(wrapped)
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    r, total = lora.count_trainable(model)
    assert r == sum(p.numel() for n, p in model.named_parameters() if n in trainable) and r < total / 5


def test_zero_init_is_the_base_and_rank0_or_disabled_is_exactly_the_base(tokens):
    base = tiny_model()
    with torch.no_grad():
        expected = base(tokens)
    model = tiny_model()
    lora.apply_lora(model, rank=4, alpha=8, targets=ALL)
    with torch.no_grad():
        assert torch.equal(model(tokens), expected)  # B = 0 at init: the adapters add exactly zero
        randomize_adapters(model)
        assert not torch.allclose(model(tokens), expected, atol=1e-3)
        lora.set_lora_enabled(model, False)
        assert torch.equal(model(tokens), expected)
        lora.set_lora_enabled(model, True)
        assert not torch.allclose(model(tokens), expected, atol=1e-3)

    rank0 = tiny_model()
    lora.apply_lora(rank0, rank=0, alpha=8, targets=ALL)
    assert lora.lora_state_dict(rank0) == {} and lora.count_trainable(rank0)[0] == 0
    with torch.no_grad():
        assert torch.equal(rank0(tokens), expected)


def test_lora_forward_is_the_stated_formula():
    torch.manual_seed(3)
    base = torch.nn.Linear(6, 5)
    layer = lora.LoRALinear(base, rank=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = x @ base.weight.T + base.bias + (3.0 / 2) * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    assert layer.weight is base.weight and layer.bias is base.bias  # no copy of the frozen weights


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_checkpoint_equals_base_plus_adapters(tmp_path, family, tokens):
    model = tiny_model(family)
    targets = ALL if family == "llama" else "q,v,up,down"
    lora.apply_lora(model, rank=3, alpha=6, targets=targets)
    randomize_adapters(model)
    with torch.no_grad():
        with_adapters = model(tokens)
    lora.merge_lora(model)
    assert lora.lora_layers(model) == {}
    path = tmp_path / "merged.safetensors"
    save_model(path, model, CharTokenizer("abc"))  # an ordinary checkpoint now
    merged = load_model(path).model
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), with_adapters, atol=1e-5, rtol=0)
        assert not torch.allclose(merged(tokens), tiny_model(family)(tokens), atol=1e-3)  # and not just the base


def test_adapters_file_round_trip_and_wrong_base_rejected(tmp_path, tokens):
    tok = CharTokenizer("abc")
    base_path, other_path = tmp_path / "base.safetensors", tmp_path / "other.safetensors"
    save_model(base_path, tiny_model(seed=0), tok)
    save_model(other_path, tiny_model(seed=5), tok)  # same config, other weights

    model = load_model(base_path).model
    lora.apply_lora(model, rank=4, alpha=8, targets="q,v")
    randomize_adapters(model)
    adapters = tmp_path / "a.lora.safetensors"
    lora.save_adapters(adapters, model, base_path, provenance={"note": "test"})
    meta = read_metadata(adapters)
    assert meta["format"] == lora.FORMAT and meta["base"] == str(base_path)
    assert meta["base_sha256"] == file_sha256(base_path)
    assert json.loads(meta["lora"]) == {"rank": 4, "alpha": 8, "targets": ["q", "v"]}
    assert adapters.stat().st_size < base_path.stat().st_size / 4

    fresh = load_model(base_path).model
    lora.load_adapters(adapters, fresh, base_path)
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))

    wrong = load_model(other_path).model
    with pytest.raises(lora.LoRAError, match=r"trained on base .*base.safetensors .*other.safetensors has sha256 .*wrong base"):
        lora.load_adapters(adapters, wrong, other_path)
    with pytest.raises(lora.LoRAError, match="not a minillm adapters file"):
        lora.load_adapters(base_path, load_model(base_path).model, base_path)


def test_bad_targets_and_rank():
    with pytest.raises(lora.LoRAError, match="'gate' exists only in the llama family"):
        lora.apply_lora(tiny_model("gpt2"), 4, 8, "q,gate")
    with pytest.raises(lora.LoRAError, match=r"targets \['qq'\] not understood; choose from q,k,v,o,gate,up,down"):
        lora.apply_lora(tiny_model(), 4, 8, "q,qq")
    with pytest.raises(lora.LoRAError, match="rank must be >= 0"):
        lora.apply_lora(tiny_model(), -1, 8, "q")


def char_base(tmp_path, shakespeare_text):
    """A small text file and a tiny char-level LLaMA base checkpoint for trainer runs -> (text, tok, cfg, base_path)."""
    text = tmp_path / "t.txt"
    text.write_text(shakespeare_text[:5000])
    tok = CharTokenizer(shakespeare_text[:5000])
    base = tiny_model("llama", vocab_size=tok.vocab_size, n_kv_head=None)
    base_path = tmp_path / "base.safetensors"
    save_model(base_path, base, tok)
    return text, tok, base.config, base_path


def test_trainer_lora_run_saves_adapters_and_merged(tmp_path, shakespeare_text, tokens):
    """train.py --init-from BASE --lora-rank 4 --merge: the base stays untouched, the adapters file is
    small and names the base, and the merged checkpoint computes what base + best adapters compute."""
    text, tok, cfg, base_path = char_base(tmp_path, shakespeare_text)
    base_sha = file_sha256(base_path)

    res = train(TrainConfig(name="ft", out_dir=str(tmp_path), data=str(text), init_from=str(base_path),
                            lora_rank=4, lora_alpha=8, lora_targets="q,v,down", merge=True, seq_len=16,
                            batch_size=4, max_iters=20, eval_interval=10, eval_iters=2, warmup_iters=0,
                            lr=1e-2, min_lr=1e-2, plot=False), log=lambda *a: None)
    assert file_sha256(base_path) == base_sha
    assert res.adapters_path == tmp_path / "ft.lora.safetensors" and res.model_path == tmp_path / "ft.safetensors"
    assert res.evals[-1][2] < res.evals[0][2]
    assert res.trainable_params == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 32 * 4) + 2 * (4 * cfg.mlp_hidden + 32 * 4)
    assert read_metadata(res.adapters_path)["base_sha256"] == base_sha

    by_hand = load_model(base_path).model
    lora.load_adapters(res.adapters_path, by_hand, base_path)
    merged = load_model(res.model_path)
    assert merged.provenance["lora_merged"] == str(res.adapters_path)
    with torch.no_grad():
        x = tokens % tok.vocab_size
        torch.testing.assert_close(merged.model(x), by_hand(x), atol=1e-5, rtol=0)
        assert not torch.equal(merged.model(x), load_model(base_path).model(x))


def test_merge_command(tmp_path, tokens):
    """python -m minillm.lora BASE ADAPTERS --out MERGED; and a wrong base is refused with exit code 2."""
    tok = CharTokenizer("abc")
    base_path, other_path = tmp_path / "base.safetensors", tmp_path / "other.safetensors"
    save_model(base_path, tiny_model(seed=0), tok)
    save_model(other_path, tiny_model(seed=5), tok)
    model = load_model(base_path).model
    lora.apply_lora(model, rank=2, alpha=4, targets="k,o,up")
    randomize_adapters(model)
    adapters = tmp_path / "a.lora.safetensors"
    lora.save_adapters(adapters, model, base_path)
    out = tmp_path / "merged.safetensors"
    assert lora.main([str(base_path), str(adapters), "--out", str(out)]) == 0
    merged = load_model(out)
    assert merged.provenance["base_sha256"] == file_sha256(base_path)
    with torch.no_grad():
        torch.testing.assert_close(merged.model(tokens), model(tokens), atol=1e-5, rtol=0)
    assert lora.main([str(other_path), str(adapters), "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert not (tmp_path / "bad.safetensors").exists()


def test_lora_resume_state_holds_only_adapters_and_continues_exactly(tmp_path, shakespeare_text):
    text, _, _, base_path = char_base(tmp_path, shakespeare_text)

    def run(out, **kw):
        return train(TrainConfig(name="r", out_dir=str(tmp_path / out), data=str(text), init_from=str(base_path),
                                 lora_rank=4, lora_targets="q,v", seq_len=16, batch_size=4, max_iters=20,
                                 eval_interval=10, eval_iters=2, warmup_iters=0, lr=1e-2, min_lr=1e-3,
                                 plot=False, **kw), log=lambda *a: None)
    full = run("a")
    run("b", stop_after=10)
    state_file = tmp_path / "b" / "r.train.safetensors"
    with safe_open(str(state_file), framework="pt") as f:
        names = [k for k in f.keys() if k.startswith("model.")]
    assert names and all(".lora_" in k for k in names)  # adapters only: no frozen base weights
    resumed = run("b", resume=True)
    assert [h for h in full.history if h[0] > 10] == resumed.history  # same losses, bit for bit
    assert full.evals == resumed.evals
    other = load_model(base_path).model
    lora.apply_lora(other, 4, 16.0, "q,k")  # other targets: refused, not half-loaded
    opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    with pytest.raises(CheckpointError, match="trainable weights of another setup"):
        load_train_state(state_file, opt, other)
