"""The speed layer computes what the reference model computes: each route against model.py's own."""

import ctypes
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from minillm.config import preset
from minillm.kernels import has_vnni, vnni
from minillm.kv_cache import KVCache
from minillm.model import Transformer
from minillm.speed import (ROUTES, BlockedLinear, FewRowLinear, GQADecodeAttention, OneQueryAttention, batch_invariant,
                           compile_decode, few_row_route, prepack, speed_up)

# Where the CPU has AVX-512 VNNI our kernels must build (tests/test_int4_kernel.py fails otherwise), so
# these run there; elsewhere there is no kernel to test.
needs_our_kernel = pytest.mark.skipif(not has_vnni(), reason="our few-row kernel (minillm/kernels/rows.cpp) is "
                                      "built on CPUs with AVX-512 VNNI only")
FAMILIES = {"gpt2": dict(family="gpt2"), "llama-gqa": dict(family="llama", n_kv_head=2)}


def make(name, **kw):
    torch.manual_seed(0)
    return Transformer(preset("nano", vocab_size=97, **{**FAMILIES[name], **kw})).eval()


@pytest.mark.parametrize("bias", [True, False])
def test_few_row_linear_equals_nn_linear(bias):
    torch.manual_seed(0)
    ref = torch.nn.Linear(48, 40, bias=bias)
    lin = torch.nn.Linear(48, 40, bias=bias)
    lin.load_state_dict(ref.state_dict())
    lin.__class__ = FewRowLinear
    for shape in [(1, 48), (2, 48), (1, 5, 48), (2, 4, 48), (3, 3, 48), (9, 48)]:  # 1 and 9 rows: the plain path
        x = torch.randn(*shape)
        with torch.no_grad():
            y, want = lin(x), ref(x)
        assert y.shape == want.shape
        torch.testing.assert_close(y, want, rtol=0, atol=1e-5)
    x = torch.randn(3, 48, requires_grad=True)  # with grad: nn.Linear itself, gradients as usual
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


@pytest.fixture(params=[pytest.param(r, marks=needs_our_kernel) if r == "own" else r for r in ROUTES])
def few_row_route_forced(request, monkeypatch):
    """Each few-row route in turn, whatever this machine's probe would choose, for any matrix size."""
    monkeypatch.setenv("MINILLM_FEW_ROWS", request.param)
    monkeypatch.setattr(FewRowLinear, "MIN_WEIGHTS", 0)  # small matrices of real widths take the route too
    few_row_route.cache_clear()
    yield request.param
    few_row_route.cache_clear()


# (out, in) with the real models' reductions: SmolLM2-135M (576, 1536 inputs), Qwen2.5-1.5B (1536, 8960)
REAL_WIDTHS = [(192, 576), (64, 1536), (48, 8960)]


def assert_fp32_close(lin: FewRowLinear, rows: range, generator=None):
    """Every output of lin on 1..16 rows within 4 eps (fp32's 2^-23) times the sum of the absolute
    products (|x| @ |W|^T + |b|) of the float64 result: the componentwise bound of a dot product's
    rounding (K eps at worst; every route measured at most 1.7 eps here)."""
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    eps = torch.finfo(torch.float32).eps
    for n in rows:
        x = torch.randn(n, lin.in_features, generator=generator)
        with torch.no_grad():
            y = lin(x)
        want = torch.nn.functional.linear(x.double(), w, b)
        scale = x.double().abs() @ w.abs().t() + b.abs()
        assert y.dtype == torch.float32 and ((y.double() - want).abs() <= 4 * eps * scale).all()


@pytest.mark.parametrize("packed", [False, True], ids=["as-is", "prepacked"])
@pytest.mark.parametrize("out_in", REAL_WIDTHS)
def test_few_row_route_fp32_matches_float64(few_row_route_forced, out_in, packed):
    """fp32, 1..16 rows, each route (oneDNN on W as it is or prepacked, nn.Linear): see assert_fp32_close."""
    torch.manual_seed(0)
    lin = FewRowLinear.wrap(torch.randn(*out_in), torch.randn(out_in[0]))
    if packed:  # prepack packs only where the route is oneDNN's
        assert (prepack(nn.ModuleList([lin])) > 0) == (few_row_route_forced == "onednn")
    assert_fp32_close(lin, range(1, 17))


def test_prepacked_weight_changed_in_place_is_seen(few_row_route_forced):
    torch.manual_seed(0)
    lin = FewRowLinear.wrap(torch.randn(64, 1536), torch.randn(64))
    prepack(nn.ModuleList([lin]))
    with torch.no_grad():
        lin.weight.mul_(-2)  # as an optimizer step would: the packed copy is stale now
    assert_fp32_close(lin, [5, 9])


