"""Weight-only int8 / int4: the quantization math, the kernels against a float reference, whole-model
logits against the float model, checkpoint round trips, and clear errors."""

import copy
import json

import pytest
import torch
from safetensors import safe_open

from minillm import quantize as Q
from minillm.checkpoint import CheckpointError, load_model, save_model
from minillm.config import preset
from minillm.kv_cache import KVCache
from minillm.model import Transformer
from minillm.quantize.__main__ import main as quantize_main
from minillm.tokenizer import CharTokenizer
from tiny import tiny_model

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak.\n"
SCHEMES = [(8, None, 8), (4, 32, 8), (4, 64, 4)]  # (bits, group_size, embedding_bits)


# the tiny models' shape (tests/tiny.py): n_embd 64 so int4 groups of 32 and 64 fit, vocab not a multiple of 16
SHAPE = dict(n_embd=64, vocab_size=CharTokenizer.from_text(TEXT).vocab_size)


# ----------------------------------------------------------------------------- the math

def test_int8_error_is_at_most_half_a_step():
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different size
    q, scale = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and q.abs().max() <= 127
    err = (w - q.float() * scale.float()[:, None]).abs()
    assert (err <= 0.5 * scale.float()[:, None] + 1e-7).all()


def test_int4_error_is_at_most_half_a_step():
    w = torch.randn(32, 128)
    w[:4] += 50.0  # groups far from zero: the bf16 rounding of `zero` matters there
    q, scale, zero = Q.quantize_int4(w, 32)
    assert q.dtype == torch.uint8 and q.max() <= 15 and scale.shape == zero.shape == (32, 4)
    err = (w - Q.dequantize_int4(q, scale, zero)).abs().view(32, 4, 32)
    # half a step, plus the rounding of zero to bf16 (relative 2^-9) at the edges of the range
    bound = 0.5 * scale.float() + zero.float().abs() * 2**-9 + 1e-6
    assert (err <= bound[..., None]).all()
    assert (err > 0).any()  # it is lossy: the check above compares something


def test_nibbles_round_trip():
    q = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    p = Q.pack_nibbles(q)
    assert p.shape == (5, 6) and torch.equal(p[:, 0], q[:, 0] | (q[:, 1] << 4))
    assert torch.equal(Q.unpack_nibbles(p), q)


@pytest.mark.parametrize("out_features", [48, 65])  # 65: padded to 80 rows for the kernel
def test_int4_linear_codes_come_back_exactly(out_features):
    lin = torch.nn.Linear(64, out_features, bias=True)
    m = Q.int4_linear(lin, 32)
    q, scale, zero = Q.quantize_int4(lin.weight.detach(), 32)
    q2, scale2, zero2 = m.codes()
    assert torch.equal(q, q2) and torch.equal(scale, scale2) and torch.equal(zero, zero2)


@pytest.mark.parametrize("bits", [8, 4])
def test_kernels_equal_float_matmul_of_the_dequantized_weight(bits):
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 80, bias=True)
    x = torch.randn(3, 5, 128).to(torch.bfloat16)
    if bits == 8:
        m = Q.int8_linear(lin)
        w = m.weight.float() * m.scales.float()[:, None]
    else:
        m = Q.int4_linear(lin, 64)
        w = Q.dequantize_int4(*Q.quantize_int4(lin.weight.detach(), 64))
    ref = x.float() @ w.t() + lin.bias.detach().to(torch.bfloat16).float()
    y = m(x)
    assert y.shape == (3, 5, 80) and y.dtype == torch.bfloat16
    # the kernels accumulate in float and round the output to bf16 (relative 2^-8)
    torch.testing.assert_close(y.float(), ref, rtol=2**-7, atol=1e-2)


# ----------------------------------------------------------------------------- whole models

