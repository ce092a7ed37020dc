"""Our format: round trip, atomic save, and a clear error for every kind of bad file."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from minillm import checkpoint
from minillm.checkpoint import CheckpointError, load_model, save_model
from minillm.config import preset
from minillm.model import Transformer
from minillm.tokenizer import CharTokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


@pytest.fixture(params=["gpt2", "llama"])
def saved(request, tmp_path):
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(TEXT)
    extra = dict(n_kv_head=2, tie_embeddings=False) if request.param == "llama" else {}
    model = Transformer(preset("nano", family=request.param, vocab_size=tok.vocab_size, **extra)).eval()
    path = tmp_path / "m.safetensors"
    save_model(path, model, tok, {"source": "test", "step": 7})
    return path, model, tok


def test_roundtrip_same_logits_config_tokenizer(saved):
    path, model, tok = saved
    loaded = load_model(path)
    x = torch.tensor([tok.encode("Before we")])
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.config == model.config
    assert loaded.tokenizer.encode(TEXT) == tok.encode(TEXT)
    assert loaded.provenance == {"source": "test", "step": 7}
    assert (loaded.model.lm_head.weight is loaded.model.tok_emb.weight) == model.config.tie_embeddings
    meta = checkpoint.read_metadata(path)
    assert meta["format"] == "minillm/1" and json.loads(meta["config"])["family"] == model.config.family


def test_load_in_bfloat16(saved):
    path, model, tok = saved
    loaded = load_model(path, dtype=torch.bfloat16)
    assert loaded.model.tok_emb.weight.dtype == torch.bfloat16


def rewrite(path, edit_tensors=None, edit_meta=None):
    """Write a variant of a checkpoint (tensors and metadata edited) to path.bad.safetensors."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    (edit_tensors or (lambda t: None))(tensors)
    (edit_meta or (lambda m: None))(meta)
    bad = path.with_suffix(".bad.safetensors")
    save_file(tensors, bad, metadata=meta)
    return bad


def test_missing_tensor_named(saved):
    path, model, _ = saved
    bad = rewrite(path, lambda t: t.pop("blocks.1.attn.k_proj.weight"))
    hd = model.config.head_dim * model.config.n_kv_head
    with pytest.raises(CheckpointError, match=rf"missing tensor 'blocks.1.attn.k_proj.weight' \(expected shape \({hd}, 32\)\)"):
        load_model(bad)


def test_extra_tensor_named(saved):
    path, _, _ = saved
    bad = rewrite(path, lambda t: t.__setitem__("blocks.9.mlp.up_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'blocks.9.mlp.up_proj.weight'"):
        load_model(bad)


def test_misshapen_tensor_named(saved):
    path, _, _ = saved
    bad = rewrite(path, lambda t: t.__setitem__("norm.weight", torch.ones(31)))
    with pytest.raises(CheckpointError, match=r"tensor 'norm.weight' has shape \(31,\), config expects \(32,\)"):
        load_model(bad)


@pytest.mark.parametrize("field,value", [("rope_theta", 0), ("rope_theta", float("nan")), ("norm_eps", -1e-5),
                                         ("norm_eps", float("nan")), ("block_size", 64.5), ("block_size", 2**40)])
def test_config_that_cannot_compute_named_with_the_file(saved, field, value):
    """A model of NaN (rope theta <= 0, eps < 0) or none at all (a context of 2**40) was loaded before."""
    path, _, _ = saved

    def edit(meta):
        cfg = json.loads(meta["config"])
        cfg[field] = value
        meta["config"] = json.dumps(cfg)
    bad = rewrite(path, edit_meta=edit)
    with pytest.raises(CheckpointError, match=rf"{bad.name}.*ModelConfig.{field}"):
        load_model(bad)


def test_wrong_format_version(saved):
    path, _, _ = saved
    bad = rewrite(path, edit_meta=lambda m: m.__setitem__("format", "minillm/99"))
    with pytest.raises(CheckpointError, match="format 'minillm/99' is not 'minillm/1'"):
        load_model(bad)


def test_truncated_file(saved):
    path, _, _ = saved
    data = path.read_bytes()
    for cut in (len(data) - 100, 20):  # data section cut short; header cut short
        bad = path.with_name(f"cut{cut}.safetensors")
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=str(bad.name)):
            load_model(bad)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_model(tmp_path / "nope.safetensors")