def test_few_row_route_bf16_within_a_rounding_step(few_row_route_forced):
    """bf16: within one bf16 step of the largest output (2^-8 of it) of the float64 product."""
    torch.manual_seed(0)
    w = torch.randn(64, 1536).bfloat16()
    lin = FewRowLinear.wrap(w)
    for rows in (1, 2, 5, 9, 16):
        x = torch.randn(rows, 1536).bfloat16()
        with torch.no_grad():
            y = lin(x)
        want = x.double() @ w.double().t()
        assert y.dtype == torch.bfloat16 and (y.double() - want).abs().max() <= want.abs().max() * 2 ** -8


def test_few_row_route_is_taken_and_chosen_once(few_row_route_forced):
    torch.manual_seed(0)
    w, x = torch.randn(40, 48), torch.randn(5, 48)
    with torch.no_grad():
        y = FewRowLinear.wrap(w)(x)
    want = {"own": lambda: vnni().rows_mm(x, w), "linear": lambda: torch.nn.functional.linear(x, w),
            "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")}[few_row_route_forced]()
    assert torch.equal(y, want)
    assert few_row_route.cache_info().currsize == 1  # probed (here: read from the variable) once


def test_few_row_probe_picks_a_route(monkeypatch):
    monkeypatch.delenv("MINILLM_FEW_ROWS", raising=False)
    few_row_route.cache_clear()
    try:
        assert few_row_route(torch.float32) in ROUTES
        monkeypatch.setenv("MINILLM_FEW_ROWS", "mkl")
        few_row_route.cache_clear()
        with pytest.raises(ValueError, match="MINILLM_FEW_ROWS"):
            few_row_route(torch.float32)
    finally:
        few_row_route.cache_clear()