@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("bits,group,ebits,tol", [(8, None, 8, 0.02), (4, 32, 8, 0.15), (4, 32, 4, 0.2)])
def test_quantized_logits_close_to_float(family, bits, group, ebits, tol):
    """Tolerance: relative L2 error of the logits, ||q - f|| / ||f||, on a random tiny model
    (random weights have no outliers, so this mostly measures the rounding step)."""
    model = tiny_model(family, **SHAPE)
    x = torch.randint(model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(x)
        qm = Q.quantize_model(copy.deepcopy(model), bits, group, ebits)
        out = qm(x).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < tol, rel


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_quantized_cached_decode_equals_uncached(family):
    """The KV cache of a quantized model is bf16 (not the codes' integer dtype), and one-token steps
    give the logits of a full forward."""
    qm = Q.quantize_model(tiny_model(family, **SHAPE), 4, 32)
    x = torch.randint(qm.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = KVCache.for_model(qm)
    assert cache.k[0].dtype == torch.bfloat16
    with torch.inference_mode():
        full = qm(x).float()
        steps = [qm(x[:, :8], cache, 0)] + [qm(x[:, i:i + 1], cache, i) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1).float(), full, rtol=0.03, atol=0.03)


@pytest.mark.parametrize("family,tie", [("gpt2", True), ("llama", False)])
@pytest.mark.parametrize("bits,group,ebits", SCHEMES)
def test_checkpoint_round_trip(tmp_path, family, tie, bits, group, ebits):
    tok = CharTokenizer.from_text(TEXT)
    qm = Q.quantize_model(tiny_model(family, tie_embeddings=tie, **SHAPE), bits, group, ebits)
    path = tmp_path / "q.safetensors"
    save_model(path, qm, tok, {"source": "test"})
    meta = json.loads(safe_open(str(path), framework="pt").metadata()["quantization"])
    assert meta == {"bits": bits, "group_size": group, "embedding_bits": ebits}

    loaded = load_model(path)
    x = torch.tensor([tok.encode("Before we proceed")])
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), qm(x))
    assert loaded.model.quantization == qm.quantization
    assert isinstance(loaded.model.blocks[0].mlp.up_proj, Q.Int8Linear if bits == 8 else Q.Int4Linear)
    assert isinstance(loaded.model.lm_head, Q.Int8Linear if ebits == 8 else Q.Int4Linear)

    again = tmp_path / "again.safetensors"  # a loaded model saves the same tensors back
    save_model(again, loaded.model, loaded.tokenizer, loaded.provenance)
    with safe_open(str(path), framework="pt") as a, safe_open(str(again), framework="pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert ("lm_head.weight" in a.keys()) == (not tie)  # a tied head is stored once, as tok_emb
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_int4_file_is_smaller(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = tiny_model("llama", **SHAPE)
    model.config.vocab_size  # noqa: B018
    sizes = {}
    for name, m in [("f32", model), ("int8", Q.quantize_model(copy.deepcopy(model), 8)),
                    ("int4", Q.quantize_model(copy.deepcopy(model), 4, 32, 4))]:
        save_model(tmp_path / f"{name}.safetensors", m, tok)
        sizes[name] = (tmp_path / f"{name}.safetensors").stat().st_size
    assert sizes["int4"] < sizes["int8"] < sizes["f32"]


def test_cli_end_to_end(tmp_path, capsys):
    tok = CharTokenizer.from_text(TEXT)
    src, out = tmp_path / "f.safetensors", tmp_path / "q.safetensors"
    save_model(src, tiny_model("llama", **SHAPE), tok)
    assert quantize_main([str(src), "--out", str(out), "--bits", "4", "--group-size", "64"]) == 0
    assert "int4 group 64" in capsys.readouterr().out
    assert load_model(out).model.quantization == {"bits": 4, "group_size": 64, "embedding_bits": 8}
    assert quantize_main([str(out), "--out", str(tmp_path / "qq.safetensors"), "--bits", "8"]) == 2
    assert "already quantized" in capsys.readouterr().err and not (tmp_path / "qq.safetensors").exists()


# ----------------------------------------------------------------------------- int8 on any input width

@pytest.mark.parametrize("in_features", [36, 8, 17, 100])
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_any_input_width_equals_float_matmul(in_features, rows):
    """torch's CPU int8 kernel needs in_features % 16 == 0: K = 36 crashed (SIGSEGV) for several rows
    and gave garbage (NaN, 1e30) for one. Int8Linear pads K with zero columns, which changes no sum."""
    torch.manual_seed(in_features)
    lin = torch.nn.Linear(in_features, 24, bias=True)
    m = Q.int8_linear(lin)
    assert m.weight.shape == (24, -(-in_features // 16) * 16) and (m.weight[:, in_features:] == 0).all()
    q, scale = Q.quantize_int8(lin.weight.detach())
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    ref = x.float() @ (q.float() * scale.float()[:, None]).t() + lin.bias.detach().to(torch.bfloat16).float()
    torch.testing.assert_close(m(x).float(), ref, rtol=2**-7, atol=1e-2)
    state = m.state_dict()  # the checkpoint form is unpadded; loading pads again
    assert torch.equal(state["weight"], q)
    again = Q.Int8Linear(in_features, 24, bias=True)
    again.load_state_dict(state)
    assert torch.equal(again(x), m(x))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_int8_model_of_width_36_saves_loads_and_matches_float(tmp_path, family):
    """A char model with --n-embd 36 (issue 14): quantize, save, load, and one-row and many-row logits
    close to the float model's; the tied head (the embedding's codes, padded) too."""
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = Transformer(preset("nano", family=family, n_embd=36, n_head=6, vocab_size=tok.vocab_size)).eval()
    src, out = tmp_path / "f.safetensors", tmp_path / "q8.safetensors"
    save_model(src, model, tok)
    assert quantize_main([str(src), "--out", str(out), "--bits", "8"]) == 0
    loaded = load_model(out).model
    with safe_open(str(out), framework="pt") as f:
        assert f.get_slice("blocks.0.attn.q_proj.weight").get_shape() == [36, 36]  # the file: unpadded
    x = torch.tensor([tok.encode("Before we proceed")])
    with torch.inference_mode():
        for inp in (x[:, :1], x):
            ref, got = model(inp), loaded(inp).float()
            assert got.isfinite().all()
            assert ((got - ref).norm() / ref.norm()).item() < 0.02


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("args,match", [
    ((3, None), "bits must be one of"),
    ((4, None), "group_size must be one of"),
    ((4, 16), "group_size must be one of"),
    ((8, None, 2), "embedding_bits must be one of"),
    ((8, None, 4), "group_size must be one of"),  # int4 embedding needs a group size too
])
def test_bad_scheme_is_a_clear_error(args, match):
    with pytest.raises(ValueError, match=match):
        Q.quantize_model(tiny_model("llama", **SHAPE), *args)


def test_group_that_does_not_divide_in_features_names_the_tensor():
    model = Transformer(preset("nano", family="llama", n_embd=96, n_head=4, vocab_size=32))  # K = 96
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj\.weight: in_features 96 .* group_size 64 .*\[32\]"):
        Q.quantize_model(model, 4, 64)


def test_bad_quantization_metadata_in_a_file(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    path = tmp_path / "q.safetensors"
    save_model(path, Q.quantize_model(tiny_model("llama", **SHAPE), 8), tok)
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    from safetensors.torch import save_file
    meta["quantization"] = json.dumps({"bits": 5, "group_size": None, "embedding_bits": 8})
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="bad.safetensors: quantization bits must be one of"):
        load_model(bad)
    meta.pop("quantization")  # codes without the entry: the float loader sees the wrong tensors
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="unexpected tensor|dtype|shape"):
        load_model(bad)


# ----------------------------------------------------------------------------- CUDA (runs only where there is one)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_kernels_equal_float_matmul(bits):
    torch.manual_seed(1)
    lin = torch.nn.Linear(256, 96, bias=True).cuda()
    x = torch.randn(3, 256, device="cuda").to(torch.bfloat16)
    m = Q.int8_linear(lin) if bits == 8 else Q.int4_linear(lin, 64)
    if bits == 8:
        w = m.weight.float() * m.scales.float()[:, None]
    else:
        w = Q.dequantize_int4(*Q.quantize_int4(lin.weight.detach(), 64))
        assert all(torch.equal(a, b) for a, b in zip(m.codes(), Q.quantize_int4(lin.weight.detach(), 64)))
    ref = x.float() @ w.t() + lin.bias.detach().to(torch.bfloat16).float()
    torch.testing.assert_close(m(x).float(), ref, rtol=2**-7, atol=1e-2)


@cuda
@pytest.mark.parametrize("bits,group,ebits", SCHEMES)
def test_cuda_model_matches_cpu_and_loads_onto_cuda(tmp_path, bits, group, ebits):
    """Quantized on CPU, saved, loaded straight onto CUDA (int4 repacked for the CUDA kernel):
    the same logits as on CPU, up to bf16 rounding of differently ordered sums."""
    tok = CharTokenizer.from_text(TEXT)
    qm = Q.quantize_model(tiny_model("llama", **SHAPE), bits, group, ebits)
    save_model(tmp_path / "q.safetensors", qm, tok)
    on_gpu = load_model(tmp_path / "q.safetensors", device="cuda").model
    x = torch.tensor([tok.encode("Before we proceed")])
    with torch.inference_mode():
        cpu, gpu = qm(x).float(), on_gpu(x.cuda()).float().cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0.03, atol=0.03)
    moved = copy.deepcopy(qm).to("cuda").to("cpu")  # there and back: the codes survive both repacks
    with torch.inference_mode():
        assert torch.equal(moved(x), qm(x))
