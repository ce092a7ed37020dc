"""Our int4/int8 kernel (minillm/kernels/vnni.cpp, the speed layer's route for quantized layers) against
its exact reference and torch's kernels (quantized.py's route)."""

import pytest
import torch

from minillm.kernels import VNNIInt4Linear, VNNIInt8Linear, has_vnni, int8_rows, torch_layout_codes, use_kernel, vnni
from minillm.quantized import Int4Linear, Int8Linear, dequantize_int4

needs_vnni = pytest.mark.skipif(not has_vnni(), reason="our int4/int8 kernel is for CPUs with AVX-512 VNNI; "
                                f"this one reports {torch.backends.cpu.get_cpu_capability()} without it")


def codes(n, k, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // group_size, generator=g) * 0.02 + 1e-3).bfloat16()
    zero = (torch.randn(n, k // group_size, generator=g) * 0.01).bfloat16()
    return q, scale, zero


def layers(n, k, group_size, seed=0):
    """The same codes as quantized.py's Int4Linear (torch's kernel) and as the speed layer's route (ours)."""
    q, scale, zero = codes(n, k, group_size, seed)
    theirs, ours = Int4Linear(k, n, bias=False, group_size=group_size), Int4Linear(k, n, bias=False, group_size=group_size)
    theirs.set_codes(q, scale, zero)
    ours.set_codes(q, scale, zero)
    use_kernel(ours)
    return (q, scale, zero), theirs, ours


@needs_vnni
def test_the_kernel_builds_where_the_cpu_has_vnni():
    """Where it can run it must build (a compiler and ninja are in the test install): else int4 models
    would quietly take torch's slower kernel."""
    assert vnni() is not None
    _, _, ours = layers(32, 64, 32)
    assert type(ours) is VNNIInt4Linear and ours.packed.dim() == 1  # our layout (torch's is 2-D)


@needs_vnni
@pytest.mark.parametrize("n,k,group_size", [(576, 1536, 32), (200, 576, 64), (48, 256, 128), (16, 512, 256)])
def test_our_kernel_computes_dequantized_w_times_int8_x_and_is_close_to_torchs(n, k, group_size):
    """Every row count from 1 to 17 (one pass serves 16) and 40, padded rows (200 -> 208), each group
    size: in float32, within 1e-6 of the largest output from dequant(W) @ dequant(x8) in float64; the
    module's bf16 result within a bf16 step of that; torch's kernel (x in bf16) within 1.5% of the
    largest output of ours (the two round x differently)."""
    (q, scale, zero), theirs, lin = layers(n, k, group_size)
    w = dequantize_int4(q, scale, zero).double()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, k, generator=g) * torch.rand(40, 1, generator=g) * 3
    with torch.inference_mode():
        for m in list(range(1, 18)) + [40]:
            ref = int8_rows(x[:m]).double() @ w.t()
            top = ref.abs().max()
            ours = torch.ops.minillm.vnni_mm(x[:m], lin.packed, lin.scale_zero, group_size, 4)[:, :n].double()
            assert (ours - ref).abs().max() <= 1e-6 * top, f"{m} rows"
            out = lin(x[:m]).double()
            assert ((out - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6 * top).all(), f"{m} rows"
            assert (theirs(x[:m]).double() - ours).abs().max() <= 0.015 * top, f"{m} rows"


@needs_vnni
def test_a_row_gets_the_same_numbers_whatever_the_row_count():
    """And a bf16 x gets the float32 result of the same values rounded as torch rounds to bf16."""
    _, _, lin = layers(576, 1536, 32, seed=3)
    x = torch.randn(40, 1536)
    with torch.inference_mode():
        alone = torch.cat([lin(x[i:i + 1]) for i in range(40)])
        for m in (2, 5, 16, 17, 33, 40):
            assert torch.equal(lin(x[:m]), alone[:m]), f"{m} rows"
        xb, mm = x.bfloat16() * 1e3, vnni().mm
        assert torch.equal(mm(xb, lin.packed, lin.scale_zero, 32, 4), mm(xb.float(), lin.packed, lin.scale_zero, 32, 4).bfloat16())


@needs_vnni
def test_both_layouts_give_the_codes_back_exactly():
    """Ours (unpack), torch's without the identity matmul (what the route starts from), and the state
    dict: the portable nibbles, the same from either module."""
    (q, scale, zero), theirs, ours = layers(200, 576, 32, seed=1)
    for got in (ours.codes(), torch_layout_codes(theirs), theirs.codes()):
        assert all(torch.equal(a, b) for a, b in zip(got, (q, scale, zero)))
    assert torch.equal(ours.state_dict()["weight"], q[:, 0::2] | q[:, 1::2] << 4)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


@needs_vnni
def test_a_compiled_call_runs_our_kernel_and_gives_the_eager_numbers():
    _, _, lin = layers(64, 256, 32, seed=2)
    x = torch.randn(3, 256)
    with torch.inference_mode():
        eager = lin(x) * 2
        compiled = torch.compile(lambda t: lin(t) * 2)(x)
    assert torch.equal(compiled, eager)


def test_the_kernel_choice_is_checked(monkeypatch):
    monkeypatch.setenv("MINILLM_QUANT_KERNEL", "fastest")
    with pytest.raises(ValueError, match="MINILLM_QUANT_KERNEL='fastest'"):
        vnni.__wrapped__()
    monkeypatch.setenv("MINILLM_QUANT_KERNEL", "aten")
    assert vnni.__wrapped__() is None


@needs_vnni
@pytest.mark.parametrize("embedding_bits", [4, 8])
def test_speed_up_routes_a_models_int4_layers_and_keeps_its_logits_close(embedding_bits):
    """speed_up gives every Int4Linear and the tied head (int4 or int8) our kernel; the logits of a prompt
    stay within 2% (relative L2) of quantized.py's route on a tiny llama model (int4 g32)."""
    import copy
    from minillm.quantize import quantize_model
    from minillm.speed import speed_up
    from tiny import tiny_model
    reference = quantize_model(tiny_model("llama", n_embd=64, n_kv_head=2), 4, 32, embedding_bits=embedding_bits)
    fast = speed_up(copy.deepcopy(reference))
    routed = [type(m) for m in fast.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert len(routed) == 1 + 7 * reference.config.n_layer
    assert type(fast.lm_head) is (VNNIInt4Linear if embedding_bits == 4 else VNNIInt8Linear)
    assert set(routed) == {VNNIInt4Linear, type(fast.lm_head)}
    tokens = torch.randint(0, reference.config.vocab_size, (2, 24))
    with torch.inference_mode():
        a, b = reference(tokens).float(), fast(tokens).float()
    assert (a - b).norm() / a.norm() < 0.02


@needs_vnni
def test_stacked_q_k_v_and_gate_up_give_each_layer_its_own_numbers():
    """speed_up multiplies q|k|v and gate|up as one matrix each (kernels.StackedInt4) on a tiny Qwen-like
    llama (q, k, v biases; tied int4 head): each part's output bit for bit the layer's own, the logits
    bit for bit those of the same model with the stacks unused, the state dict unchanged; a compiled
    call takes the stack too; a layer given new codes later is multiplied on its own again."""
    import copy
    from minillm.quantize import quantize_model
    from minillm.speed import SwiGLUMLP, speed_up
    from tiny import tiny_model
    reference = quantize_model(tiny_model("llama", n_embd=64, n_kv_head=2, qkv_bias=True), 4, 32, embedding_bits=4)
    with torch.no_grad():
        for name, b in reference.named_buffers():
            if name.endswith("bias"):
                b.normal_()  # the converted biases are zero: make them count
    fast = speed_up(copy.deepcopy(reference))
    attn, mlp = fast.blocks[0].attn, fast.blocks[0].mlp
    assert attn.qkv_stack is not None and type(mlp) is SwiGLUMLP and mlp.gate_up is not None
    x = torch.randn(2, 5, 64).bfloat16()  # what an int4 model's layers get
    tokens = torch.randint(0, reference.config.vocab_size, (2, 24))
    with torch.inference_mode():
        for stack, parts in ((attn.qkv_stack, (attn.q_proj, attn.k_proj, attn.v_proj)), (mlp.gate_up, (mlp.gate_proj, mlp.up_proj))):
            for together, alone in zip(stack(x), [p(x) for p in parts], strict=True):
                assert torch.equal(together, alone)
        graphs = []
        compiled = torch.compile(lambda t: attn.qkv(t), dynamic=True, backend=lambda gm, _: graphs.append(gm) or gm.forward)(x)
        assert all(torch.equal(a, b) for a, b in zip(compiled, attn.qkv(x), strict=True))
        calls = [n for g in graphs for n in g.graph.nodes if "vnni_mm" in str(n.target)]
        assert len(graphs) == 1 and len(calls) == 1  # one graph, one kernel call for the three
        stacked = fast(tokens)
        assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in fast.state_dict().items())
        attn.q_proj.set_codes(*codes(attn.q_proj.out_features, 64, 32, seed=5))
        assert not attn.qkv_stack.valid
        assert torch.equal(attn.qkv(x)[0], attn.q_proj(x))
        for block in fast.blocks:
            block.attn.qkv_stack, block.mlp.__class__ = None, type(reference.blocks[0].mlp)
        fast.blocks[0].attn.q_proj.set_codes(*reference.blocks[0].attn.q_proj.codes())
        assert torch.equal(fast(tokens), stacked)


def int8_layers(n, k, seed=0):
    """The same int8 codes as quantized.py's Int8Linear (torch's kernel) and as the speed layer's route."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).bfloat16()
    layers = []
    for _ in range(2):
        lin = Int8Linear(k, n, bias=False)
        lin.scales = scale.clone()
        lin.set_codes(q.clone())
        layers.append(lin)
    use_kernel(layers[1])
    return (q, scale), *layers


@needs_vnni
@pytest.mark.parametrize("n,k", [(200, 576), (48, 1536), (16, 64)])
def test_our_int8_route_computes_dequantized_w_times_int8_x(n, k):
    """int8 layers (the int4 models' head): every row count 1..17 and 40 within 1e-6 of the largest output
    of dequant(W) @ dequant(x8) in float64, torch's kernel within 1.5%, a row's numbers the same whatever
    the row count; the codes and the state dict back exactly; .to(another device) and load_state_dict."""
    (q, scale), theirs, lin = int8_layers(n, k)
    assert type(lin) is VNNIInt8Linear and lin.weight.dim() == 1
    w = (q.double() * scale.double()[:, None])
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, k, generator=g) * torch.rand(40, 1, generator=g) * 3
    with torch.inference_mode():
        alone = torch.cat([lin(x[i:i + 1]) for i in range(40)])
        for m in list(range(1, 18)) + [40]:
            ref = int8_rows(x[:m]).double() @ w.t()
            top = ref.abs().max()
            ours = torch.ops.minillm.vnni_mm(x[:m], lin.weight, lin.scale_zero, k, 8)[:, :n].double()
            assert (ours - ref).abs().max() <= 1e-6 * top, f"{m} rows"
            assert (theirs(x[:m]).double() - ours).abs().max() <= 0.015 * top, f"{m} rows"
            assert torch.equal(lin(x[:m]), alone[:m]), f"{m} rows"
    assert torch.equal(lin.codes(), q) and lin.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(lin.state_dict().values(), theirs.state_dict().values()))
    (q2, scale2), other, _ = int8_layers(n, k, seed=1)
    lin.load_state_dict(other.state_dict())
    assert type(lin) is VNNIInt8Linear and torch.equal(lin.codes(), q2)
    with torch.inference_mode():
        assert (lin(x).double() - other(x).double()).abs().max() <= 0.015 * other(x).abs().max()
    moved = lin.to("meta")
    assert type(moved) is Int8Linear and moved.weight.shape == (n, k) and moved.weight.is_meta


def test_an_int8_width_the_kernel_cannot_take_keeps_torchs_route():
    _, _, lin = int8_layers(32, 48)  # 48 inputs: not a whole number of the kernel's 32-input blocks
    assert type(lin) is Int8Linear