@needs_our_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_in", [(100, 37), (7, 16), (100, 64), (17, 96), *REAL_WIDTHS, (1536, 8960)])
def test_own_few_row_kernel_gives_a_row_the_same_numbers_in_any_call(dtype, out_in):
    """kernels/rows.cpp: a row's outputs are bit for bit the same whatever the call's other rows and
    their number (1..16, the row at every place), for widths that are not multiples of its 16 lanes
    or 512-input chunks and counts of outputs that are not multiples of its tiles or groups (bf16 on
    a CPU with AMX: the tile unit's route for widths that are multiples of 32; 100 and 17 outputs end
    in a tile of 4 and of 1)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*out_in, generator=g).to(dtype)
    x = torch.randn(16, out_in[1], generator=g).to(dtype)
    alone = torch.cat([vnni().rows_mm(x[i:i + 1], w) for i in range(16)])
    assert alone.dtype == dtype and alone.shape == (16, out_in[0])
    for m in range(1, 17):
        assert torch.equal(vnni().rows_mm(x[:m], w), alone[:m])
        assert torch.equal(vnni().rows_mm(x[16 - m:], w), alone[16 - m:])
    want = x.double() @ w.double().t()  # and it is the product: float32 sums (see the two tests above)
    assert (alone.double() - want).abs().max() <= want.abs().max() * (2 ** -8 if dtype == torch.bfloat16 else 1e-6)


@needs_our_kernel
def test_own_few_row_kernel_takes_the_tile_unit_where_the_cpu_has_one():
    """bf16 goes through AMX exactly where Linux reports the CPU's AMX-BF16 and grants this process the
    tiles (asked here as rows.cpp asks: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA))."""
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    has = {"amx_bf16", "amx_tile"} <= flags
    granted = has and ctypes.CDLL(None).syscall(158, 0x1023, 18) == 0  # 158: arch_prctl on x86-64
    assert vnni().amx_bf16() == granted


@needs_our_kernel
def test_own_few_row_kernel_refuses_what_it_cannot_multiply():
    w = torch.randn(8, 32)
    for x, wt in [(torch.randn(17, 32), w), (torch.randn(2, 31), w), (torch.randn(32), w),
                  (torch.randn(2, 32).bfloat16(), w), (torch.randn(2, 32).half(), w.half()),
                  (torch.randn(2, 32), w.t().contiguous().t())]:
        with pytest.raises(RuntimeError, match="rows_mm"):
            vnni().rows_mm(x, wt)


def test_few_row_route_own_is_refused_where_the_kernel_is_not_built(monkeypatch):
    monkeypatch.setenv("MINILLM_FEW_ROWS", "own")
    monkeypatch.setattr("minillm.speed.vnni", lambda: None)
    few_row_route.cache_clear()
    try:
        with pytest.raises(ValueError, match="MINILLM_FEW_ROWS=own: our kernel is not built here"):
            few_row_route(torch.float32)
    finally:
        few_row_route.cache_clear()


@pytest.mark.parametrize("name", FAMILIES)
def test_speed_up_keeps_every_logit(name):
    """Training forward, prefill, few-token verify and one-token decode: sped-up == reference."""
    model = make(name)
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    calls = [(0, 16), (16, 20), (20, 21), (21, 22)]  # prefill, verify 4, decode, decode
    with torch.no_grad():
        ref_full, cache = model(x), KVCache.for_model(model, 2)
        ref = [model(x[:, a:b], cache, a) for a, b in calls]
        speed_up(model)
        assert sum(isinstance(m, (FewRowLinear, GQADecodeAttention)) for m in model.modules()) > 0
        got_full, cache = model(x), KVCache.for_model(model, 2)
        got = [model(x[:, a:b], cache, a) for a, b in calls]
    torch.testing.assert_close(got_full, ref_full, rtol=0, atol=1e-5)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)


def test_gqa_decode_route_is_taken_and_equals_reference():
    model = make("llama-gqa")
    speed_up(model)
    attn = model.blocks[0].attn
    q = torch.randn(2, 4, 1, 8)  # (B, nh, 1, hd): one query token
    k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)  # (B, nkv, S, hd)
    fast = attn.attend(q, k, v, None)
    ref = super(GQADecodeAttention, attn).attend(q, k, v, None)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)


@needs_our_kernel
@pytest.mark.parametrize("B, nh, nkv, T, S, hd", [
    (1, 9, 3, 512, 512, 64),  # SmolLM2's heads, a 512-token prompt
    (1, 12, 2, 300, 300, 128),  # Qwen2.5-1.5B's
    (2, 4, 4, 37, 50, 16),  # no grouping, two rows, 13 cached positions before the queries
    (1, 6, 1, 100, 100, 48),  # head_dim not a multiple of the 64-key block
    (1, 9, 3, 17, 200, 64),  # few queries after many cached keys
])
def test_prompt_attention_kernel_matches_float64(B, nh, nkv, T, S, hd):
    """kernels/attention.cpp against the reference's written-out attention in float64: within what PyTorch's
    own float32 kernel (SDPA) gets, at most 2e-5 on outputs of magnitude ~1."""
    from minillm.kernels import causal_attention
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, nh, hd, generator=g).transpose(1, 2) * 2  # the layout Attention.project makes
    k, v = torch.randn(B, nkv, S + 9, hd, generator=g) * 2, torch.randn(B, nkv, S + 9, hd, generator=g)
    k, v = k[:, :, :S], v[:, :, :S]  # as a cache holds them: the first S of more positions
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    attn = make("llama-gqa").blocks[0].attn
    attn.cfg = preset("nano", family="llama", n_head=nh, n_kv_head=nkv, n_embd=nh * hd, attn_impl="manual")
    want = attn.attend(q.double(), k.double(), v.double(), mask)
    got = causal_attention(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert got.shape == want.shape
    assert (got.double() - want).abs().max() <= max(2e-5, 1.5 * (sdpa.double() - want).abs().max())


@needs_our_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, nh, nkv, T, S, hd", [
    (1, 9, 3, 1, 220, 64),  # SmolLM2's heads, a decode step after 219 positions
    (1, 12, 2, 5, 300, 128),  # Qwen2.5-1.5B's, a verification of 5
    (1, 14, 2, 16, 40, 64),  # Qwen2.5-0.5B's, 16 queries (the most), 24 cached positions
    (2, 4, 4, 3, 3, 16),  # no grouping, two rows, no cache (S == T)
    (1, 2, 1, 2, 70, 256),  # the widest head (16 vectors), an odd count of keys for the first query
    (1, 6, 1, 1, 1, 48),  # one key
])
def test_few_query_attention_kernel_matches_float64_and_each_row_is_its_own(B, nh, nkv, T, S, hd, dtype):
    """kernels/attention.cpp's few-query kernel (decode steps, verifications) against the reference's
    written-out attention in float64 on the same (rounded) inputs: float32 within 2e-5 or 1.5x SDPA's error,
    bf16 within a rounding of the output (2^-8 relative). Each query's row is bit for bit what a call with
    that query alone gives (a verification's positions get a one-token step's numbers)."""
    from minillm.kernels import few_query_attention
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(B, T, nh, hd, generator=g).transpose(1, 2) * 2).to(dtype)  # the layout Attention.project makes
    k, v = torch.randn(B, nkv, S + 9, hd, generator=g) * 2, torch.randn(B, nkv, S + 9, hd, generator=g)
    k, v = k[:, :, :S].to(dtype), v[:, :, :S].to(dtype)  # as a cache holds them: the first S of more positions
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    attn = make("llama-gqa").blocks[0].attn
    attn.cfg = preset("nano", family="llama", n_head=nh, n_kv_head=nkv, n_embd=nh * hd, attn_impl="manual")
    want = attn.attend(q.double(), k.double(), v.double(), mask)
    got = few_query_attention(q, k, v)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float32:
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        assert (got.double() - want).abs().max() <= max(2e-5, 1.5 * (sdpa.double() - want).abs().max())
    else:
        assert ((got.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-6).all()
    alone = [few_query_attention(q[:, :, t:t + 1], k[:, :, :S - T + t + 1], v[:, :, :S - T + t + 1]) for t in range(T)]
    assert torch.equal(torch.cat(alone, 2), got)


@needs_our_kernel
def test_our_attention_routes_are_taken_by_query_count_and_dtype(monkeypatch):
    """GQADecodeAttention gives more than 16 fp32 queries without grad to the prompt kernel, 1..16 fp32 or
    bf16 queries to the few-query kernel; SDPA the rest. The exact mode (OneQueryAttention) gives any number
    to the few-query kernel, which computes each query alone."""
    from minillm import kernels, speed
    calls = []
    for name in ("causal_attention", "few_query_attention"):
        monkeypatch.setattr(speed, name, lambda *a, _f=getattr(kernels, name), _n=name: calls.append(
            (_n[0], a[0].shape[2], a[0].dtype)) or _f(*a))
    model = speed_up(make("llama-gqa", n_embd=64))  # head_dim 16, 2 layers
    x = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x[:, :17], KVCache.for_model(model, 1), 0)  # a prompt of 17
        cache = KVCache.for_model(model, 1)
        model(x[:, :16], cache, 0)  # 16: a verification's size
        model(x[:, 16:17], cache, 16)  # a decode step
        cache = KVCache.for_model(model.bfloat16(), 1)
        model(x[:, :20], cache, 0)  # a bf16 prompt: SDPA
        model(x[:, 20:21], cache, 20)  # a bf16 step
    f32, bf16 = torch.float32, torch.bfloat16
    assert calls == [("c", 17, f32)] * 2 + [("f", 16, f32)] * 2 + [("f", 1, f32)] * 2 + [("f", 1, bf16)] * 2
    q, k = torch.zeros(1, 97, 17, 16), torch.zeros(1, 1, 17, 16)  # 97 query heads on one K/V head: too many
    with torch.no_grad():
        takes = model.float().blocks[0].attn.takes_our_kernel
        assert takes(q[:, :96], k, k) and not takes(q, k, k)
        assert takes(q[:, :96, :1], k, k) and not takes(torch.zeros(1, 1, 1, 272), *[torch.zeros(1, 1, 2, 272)] * 2)
    assert not takes(q[:, :96, :1], k, k)  # with grad: the reference
    with pytest.raises(RuntimeError, match="at most 96 query heads"):
        kernels.causal_attention(q, k, k)
    with pytest.raises(RuntimeError, match="all float32 or all bf16"):
        kernels.few_query_attention(q[:, :, :1], k.bfloat16(), k)
    calls.clear()
    with torch.no_grad():  # the exact mode: each query alone, any number of them in one few-query call
        batch_invariant(model, 4)(x[:, :20], KVCache.for_model(model, 1), 0)
    assert calls == [("f", 20, f32)] * 2


@needs_our_kernel
@pytest.mark.parametrize("B, H, T, hd", [(1, 9, 512, 64), (2, 2, 7, 128), (1, 4, 3, 10), (1, 3, 1, 64)])
def test_rope_kernel_gives_the_reference_numbers_bit_for_bit(B, H, T, hd):
    from minillm.kernels import rope
    from minillm.model import apply_rope
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, hd, generator=g).transpose(1, 2) * 3  # (B, H, T, hd) as Attention.project has it
    cos, sin = torch.randn(T, hd // 2, generator=g), torch.randn(T, hd // 2, generator=g)
    assert torch.equal(rope(x, cos, sin), apply_rope(x, cos, sin))
    assert torch.equal(rope(x.contiguous(), cos, sin), apply_rope(x, cos, sin))  # any strides but the last


@needs_our_kernel
@pytest.mark.parametrize("shape", [(1, 512, 576), (3, 40), (2, 5, 1536), (1, 1, 7)])
def test_rms_norm_kernel_within_a_rounding_step_of_the_reference(shape):
    from minillm.kernels import rms_norm
    from minillm.model import RMSNorm
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-5)
    norm.weight.data = torch.randn(shape[-1], generator=g)
    x = torch.randn(*shape, generator=g) * 3
    want = norm(x.double()).float()  # the same operations in float64
    got, ours_f32 = rms_norm(x, norm.weight, 1e-5), norm(x)
    assert got.shape == x.shape
    assert (got - want).abs().max() <= 4 * max(1e-7, (ours_f32 - want).abs().max()) + 1e-6 * want.abs().max()
    y = torch.randn(shape[-1], 3, generator=g).t()  # rows not contiguous: copied first
    torch.testing.assert_close(rms_norm(y, norm.weight, 1e-5), norm(y), rtol=1e-6, atol=1e-6)


@needs_our_kernel
@pytest.mark.parametrize("shape", [(1, 512, 1536), (3, 37), (1, 1, 8960)])
def test_swiglu_kernel_within_a_rounding_step_of_the_reference(shape):
    from minillm.kernels import swiglu
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(*shape, generator=g) * 4, torch.randn(*shape, generator=g)
    gate.view(-1)[:5] = torch.tensor([-100.0, -88.0, 0.0, 88.0, 100.0])  # e^-gate past float32's range and at 1
    want = torch.nn.functional.silu(gate.double()) * up.double()
    got, torch_f32 = swiglu(gate, up), torch.nn.functional.silu(gate) * up
    assert (got.double() - want).abs().max() <= 2 * (torch_f32.double() - want).abs().max() + 1e-7 * want.abs().max()
    assert ((got.double() - want).abs() <= 4e-7 * want.abs() + 1e-30).all()  # ~3 units in the last place


def test_speed_up_gives_rmsnorm_and_swiglu_their_one_pass_routes_and_grad_the_reference():
    from minillm.speed import FusedRMSNorm, SwiGLUMLP
    model = speed_up(make("llama-gqa"))
    norms = [m for m in model.modules() if isinstance(m, FusedRMSNorm)]
    assert len(norms) == 2 * 2 + 1  # two per block, the final one
    assert all(type(block.mlp) is SwiGLUMLP for block in model.blocks)
    x = torch.randn(2, 5, 32, requires_grad=True)
    norms[0](x).sum().backward()  # with grad: the reference's operations, gradients as usual
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_stacks_give_the_separate_layers_numbers_and_stand_aside_when_stale(dtype, monkeypatch):
    """speed_up multiplies float q|k|v (with Qwen's biases) and gate|up as one matrix each (StackedLinear),
    the layers' weights views of the stack. Few rows: the separate layers' numbers bit for bit (our kernel's
    sums per output do not depend on the matrix around them); a prompt: PyTorch's GEMM, within rounding.
    A layer given other weights makes the stack stale, and the layers run one by one."""
    from minillm.speed import StackedLinear, SwiGLUMLP
    model = make("llama-gqa", qkv_bias=True).to(dtype)
    reference = make("llama-gqa", qkv_bias=True).to(dtype)
    speed_up(model)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert type(attn.qkv_stack) is StackedLinear and type(mlp) is SwiGLUMLP and type(mlp.gate_up) is StackedLinear
    stack = attn.qkv_stack.linear.weight
    assert attn.q_proj.weight.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()  # views: no copy
    assert attn.q_proj.bias is not None and attn.v_proj.bias.untyped_storage().data_ptr() == \
        attn.qkv_stack.linear.bias.untyped_storage().data_ptr()
    x = torch.randn(2, 20, 32).to(dtype)
    with torch.no_grad():
        for rows in (1, 3, 20):  # 1 and 3 rows a batch row: our kernel where it runs; 20: the prompt route
            calls = []
            for s in (attn.qkv_stack, mlp.gate_up):
                s.linear.register_forward_hook(lambda m, i, o: calls.append(1))
            got = model.blocks[0](x[:, :rows], *block_inputs(model, rows))
            assert len(calls) == 2  # each stack took the call
            with monkeypatch.context() as m:
                m.setattr(StackedLinear, "takes", lambda self, x, layers: False)  # the layers one by one
                separate = model.blocks[0](x[:, :rows], *block_inputs(model, rows))
            assert len(calls) == 2
            for s in (attn.qkv_stack, mlp.gate_up):
                s.linear._forward_hooks.clear()
            if rows <= 3 and has_vnni():
                assert torch.equal(got, separate)
            else:
                torch.testing.assert_close(got, separate)
            want = reference.blocks[0](x[:, :rows], *block_inputs(reference, rows))
            torch.testing.assert_close(got, want, **({} if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)))
        attn.k_proj.weight = nn.Parameter(attn.k_proj.weight.detach() * 2)  # new numbers for one layer
        reference.blocks[0].attn.k_proj.weight.mul_(2)
        assert not attn.qkv_stack.takes(x, [attn.q_proj, attn.k_proj, attn.v_proj])
        assert attn.qkv_stack.linear is None  # stale for good: its copy let go
        mlp.up_proj = FewRowLinear.wrap(mlp.up_proj.weight.detach() * 3)  # another layer in the module
        reference.blocks[0].mlp.up_proj.weight.mul_(3)
        torch.testing.assert_close(model.blocks[0](x, *block_inputs(model, 20)),
                                   reference.blocks[0](x, *block_inputs(reference, 20)))
        assert mlp.gate_up.linear is None
        model.blocks[1].to(torch.float64)  # .to(): every weight new
        reference.blocks[1].to(torch.float64)
        torch.testing.assert_close(model.blocks[1](x.double(), *block_inputs(model, 20)),
                                   reference.blocks[1](x.double(), *block_inputs(reference, 20)))
        assert model.blocks[1].attn.qkv_stack.linear is None and model.blocks[1].mlp.gate_up.linear is None


def test_prepacked_layers_keep_their_own_route_instead_of_the_stack(few_row_route_forced):
    """prepack gives the layers oneDNN's copies of W where that is the route; the stack then stands aside."""
    from minillm.speed import StackedLinear
    model = speed_up(make("llama-gqa"))
    prepack(model)
    stack = model.blocks[0].attn.qkv_stack
    assert type(stack) is StackedLinear
    with torch.no_grad():
        attn = model.blocks[0].attn
        assert stack.takes(torch.zeros(1, 32), [attn.q_proj, attn.k_proj, attn.v_proj]) == (few_row_route_forced != "onednn")


def block_inputs(model, T):
    """A block's arguments for T tokens at positions 0..T-1 without a cache: rope tables, causal mask, no cache."""
    rope = (model.rope_cos[:T], model.rope_sin[:T])
    return rope, torch.ones(T, T, dtype=torch.bool).tril(), None, 0


def test_a_sped_up_model_trains_and_saves_as_the_plain_one(tmp_path):
    """With grad the layers run one by one, their gradients as usual, and the optimizer's steps reach the
    stack (the weights are views of it); a sped-up model saves (the views copied apart) and loads back."""
    from minillm.checkpoint import load_model, save_model
    from minillm.tokenizer import CharTokenizer
    model, reference = speed_up(make("llama-gqa").train()), make("llama-gqa").train()
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    for m in (model, reference):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(tokens).logsumexp(-1).mean().backward()
        opt.step()
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens))
        attn = model.blocks[0].attn
        assert attn.qkv_stack.takes(torch.zeros(1), [attn.q_proj, attn.k_proj, attn.v_proj])
    save_model(tmp_path / "m.safetensors", model, CharTokenizer("".join(chr(65 + i) for i in range(97))))
    loaded = load_model(tmp_path / "m.safetensors").model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), reference(tokens))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-gqa-int4", "llama-gqa-sped-up"])
