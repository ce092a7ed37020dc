"""Our int4 kernel (minillm/kernels/int4_vnni.cpp, the speed layer's int4 route) against its exact
reference and torch's kernel (quantized.py's route)."""

import pytest
import torch

from minillm.kernels import VNNIInt4Linear, has_vnni, int4_vnni, int8_rows, torch_layout_codes, use_int4_kernel
from minillm.quantized import Int4Linear, dequantize_int4

needs_vnni = pytest.mark.skipif(not has_vnni(), reason="our int4 kernel is for CPUs with AVX-512 VNNI; "
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
    use_int4_kernel(ours)
    return (q, scale, zero), theirs, ours


@needs_vnni
def test_the_kernel_builds_where_the_cpu_has_vnni():
    """Where it can run it must build (a compiler and ninja are in the test install): else int4 models
    would quietly take torch's slower kernel."""
    assert int4_vnni() is not None
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
    x = torch.randn(40, k) * torch.rand(40, 1) * 3
    with torch.inference_mode():
        for m in list(range(1, 18)) + [40]:
            ref = int8_rows(x[:m]).double() @ w.t()
            top = ref.abs().max()
            ours = torch.ops.minillm.int4_vnni_mm(x[:m], lin.packed, lin.scale_zero, group_size)[:, :n].double()
            assert (ours - ref).abs().max() <= 1e-6 * top, f"{m} rows"
            out = lin(x[:m]).double()
            assert ((out - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6 * top).all(), f"{m} rows"
            assert (theirs(x[:m]).double() - ours).abs().max() <= 0.015 * top, f"{m} rows"


@needs_vnni
def test_a_row_gets_the_same_numbers_whatever_the_row_count():
    _, _, lin = layers(576, 1536, 32, seed=3)
    x = torch.randn(40, 1536)
    with torch.inference_mode():
        alone = torch.cat([lin(x[i:i + 1]) for i in range(40)])
        for m in (2, 5, 16, 17, 33, 40):
            assert torch.equal(lin(x[:m]), alone[:m]), f"{m} rows"


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
    monkeypatch.setenv("MINILLM_INT4_KERNEL", "fastest")
    with pytest.raises(ValueError, match="MINILLM_INT4_KERNEL='fastest'"):
        int4_vnni.__wrapped__()
    monkeypatch.setenv("MINILLM_INT4_KERNEL", "aten")
    assert int4_vnni.__wrapped__() is None


@needs_vnni
def test_speed_up_routes_a_models_int4_layers_and_keeps_its_logits_close():
    """speed_up gives every Int4Linear (the tied int4 head too) our kernel; the logits of a prompt stay
    within 2% (relative L2) of quantized.py's route on a tiny llama model (int4 g32, int4 embedding)."""
    import copy
    from minillm.quantize import quantize_model
    from minillm.speed import speed_up
    from tiny import tiny_model
    reference = quantize_model(tiny_model("llama", n_embd=64, n_kv_head=2), 4, 32, embedding_bits=4)
    fast = speed_up(copy.deepcopy(reference))
    routed = [type(m) for m in fast.modules() if isinstance(m, Int4Linear)]
    assert routed and set(routed) == {VNNIInt4Linear}
    tokens = torch.randint(0, reference.config.vocab_size, (2, 24))
    with torch.inference_mode():
        a, b = reference(tokens).float(), fast(tokens).float()
    assert (a - b).norm() / a.norm() < 0.02