def test_save_is_atomic(saved, monkeypatch):
    """A crash during the write leaves the previous file intact and no temp file behind."""
    path, model, tok = saved
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(path, model, tok)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_atomic_write_makes_a_normal_file(saved, tmp_path):
    """The one atomic write (checkpoints, converted files, token caches, downloads): the file gets the
    mode any new file gets (0o666 less the umask); a failing write leaves the old file and no temp file."""
    umask = os.umask(0)
    os.umask(umask)
    saved_path = saved[0]
    assert saved_path.stat().st_mode & 0o777 == 0o666 & ~umask  # safetensors alone would make it 0o600
    (tmp_path / "d").mkdir()
    path = checkpoint.atomic_write(tmp_path / "d" / "a.bin", lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o666 & ~umask

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise ValueError("write failed")
    with pytest.raises(ValueError, match="write failed"):
        checkpoint.atomic_write(path, fail)
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["a.bin"]


def test_skip_init_on_meta_skips_only_meta_tensors():
    """Inside SkipInitOnMeta an initializer leaves a meta tensor alone and still runs on a real one."""
    real, meta = torch.zeros(1000), torch.empty(1000, device="meta")
    with checkpoint.SkipInitOnMeta():
        assert torch.nn.init.normal_(meta) is meta and meta.zero_() is meta
        torch.nn.init.normal_(real)
    assert real.std() > 0.5


def test_save_into_missing_directory(saved, tmp_path):
    _, model, tok = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_model(tmp_path / "no" / "such" / "m.safetensors", model, tok)


def test_training_state_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset("nano", vocab_size=20))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 20, (2, 8))).sum().backward()
    opt.step()
    path = tmp_path / "s.train.safetensors"
    rng_state = torch.get_rng_state()
    checkpoint.save_train_state(path, opt, {"iter": 3}, {"torch": rng_state}, model)
    model2 = Transformer(preset("nano", vocab_size=20))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    state, rng = checkpoint.load_train_state(path, opt2, model2)
    assert state == {"iter": 3} and torch.equal(rng["torch"], rng_state)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in s1[k]:
            assert torch.equal(torch.as_tensor(s1[k][name]).float(), torch.as_tensor(s2[k][name]).float())
    assert b"pickle" not in path.read_bytes()[:200]