def test_compiled_decode_gives_the_eager_greedy_tokens(name):
    """int4: through the speed layer's route (our kernel and its q|k|v, gate|up stacks where it runs).
    sped-up: a float model with head_dim 16 through speed_up: our kernels where they build (the few-query
    attention, RMSNorm, RoPE, SwiGLU, the few-row matmuls) inside the compiled graph (not the one C++ call
    that would take it: tests/test_one_call_step.py)."""
    from minillm.generate import stream_tokens
    from minillm.quantize import quantize_model
    from minillm.sampling import SamplingParams
    model = make(name.removesuffix("-int4").removesuffix("-sped-up"), **({"n_embd": 64} if "sped-up" in name else {}))
    with torch.no_grad():  # louder blocks: a random model's argmax then moves instead of echoing its input
        for n, p in model.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(30)
            if "sped-up" in name and n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(20)  # sharper attention, which then decides the tokens (else this one repeats one token)
    if name.endswith("int4"):
        model = speed_up(quantize_model(model, 4, 32))
    elif name.endswith("sped-up"):
        model = speed_up(model)
    prompt, greedy = [3, 14, 15, 92, 65], SamplingParams(temperature=0.0)
    eager = list(stream_tokens(model, prompt, 12, greedy))
    compile_decode(model, one_call=not name.endswith("sped-up"))
    compiled = list(stream_tokens(model, prompt, 12, greedy))
    assert compiled == eager and len(set(eager)) > 1  # a varied sequence, not one token repeated
    with torch.inference_mode():  # and the compiled step really ran (one-token cached calls go through it)
        cache = KVCache.for_model(model, 1, 8)
        model(torch.tensor([prompt]), cache, 0)
        eager_logits = Transformer.forward(model, torch.tensor([[7]]), cache, 5)
        cache.crop(5)
        compiled_logits = model.compiled_step(torch.tensor([[7]]), cache, 5, False)
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_compiled_step_checks_what_can_change_and_compiles_again():
    """compile_decode leaves out dynamo's checks on the modules (speed.CompiledStep): its own check must
    see what they saw. After each change the compiled one-token step gives the eager step's logits, and
    while nothing changes it keeps its graph. A second model of the same architecture gets its own.
    (int4: the compiled step rounds x to int8 after its own fused sums, which can move a step of the
    rounding; hence a tolerance of 2% of the largest logit there, each change moving them far more.)"""
    from minillm.quantize import quantize_int4, quantize_model

    def step_and_eager(model, tol=1e-4):
        with torch.inference_mode():
            cache = KVCache.for_model(model, 1, 8)
            model(torch.tensor([[3, 14, 15]]), cache, 0)
            compiled = model(torch.tensor([[7]]), cache, 3, last_only=True)
            cache.crop(3)
            eager = Transformer.forward(model, torch.tensor([[7]]), cache, 3, last_only=True)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=tol * eager.abs().max().item())
        return compiled

    def apart(a, b):
        return (a - b).abs().max() > 0.05 * b.abs().max()

    model = compile_decode(speed_up(make("llama-gqa")))
    first = step_and_eager(model)
    graph = model.compiled_step.step
    assert torch.equal(step_and_eager(model), first) and model.compiled_step.step is graph  # nothing changed
    other = compile_decode(speed_up(make("llama-gqa")))  # the same code, its own graph
    assert torch.equal(step_and_eager(other), first)
    assert torch.equal(step_and_eager(model), first) and model.compiled_step.step is graph  # (sample.py's partner)

    hook = model.blocks[1].register_forward_hook(lambda m, i, o: o + 1.0)  # a hook (the inspector's kind)
    assert apart(step_and_eager(model), first) and model.compiled_step.step is not graph
    hook.remove()
    assert torch.equal(step_and_eager(model), first) and model.compiled_step.step is graph  # its graph again

    attn = model.blocks[1].attn  # a layer of the same class, with a bias: only the assignment says so
    attn.o_proj = FewRowLinear.wrap(attn.o_proj.weight.detach().clone(), torch.full((attn.o_proj.out_features,), 1.0))
    changed = step_and_eager(model)
    assert apart(changed, first) and torch.equal(step_and_eager(other), first)

    assert other.to(torch.bfloat16) is other and step_and_eager(other, 2e-2).dtype == torch.bfloat16  # a .to()

    int4 = compile_decode(speed_up(quantize_model(make("llama-gqa"), 4, 32)))
    before = step_and_eager(int4, 2e-2)
    attn = int4.blocks[0].attn  # new codes for q: the q|k|v stack no longer holds them
    attn.q_proj.set_codes(*quantize_int4(torch.randn(attn.q_proj.out_features, attn.q_proj.in_features) * 3, 32))
    assert (attn.qkv_stack is None or not attn.qkv_stack.valid) and apart(step_and_eager(int4, 2e-2), before)


