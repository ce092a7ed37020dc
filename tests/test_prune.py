"""Pruning (minillm.prune): magnitude sparsity exact and confined to the blocks' Linear weights;
depth and width pruning drop exactly what a constructed model makes useless (an identity block,
dead MLP channels) with unchanged logits; checkpoints of the smaller config round-trip through
load_model with their provenance; one-line errors naming the parameter. Tiny random models only."""

import copy

import pytest
import torch

from minillm import prune as P
from minillm.checkpoint import load_model, save_model
from minillm.generate import generate
from minillm.model import Transformer
from minillm.prune.__main__ import main as prune_main
from minillm.quantize import quantize_model
from minillm.sampling import SamplingParams
from minillm.tokenizer import CharTokenizer
from tiny import tiny_model
from cli_runner import exit_status


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, shakespeare_text):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(shakespeare_text[:20000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(calib_file):
    return CharTokenizer.from_text(calib_file.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def calib(calib_file, tokenizer):
    return P.calibration_ids(tokenizer, calib_file, tokens=512, seq_len=32)


def tiny_moved(family: str, vocab_size: int) -> Transformer:
    """tests/tiny.py's model with 4 layers and MLP width 48, its biases and norm gains moved."""
    model = tiny_model(family, vocab_size=vocab_size, n_layer=4, mlp_hidden=48)
    with torch.no_grad():  # biases and norm gains away from their init values, so that "untouched" means something
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


TOKENS = torch.randint(0, 40, (2, 32), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- (a) magnitude

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_global_magnitude_sparsity_is_exact_and_only_in_block_linears(family, tokenizer):
    model = tiny_moved(family, tokenizer.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = P.magnitude_prune(model, 0.3, "global")
    weights = {f"{name}.weight": lin.weight for name, lin in P.block_linears(model).items()}
    n = sum(w.numel() for w in weights.values())
    assert record["zero_weights"] == sum(int((w == 0).sum()) for w in weights.values()) == round(0.3 * n)
    assert record["of_weights"] == n
    pruned = torch.cat([before[k][w == 0].abs() for k, w in weights.items()])
    kept = torch.cat([before[k][w != 0].abs() for k, w in weights.items()])
    assert pruned.max() <= kept.min()  # one threshold over all matrices
    assert len({round(float((w == 0).float().mean()), 3) for w in weights.values()}) > 1  # unevenly sparse layers
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v[v != 0], before[k][v != 0])  # the rest of a pruned matrix as it was
        else:  # embeddings, (tied) head, position embedding, norms, biases
            assert torch.equal(v, before[k]), k
    out = logits(model, TOKENS)
    assert out.shape == (2, 32, tokenizer.vocab_size) and torch.isfinite(out).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.77])
def test_per_layer_magnitude_sparsity_is_exact_in_every_matrix(sparsity, tokenizer):
    model = tiny_moved("llama", tokenizer.vocab_size)
    original = copy.deepcopy(model)
    P.magnitude_prune(model, sparsity, "layer")
    for name, lin in P.block_linears(model).items():
        w, w0 = lin.weight, P.block_linears(original)[name].weight
        assert int((w == 0).sum()) == round(sparsity * w.numel()), name
        if sparsity:
            assert w0[w == 0].abs().max() <= w0[w != 0].abs().min()
    if sparsity == 0:
        assert torch.equal(logits(model, TOKENS), logits(original, TOKENS))


def test_smallest_mask_takes_exactly_k_even_with_ties():
    scores = torch.tensor([[1.0, 0.0, 1.0], [1.0, 2.0, 1.0]])
    mask = P.smallest_mask(scores, 3)
    assert int(mask.sum()) == 3 and mask[0, 1] and mask[0, 0] and mask[0, 2]  # ties: lower indices first
    assert not P.smallest_mask(scores, 0).any()


def test_magnitude_pruned_checkpoint_loads_dense(tmp_path, tokenizer):
    model = tiny_moved("gpt2", tokenizer.vocab_size)
    P.magnitude_prune(model, 0.5)
    save_model(tmp_path / "sparse.safetensors", model, tokenizer)
    loaded = load_model(tmp_path / "sparse.safetensors")
    assert loaded.config == model.config  # same shapes, same config: zeros are stored
    assert torch.equal(logits(loaded.model, TOKENS), logits(model, TOKENS))


# ----------------------------------------------------------------------------- (b) depth

def make_identity(block) -> None:
    """Block output = input: nothing written to the residual stream by attention or the MLP."""
    with torch.no_grad():
        for lin in (block.attn.o_proj, block.mlp.down_proj):
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_depth_drops_the_identity_block_and_keeps_logits_exactly(family, tokenizer, calib):
    model = tiny_moved(family, tokenizer.vocab_size)
    make_identity(model.blocks[2])
    sims = P.block_similarity(model, calib)
    assert sims[2] == pytest.approx(1.0, abs=1e-6) and max(sims[:2] + sims[3:]) < 0.999
    pruned, record = P.prune_depth(model, calib, 1)
    assert record["dropped_blocks"] == [2] and record["n_layer"] == [4, 3]
    assert pruned.config.n_layer == 3 and [b.attn.layer for b in pruned.blocks] == [0, 1, 2]
    assert torch.equal(pruned.blocks[2].mlp.up_proj.weight, model.blocks[3].mlp.up_proj.weight)  # renumbered
    assert torch.equal(logits(pruned, TOKENS), logits(model, TOKENS))
    assert pruned.lm_head.weight is pruned.tok_emb.weight  # still tied


def test_depth_dropping_nothing_keeps_logits(tokenizer, calib):
    model = tiny_moved("llama", tokenizer.vocab_size)
    pruned, record = P.prune_depth(model, calib, 0)
    assert record["dropped_blocks"] == [] and pruned.config == model.config
    assert torch.equal(logits(pruned, TOKENS), logits(model, TOKENS))


def test_depth_pruned_model_decodes_with_its_kv_cache(tokenizer, calib):
    model = tiny_moved("llama", tokenizer.vocab_size)
    pruned, _ = P.prune_depth(model, calib, 2)
    out = generate(pruned, tokenizer, "ROMEO:", 10, SamplingParams(temperature=0.0))
    full = logits(pruned, torch.tensor([tokenizer.encode("ROMEO:") + out.ids[:-1]]))
    assert full[0, 5:].argmax(-1).tolist() == out.ids  # cached decode = uncached argmax


# ----------------------------------------------------------------------------- (c) width

def kill_channels(model, dead_in: list[int], dead_out: list[int]) -> None:
    """dead_in: channels whose up (and gate) rows and biases are zero (h_j = 0); dead_out: channels
    whose down_proj column is zero (they write nothing)."""
    with torch.no_grad():
        for block in model.blocks:
            for lin in [block.mlp.up_proj] + ([block.mlp.gate_proj] if hasattr(block.mlp, "gate_proj") else []):
                lin.weight[dead_in] = 0.0
                if lin.bias is not None:
                    lin.bias[dead_in] = 0.0
            block.mlp.down_proj.weight[:, dead_out] = 0.0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_width_drops_the_dead_channels_and_keeps_logits(family, tokenizer, calib):
    model = tiny_moved(family, tokenizer.vocab_size)
    dead_in, dead_out = [3, 17, 40], [0, 8, 47]
    kill_channels(model, dead_in, dead_out)
    live = [j for j in range(48) if j not in dead_in + dead_out]
    importance = P.mlp_channel_importance(model, calib)
    for imp in importance:
        assert (imp[dead_in + dead_out] == 0).all() and (imp[live] > 0).all()
    pruned, record = P.prune_width(model, calib, len(live))
    assert pruned.config.mlp_hidden == len(live) == 42 and record["mlp_hidden"] == [48, 42]
    for old, new in zip(model.blocks, pruned.blocks):
        assert torch.equal(new.mlp.up_proj.weight, old.mlp.up_proj.weight[live])
        assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight[:, live])
    # bitwise equal here; a matmul of another inner size may sum in another order elsewhere
    torch.testing.assert_close(logits(pruned, TOKENS), logits(model, TOKENS), rtol=0, atol=1e-6)


def test_width_keeping_every_channel_keeps_logits(tokenizer, calib):
    model = tiny_moved("llama", tokenizer.vocab_size)
    pruned, _ = P.prune_width(model, calib, 48)
    assert pruned.config == model.config
    assert torch.equal(logits(pruned, TOKENS), logits(model, TOKENS))


# ----------------------------------------------------------------------------- calibration, files, errors

def test_calibration_comes_from_the_train_part(tokenizer, calib_file):
    text = calib_file.read_text(encoding="utf-8")
    c = P.calibration_ids(tokenizer, calib_file, tokens=100, seq_len=32)
    assert c.ids.shape == (3, 32) and c.source["tokens"] == 96 and len(c.source["sha256"]) == 64
    assert c.ids.flatten().tolist() == tokenizer.encode(text[:96])
    whole = P.calibration_ids(tokenizer, calib_file, tokens=10**6, seq_len=32)  # capped at the train part
    assert whole.source["tokens"] == int(len(text) * 0.9) // 32 * 32


@pytest.fixture
def checkpoint_file(tmp_path, tokenizer):
    path = tmp_path / "model.safetensors"
    save_model(path, tiny_moved("llama", tokenizer.vocab_size), tokenizer, {"source": "test"})
    return path


@pytest.mark.parametrize("args, check", [
    (["depth", "--drop", "2"], lambda c: c.n_layer == 2),
    (["width", "--mlp-hidden", "20"], lambda c: c.mlp_hidden == 20),
    (["magnitude", "--sparsity", "0.4", "--scope", "layer"], lambda c: c.n_layer == 4 and c.mlp_hidden == 48),
])
def test_cli_writes_a_loadable_smaller_checkpoint_with_provenance(args, check, checkpoint_file, calib_file, capsys):
    out = checkpoint_file.with_name("pruned.safetensors")
    calib = ["--calib", str(calib_file), "--calib-tokens", "256"] if args[0] != "magnitude" else []
    assert prune_main([args[0], str(checkpoint_file), "--out", str(out), *args[1:], *calib]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    loaded = load_model(out)
    assert check(loaded.config) and torch.isfinite(logits(loaded.model, TOKENS)).all()
    (step,) = loaded.provenance["pruning"]
    assert loaded.provenance["source"] == "test" and step["method"] == args[0] and len(step["source_sha256"]) == 64
    if args[0] != "magnitude":
        assert step["calibration"]["tokens"] == 256 and step["calibration"]["file"] == str(calib_file)
    if args[0] == "depth":
        assert len(step["dropped_blocks"]) == 2 and len(step["block_similarity"]) == 4


@pytest.mark.parametrize("args, flag", [
    (["magnitude", "--sparsity", "1.0"], "--sparsity"), (["magnitude", "--sparsity", "-0.1"], "--sparsity"),
    (["magnitude", "--sparsity", "nan"], "--sparsity"), (["depth", "--drop", "4"], "--drop"),
    (["depth", "--drop", "-1"], "--drop"), (["width", "--mlp-hidden", "0"], "--mlp-hidden"),
    (["width", "--mlp-hidden", "49"], "--mlp-hidden"), (["width", "--mlp-hidden", "8", "--calib-tokens", "0"], "--calib-tokens"),
    (["width", "--mlp-hidden", "8", "--calib-seq-len", "64"], "--calib-seq-len"),  # the model's context is 32
    (["width", "--mlp-hidden", "8", "--calib-tokens", "16", "--calib-seq-len", "24"], "--calib-seq-len 24"),  # was cut to 16
    (["depth", "--drop", "1", "--calib", "no-such-file.txt"], "no-such-file.txt"),
])
def test_cli_errors_are_one_line_naming_the_flag(args, flag, checkpoint_file, capsys):
    out = checkpoint_file.with_name("never.safetensors")
    assert exit_status(prune_main, [args[0], str(checkpoint_file), "--out", str(out), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and flag in err
    assert not out.exists()


@pytest.mark.parametrize("call, name", [
    (lambda m, c: P.magnitude_prune(m, 1.0), "sparsity"), (lambda m, c: P.magnitude_prune(m, 0.5, "row"), "scope"),
    (lambda m, c: P.prune_depth(m, c, 4), "drop"), (lambda m, c: P.drop_blocks(m, [0, 1, 2, 3]), "drop"),
    (lambda m, c: P.prune_width(m, c, 0), "mlp_hidden"), (lambda m, c: P.prune_width(m, c, 100), "mlp_hidden"),
])
def test_library_errors_are_value_errors_naming_the_parameter(call, name, tokenizer, calib):
    with pytest.raises(ValueError, match=rf"^{name} "):
        call(tiny_moved("llama", tokenizer.vocab_size), calib)


def test_quantized_models_are_refused(tokenizer):
    model = quantize_model(tiny_moved("llama", tokenizer.vocab_size), 8)
    with pytest.raises(ValueError, match="quantized"):
        P.magnitude_prune(model, 0.5)


@pytest.mark.parametrize("case", ["missing input", "out is the input", "out folder missing", "quantized input"])
def test_cli_refuses_files_it_cannot_use_in_one_line(case, checkpoint_file, tokenizer, capsys):
    src, out = checkpoint_file, checkpoint_file.with_name("never.safetensors")
    if case == "missing input":
        src = checkpoint_file.with_name("absent.safetensors")
    elif case == "out is the input":
        out = checkpoint_file
    elif case == "out folder missing":
        out = checkpoint_file.parent / "no" / "such" / "folder.safetensors"
    else:
        src = checkpoint_file.with_name("int8.safetensors")
        save_model(src, quantize_model(tiny_moved("llama", tokenizer.vocab_size), 8), tokenizer)
    before = src.stat().st_mtime_ns if src.exists() else None
    assert exit_status(prune_main, ["magnitude", str(src), "--out", str(out), "--sparsity", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(src if case != "out folder missing" else out.parent) in err
    assert (src.stat().st_mtime_ns if src.exists() else None) == before
    assert case == "out is the input" or not out.exists()