def test_loading_builds_the_skeleton_without_running_ops_on_meta(tmp_path):
    """empty_model runs no initializer or other op on meta tensors: the first such op makes torch
    import its Python meta kernels and sympy, resident for the rest of the process (bench/README.md).
    Checked in a fresh process, for a float and an int4 checkpoint; the model still works and
    torch.nn.init is intact afterwards."""
    import subprocess
    import sys
    code = f"""
import sys, torch
from minillm.checkpoint import load_model, save_model
from minillm.config import preset
from minillm.model import Transformer
from minillm.quantize import quantize_model
from minillm.tokenizer import CharTokenizer
tok = CharTokenizer.from_text("hello world")
cfg = preset("nano", family="llama", n_embd=64, n_kv_head=2, vocab_size=tok.vocab_size)
model = Transformer(cfg).eval()
save_model({str(tmp_path / 'f.safetensors')!r}, model, tok)
save_model({str(tmp_path / 'q.safetensors')!r}, quantize_model(Transformer(cfg).eval(), 4, 32), tok)
assert "sympy" not in sys.modules, "building on the CPU imported sympy already"
for name in ("f", "q"):
    m = load_model({str(tmp_path)!r} + f"/{{name}}.safetensors").model
    assert m(torch.tensor([[1, 2, 3]])).isfinite().all()
assert "sympy" not in sys.modules, "loading imported torch's meta kernels"
w = torch.empty(1000)
torch.nn.init.normal_(w)
assert w.std() > 0.5, "torch.nn.init left patched"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd())
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_temp_file_of_a_killed_writer_is_removed_by_the_next_write(saved):
    """A writer killed between making its temp file and renaming it (here: at once, SIGKILL) leaves a
    hidden zero-byte .NAME.HOST-PID.RANDOM.tmp; the next atomic write of that name removes it, and
    leaves alone the temp files of a writer that still runs (this process) or runs on another host."""
    import signal
    import subprocess
    import sys
    path, model, tok = saved
    code = (f"import os, signal; open(os.path.join({str(path.parent)!r}, '.{path.name}.{checkpoint._HOST}-' "
            f"+ str(os.getpid()) + '.0123abcd.tmp'), 'w').close(); os.kill(os.getpid(), signal.SIGKILL)")
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -signal.SIGKILL
    (left,) = [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert left.stat().st_size == 0
    dead_pid = left.name.split("-")[-1].split(".")[0]
    live = path.with_name(f".{path.name}.{checkpoint._HOST}-{os.getpid()}.89abcdef.tmp")
    other_host = path.with_name(f".{path.name}.elsewhere-{dead_pid}.01234567.tmp")  # that pid may run there
    live.touch()
    other_host.touch()
    save_model(path, model, tok)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, live.name, other_host.name])


def test_every_writer_gives_the_umasks_mode(tmp_path, monkeypatch):
    """Checkpoints, training state, quantize's and convert's outputs, and export's folder and files: the
    mode any new file (folder) gets under the umask, here 0o027 -> 0o640 (0o750). safetensors alone makes
    its files 0o600 and mkdtemp its folders 0o700."""
    from minillm.convert import convert
    from minillm.export import export_hf
    from minillm.quantize.__main__ import main as quantize_main
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(TEXT)
    model = Transformer(preset("nano", vocab_size=tok.vocab_size))
    old = os.umask(0o027)
    try:
        save_model(tmp_path / "m.safetensors", model, tok)
        opt = torch.optim.AdamW(model.parameters())
        checkpoint.save_train_state(checkpoint.train_state_path(tmp_path / "m.safetensors"), opt, {"iter": 0},
                                    {"torch": torch.get_rng_state()}, model)
        assert quantize_main([str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "q.safetensors"), "--bits", "8"]) == 0
        export_hf(tmp_path / "m.safetensors", tmp_path / "hf")
        convert(tmp_path / "hf", tmp_path / "c.safetensors", progress=False)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes.pop("hf") == 0o750
    assert set(modes) == {"m.safetensors", "m.train.safetensors", "q.safetensors", "c.safetensors",
                          *(f"hf/{n}" for n in ("model.safetensors", "config.json", "generation_config.json",
                                                "tokenizer.json", "tokenizer_config.json"))}
    assert set(modes.values()) == {0o640}, modes


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_keep_blocks_is_the_model_with_those_blocks(bits):
    """All blocks kept: the same logits; a subset: what running those blocks in order computes (the
    one block-subset helper of prune, distill and the truncation bench; quantized models too)."""
    from minillm.quantize import quantize_model
    torch.manual_seed(0)
    model = Transformer(preset("nano", family="llama", vocab_size=40, n_layer=3, block_size=32, n_embd=64)).eval()
    if bits:
        model = quantize_model(model, bits, 32)
    x = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        assert torch.equal(checkpoint.keep_blocks(model, [0, 1, 2])(x), model(x))
        kept = checkpoint.keep_blocks(model, [2, 0])
        assert kept.config.n_layer == 2 and [b.attn.layer for b in kept.blocks] == [0, 1]
        model.blocks = torch.nn.ModuleList([model.blocks[2], model.blocks[0]])  # the same by hand (no cache used)
        model.config = kept.config
        assert torch.equal(kept(x), model(x))
    with pytest.raises(ValueError, match="distinct indices"):
        checkpoint.keep_blocks(kept, [1, 1])