@pytest.mark.slow
def test_warm_up_compiles_every_step_a_decoding_loop_takes():
    """A loop's cache ends at its last fed position (KVCache.for_run), and the step that fills it takes
    another graph (dynamo specializes on a cache the whole tensor): warm_up compiles both, so a decode
    after it compiles nothing (it did compile again there, ~10 s on SmolLM2, counted as decoding)."""
    from minillm.generate import stream_tokens
    from minillm.sampling import SamplingParams
    from minillm.speed import warm_up
    model = compile_decode(speed_up(make("llama-gqa")))
    warm_up(model)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (3, 12):
            assert len(list(stream_tokens(model, [3, 14, 15, 92, 65], n, SamplingParams(temperature=0.0)))) == n


@needs_our_kernel
def test_compiled_step_of_a_float_model_is_one_graph_through_our_kernel():
    """The route is decided outside the graph (speed.ours_for): a compiled one-token step calls our
    float kernel for every linear layer, in one graph (a graph break per layer made it 1.7x slower)."""
    import functools
    torch._dynamo.reset()  # else Transformer.forward's code compiled by an earlier test may be reused
    model = speed_up(make("llama-gqa"))
    graphs = []
    step = torch.compile(functools.partial(Transformer.forward, model), dynamic=True,
                         backend=lambda gm, _: graphs.append(gm) or gm.forward)
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, 8)
        model(torch.tensor([[3, 14, 15]]), cache, 0)
        compiled = step(torch.tensor([[7]]), cache, 3, True)
        cache.crop(3)
        eager = model(torch.tensor([[7]]), cache, 3, last_only=True)
    calls = [n for g in graphs for n in g.graph.nodes if "rows_mm" in str(n.target)]
    linears = sum(isinstance(m, FewRowLinear) for m in model.modules())
    assert len(graphs) == 1 and len(calls) == linears > 0
    assert torch.equal(compiled, eager)


# ----------------------------------------------------------------------------- batch_invariant (exact mode)

def prefill_then_verify_vs_steps(model, prompt: torch.Tensor, drafts: torch.Tensor):
    """The logits of each position after the prompt's last token, read (a) by a prefill and one-token
    steps, (b) by a prefill of all but the last prompt token and one verify call of [last, drafts],
    (c) by one call over prompt + drafts from an empty cache (speculative's first verify)."""
    T = drafts.shape[1]
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1)
        steps = [model(prompt, cache, 0, last_only=True)[:, -1]]
        steps += [model(drafts[:, i:i + 1], cache, cache.length)[:, -1] for i in range(T - 1)]
        cache = KVCache.for_model(model, 1)
        model(prompt[:, :-1], cache, 0)
        verify = model(torch.cat([prompt[:, -1:], drafts[:, :-1]], 1), cache, cache.length)[0]
        whole = model(torch.cat([prompt, drafts[:, :-1]], 1), KVCache.for_model(model, 1), 0)[0, -T:]
    return torch.cat(steps), verify, whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("rows", [1, 3, 5])
def test_batch_invariant_verify_gives_each_position_the_one_row_logits_bit_for_bit(name, dtype, rows):
    """6 positions verified in blocks of 1, 3 or 5 rows (one block, several, a padded last one), after a
    20-token prompt."""
    model = make(name, n_embd=256, n_head=8, **({"n_kv_head": 2} if name == "llama-gqa" else {})).to(dtype)
    batch_invariant(model, rows)
    assert {type(m) for m in model.modules()} >= {BlockedLinear, OneQueryAttention}
    g = torch.Generator().manual_seed(2)
    steps, verify, whole = prefill_then_verify_vs_steps(model, torch.randint(0, 97, (1, 20), generator=g),
                                                        torch.randint(0, 97, (1, 6), generator=g))
    assert torch.equal(verify, steps) and torch.equal(whole, steps)


def test_batch_invariant_keeps_the_reference_numbers_and_turns_off():
    model = make("llama-gqa")
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        batch_invariant(model, 4)
        got = model(x)
        assert not any(type(m) is nn.Linear for m in model.modules())
        batch_invariant(model, None)
        assert not any(isinstance(m, (BlockedLinear, OneQueryAttention)) for m in model.modules())
        assert any(type(m) is FewRowLinear for m in model.modules())
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    x = torch.randint(0, 97, (1, 8))  # with grad: the usual routes, gradients as usual
    batch_invariant(model, 4)(x).sum().backward()
    assert model.blocks[0].mlp.up_proj.weight.grad is not None


def test_batch_invariant_refuses_bad_rows_and_a_compiled_step():
    model = make("gpt2")
    with pytest.raises(ValueError, match="rows must be >= 1, got 0"):
        batch_invariant(model, 0)
    with pytest.raises(ValueError, match="compile_decode"):
        batch_invariant(compile_decode(make("gpt2")), 5)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_kernels_give_a_row_the_same_numbers_whatever_the_row_count(bits):
    """batch_invariant leaves Int4Linear and Int8Linear as they are: their kernels already compute each
    row alone (the real models' widths, 1..16 rows and a 200-row prefill)."""
    from minillm.quantize import int4_linear, int8_linear
    torch.manual_seed(0)
    lin = nn.Linear(1536, 576, bias=False)
    q = int4_linear(lin, 64) if bits == 4 else int8_linear(lin)
    x = torch.randn(200, 1536).bfloat16()
    with torch.inference_mode():
        alone = torch.cat([q(x[i:i + 1]) for i in range(16)])
        for m in (2, 3, 5, 9, 16, 200):
            assert torch.equal(q(x[:m])[:16], alone[:min(m, 16)]), f"{m} rows"
