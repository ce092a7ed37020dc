"""Our own CPU kernels, speed-layer routes for CPUs with AVX-512 VNNI: int4 and int8 matmuls (vnni.cpp),
float32 / bf16 matmuls of 1..16 rows (rows.cpp) and attention (attention.cpp), the last sections below.

It multiplies as llama.cpp does: each row of x rounded to int8 per block of 32 inputs, the products
with the 4-bit or 8-bit codes summed exactly in int32 by the CPU's int8 dot-product instruction
(vpdpbusd, 64 at a time), floats once per block. Its result is thus dequant(W) @ dequant(x8) (int8_rows
below says what x8 is), which tests/test_int4_kernel.py holds it to within float rounding; rounding x
to int8 per 32 inputs is about as coarse as the bf16 (8 significant bits) quantized.py's kernels,
PyTorch's, round x to, and the two agree to about 1% of the largest output. A row's numbers do not
depend on the other rows of a call, and each pass over the weights serves up to 16 rows, so verifying
k drafts costs little more than one row; PyTorch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu)
takes rows four at a time and dequantizes the weights again for each four (`python -m
bench.step_cost few-rows` prints both).

speed.speed_up(model) gives every CPU Int4Linear this route (VNNIInt4Linear) and every CPU Int8Linear
of a width that is a multiple of 32 (the int8 output head of int4 models, every layer of int8 ones:
VNNIInt8Linear) where the kernel is available. Built with torch.utils.cpp_extension (a C++ compiler
and ninja: `pip install ninja`) into PyTorch's extension cache (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions): the first time on a machine takes a minute or two.
MINILLM_QUANT_KERNEL=aten keeps PyTorch's kernels (own, the default, uses ours where the CPU has
AVX-512 VNNI and it builds; aten skips the build, so the float kernel below is gone too).

rows.cpp multiplies float32 or bf16 W as it is by 1..16 rows of x in one pass over W, every weight
used for all the rows while in a register, the sums in float32 (bf16 W and x widened exactly). One
row costs the read of the weights, as PyTorch's GEMV does (bf16: half its time on an AVX-512 Xeon
without bf16 instructions), and 9 rows ~1.2x of one in fp32 (PyTorch's GEMM: 2-3x). Each output
is summed in one fixed order whatever the number of rows, so a row's numbers do not depend on the
call it is in. On CPUs with AMX-BF16 (Intel's tile unit), bf16 with K a multiple of 32 goes through it
(16 outputs x 32 inputs against every row per instruction): 9 rows cost one row's time, each output
summed by the instruction's own order, again the same for any call. speed.FewRowLinear takes it
(MINILLM_FEW_ROWS=own, the default where it builds).

attention.cpp computes a prompt's causal attention in float32, visiting only the keys each block of
queries may see (flash attention's blocks, the query heads of a K/V head together); PyTorch's CPU
kernel computes all the scores of a prompt up to 512 tokens and masks half of them.
speed.GQADecodeAttention takes it for more than 16 queries, and its few-query kernel for 1..16 (a
decode step, a verification: one query row at a time, a few microseconds where PyTorch's SDPA call
costs tens).

pointwise.cpp does RMSNorm, RoPE and SwiGLU's silu(gate) * up in float32 in one pass over the activations
each (PyTorch: two to seven kernels); RoPE bit for bit the reference's numbers. speed.FusedRMSNorm,
GQADecodeAttention.project and SwiGLUMLP take them (a compiled step too: it then rounds as the eager one).

step.cpp runs one token through every block of an int4, bf16 or float32 LLaMA-family model in one call
(DecodeStep, made once per model by speed.OneCallStep): the kernels above called from C++, RMSNorm, RoPE,
SwiGLU and the residual adds in the model's dtype as the eager step rounds them (in float32 with
pointwise.cpp's own row functions: the eager step's numbers bit for bit).
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

from ..quantized import Int4Linear, Int8Linear, unpack_nibbles

SOURCES = [Path(__file__).with_name(name) for name in ("vnni.cpp", "rows.cpp", "attention.cpp", "pointwise.cpp", "step.cpp")]
CHOICES = ("own", "aten")
TILE = 16  # output rows per tile of the kernel's layout
ROWS_MAX = 16  # rows.cpp's MAX_ROWS: the most rows of x one rows_mm call takes
ATTENTION_GROUP = 96  # attention.cpp's TASK_ROWS: the most query heads a K/V head may serve there
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma"]


def has_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI (x86, as PyTorch reports it)."""
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)  # private to torch: absent, say no
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() == "AVX512"
            and vnni())


@functools.cache
def vnni():
    """The built extension (mm, pack, unpack), or None where it cannot run here (a warning says why when
    building failed). Decided once per process."""
    choice = os.environ.get("MINILLM_QUANT_KERNEL", "own")
    if choice not in CHOICES:
        raise ValueError(f"MINILLM_QUANT_KERNEL={choice!r}: expected one of {CHOICES}")
    if choice == "aten" or not has_vnni():
        return None
    try:
        module = load(name="minillm_vnni", sources=[str(s) for s in SOURCES], extra_cflags=FLAGS,
                      extra_ldflags=["-fopenmp"])
    except (RuntimeError, OSError, ImportError) as e:
        warnings.warn(f"minillm: building {SOURCES[0].parent} failed, matmuls use PyTorch's kernels "
                      f"(set MINILLM_QUANT_KERNEL=aten to skip the attempt): {str(e).strip()[-300:]}")
        return None
    # the operator minillm::vnni_mm (defined in C++, what a compiled step calls): its output's shape
    torch.library.register_fake("minillm::vnni_mm", lambda x, packed, scale_zero, group_size, bits: x.new_empty(
        x.shape[0], scale_zero.shape[0] * scale_zero.shape[2]))  # scale_zero: (N/16, K/group, 16, 2)
    torch.library.register_fake("minillm::rows_mm", lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_fake("minillm::rms_norm", lambda x, weight, eps: torch.empty_like(x))
    torch.library.register_fake("minillm::swiglu", lambda gate, up: gate.new_empty(gate.shape))
    torch.library.register_fake("minillm::rope", lambda x, cos, sin: x.new_empty(
        x.shape[0], x.shape[2], x.shape[1], x.shape[3]).transpose(1, 2))
    for name in ("causal_attention", "few_query_attention"):
        torch.library.register_fake(f"minillm::{name}", lambda q, k, v: q.new_empty(
            q.shape[0], q.shape[2], q.shape[1], q.shape[3]))
    return module


def int8_rows(x: torch.Tensor) -> torch.Tensor:
    """What the kernel multiplies instead of x (M, K), in float32: each block of 32 inputs rounded to
    int8 steps of max|x| / 127 (the kernel's own float32 operations, rounding half to even). For tests
    and readers; the kernel does this itself."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, 0)  # a division, as the kernel's (127 / t is
    x8 = torch.round(blocks * inv)  # 127 * reciprocal(t) in torch, which can land a tie on the other side)
    return (x8 * (amax / 127)).reshape(x.shape)


class VNNIInt4Linear(Int4Linear):
    """An Int4Linear multiplied by our kernel: on the CPU `packed` and `scale_zero` hold vnni.cpp's
    layouts (packed 1-D); elsewhere (moved to CUDA) torch's, and it runs as Int4Linear does."""
    stack: StackedInt4 | None = None  # the stack whose buffers this layer's are views of

    def set_codes(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        if self.stack is not None:
            self.stack.valid, self.stack = False, None
        if q.device.type != "cpu":
            return super().set_codes(q, scale, zero)
        q, scale_zero = self.padded(q, scale, zero)
        self.packed, self.scale_zero = vnni().pack(q.to(torch.uint8).contiguous(), scale_zero, 4)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.packed.dim() != 1:
            return super().codes()
        q, scale_zero = vnni().unpack(self.packed, self.scale_zero, self.in_features, 4)
        N = self.out_features
        scale_zero = scale_zero[:, :N].transpose(0, 1)  # (N, K/group, 2)
        return q[:N].contiguous(), scale_zero[..., 0].contiguous(), scale_zero[..., 1].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed.dim() != 1:
            return super().forward(x)
        shape = x.shape
        y = multiply(x.reshape(-1, shape[-1]), self.packed, self.scale_zero, self.group_size, 4)
        return finish(self, y.to(self.scale_zero.dtype), shape)


class VNNIInt8Linear(Int8Linear):
    """An Int8Linear multiplied by our kernel (in_features a multiple of 32): on the CPU `weight` holds
    vnni.cpp's int8 layout (1-D: codes + 128, rows padded to a multiple of 16) and `scale_zero` (not
    in the state dict) the scales as its (scale, -128 * scale) pairs; the state dict keeps the portable
    (out, in) codes. Moved off the CPU it becomes a plain Int8Linear again."""

    def set_codes(self, q: torch.Tensor) -> None:
        if q.device.type != "cpu":
            return super().set_codes(q)
        pad = -q.shape[0] % TILE
        u = F.pad(q, (0, 0, 0, pad)).view(torch.uint8) ^ 128  # q + 128: two's complement with the top bit flipped
        scale = F.pad(self.scales, (0, pad))
        scale_zero = torch.stack((scale, -128 * scale), -1)[None]  # (1 group, N_pad, 2); -128 * a bf16 is exact
        self.weight, scale_zero = vnni().pack(u.contiguous(), scale_zero.contiguous(), 8)
        self.register_buffer("scale_zero", scale_zero, persistent=False)

    def codes(self) -> torch.Tensor:
        """q (out, in) int8, the portable form."""
        u, _ = vnni().unpack(self.weight, self.scale_zero, self.in_features, 8)
        return (u[:self.out_features] ^ 128).view(torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() != 1:
            return super().forward(x)
        shape = x.shape
        y = multiply(x.reshape(-1, shape[-1]), self.weight, self.scale_zero, self.in_features, 8)
        return finish(self, y.to(self.scale_zero.dtype), shape)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if prefix + "weight" in destination and self.weight.dim() == 1:
            destination[prefix + "weight"] = self.codes()

    def _load_from_state_dict(self, state_dict, prefix, *args):
        self.weight = self.codes()  # the plain layout, which loading copies into
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.set_codes(self.weight)

    def _apply(self, fn, recurse=True):
        if fn(torch.zeros(1)).device.type != "cpu":  # torch's kernel and layout off the CPU
            self.weight, self.__class__ = self.codes(), Int8Linear
            del self.scale_zero
        return Int8Linear._apply(self, fn, recurse)


def finish(layer: Int4Linear | Int8Linear, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The kernel's (M, padded out_features) result in the layer's dtype -> its output for an x of `shape`.
    (Reads no tensor of the layer but its bias: a compiled step then guards on no more of it.)"""
    y = y[:, :layer.out_features].reshape(*shape[:-1], layer.out_features)
    return y + layer.bias if layer.bias is not None else y


def kernel(operator: str, function: str | None = None):
    """Our kernel by name: inside torch.compile the registered operator minillm::`operator` (what a compiled
    graph calls); eagerly the module's own `function` (default: the same name), which skips the operator's
    dispatch: microseconds a call, and it imports sympy."""
    return getattr(torch.ops.minillm, operator) if torch.compiler.is_compiling() else getattr(vnni(), function or operator)


def multiply(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """The kernel: x (M, K) -> (M, N) in x's dtype, N the padded rows scale_zero holds."""
    return kernel("vnni_mm", "mm")(x, packed, scale_zero, group_size, bits)


def rows_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """rows.cpp's kernel: x (M <= ROWS_MAX, K) @ w (N, K)^T, both float32 or both bf16, w read once
    whatever M, each row's numbers independent of the others' (speed.FewRowLinear's "own" route)."""
    return kernel("rows_mm")(x, w)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """attention.cpp's kernel: softmax(q kᵀ/√hd, causal) v for q (B, nh, T, hd) and k, v (B, nkv, S, hd),
    float32, query t at position S - T + t (it sees keys 0..S - T + t), hd a multiple of 16 -> (B, nh, T, hd),
    a view of the (B, T, nh, hd) result (the output projection's layout: no copy to get there)."""
    return kernel("causal_attention")(q, k, v).transpose(1, 2)


def few_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """attention.cpp's kernel for a few queries (a decode step, a verification): causal_attention's arguments
    and result, float32 or bf16 (all three alike; the sums in float32), hd at most 256, each query row
    computed on its own (its numbers do not depend on the call's other rows: a verification's row is a
    one-token step's, bit for bit)."""
    return kernel("few_query_attention")(q, k, v).transpose(1, 2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """pointwise.cpp: model.RMSNorm's x / sqrt(mean(x²) + eps) * weight, float32, in one pass."""
    return kernel("rms_norm")(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """pointwise.cpp: model.apply_rope(x, cos, sin) for float32 x (B, H, T, hd), the same numbers, in one pass;
    a view of a (B, T, H, hd) tensor."""
    return kernel("rope")(x, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """pointwise.cpp: silu(gate) * up for float32 gate and up of one shape, each rows H wide with the last
    dimension contiguous (the two halves of a stacked gate|up product are), in one pass -> contiguous."""
    return kernel("swiglu")(gate, up)


class StackedInt4:
    """Several VNNIInt4Linear layers that read the same x (q, k, v; gate, up) multiplied as one matrix:
    their tiles stacked, one rounding of x and one pass of the kernel instead of one each. Each tile's
    sums do not depend on the tiles beside it, so every output is bit for bit the separate layer's.
    The layers' own buffers become views of the stacked ones (no memory added; their state dicts are
    unchanged). New codes for a layer later (set_codes: .to(device) and load_state_dict call it) make
    the stack stale (`valid` False), and the caller multiplies the layers one by one again."""

    def __init__(self, parts: list[VNNIInt4Linear]):
        self.parts, self.group_size = parts, parts[0].group_size
        self.packed, self.scale_zero = torch.cat([p.packed for p in parts]), torch.cat([p.scale_zero for p in parts])
        self.bytes, self.tiles = [p.packed.numel() for p in parts], [p.scale_zero.shape[0] for p in parts]
        for p, packed, scale_zero in zip(parts, self.packed.split(self.bytes), self.scale_zero.split(self.tiles)):
            p.packed, p.scale_zero, p.stack = packed, scale_zero, self
        self.valid = True

    @classmethod
    def of(cls, parts: list[Int4Linear]) -> StackedInt4 | None:
        """The stack of `parts`, or None where they cannot share a call (not all on our kernel's route,
        different group sizes or input widths, bias on some only)."""
        if not all(type(p) is VNNIInt4Linear and p.packed.dim() == 1 for p in parts) or len(
                {(p.group_size, p.in_features, p.bias is None) for p in parts}) != 1:
            return None
        return cls(parts)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (..., K) -> each layer's output, (..., its out_features)."""
        shape = x.shape
        y = multiply(x.reshape(-1, shape[-1]), self.packed, self.scale_zero, self.group_size, 4).to(self.scale_zero.dtype)
        return [finish(p, part, shape) for p, part in zip(self.parts, y.split([TILE * t for t in self.tiles], dim=1))]

    def takes(self, x: torch.Tensor, layers: list) -> bool:
        """Whether this call goes through the stack (speed.StackedLinear's question): while it is valid and
        `layers` (the module's now) are the stacked ones."""
        return self.valid and all(a is b for a, b in zip(self.parts, layers))


def use_kernel(module: Int4Linear | Int8Linear) -> None:
    """Give a CPU Int4Linear or Int8Linear our kernel's route in place, where the kernel is available
    here (int8: for an in_features that is a multiple of 32, the kernel's block)."""
    if type(module) is Int4Linear and module.packed.device.type == "cpu" and vnni() is not None:
        q, scale, zero = torch_layout_codes(module)
        module.__class__ = VNNIInt4Linear
        module.set_codes(q, scale, zero)
    elif type(module) is Int8Linear and module.weight.device.type == "cpu" and module.in_features % 32 == 0 \
            and vnni() is not None:
        module.__class__ = VNNIInt8Linear
        module.set_codes(module.weight)


def torch_layout_codes(module: Int4Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Int4Linear.codes() without its identity matmul (K x K x N products: minutes for a 1.5B model).
    torch's CPU packing puts each of the N x K nibbles somewhere in (N, K/2) bytes; packing codes that
    spell out each position's index, 4 bits at a time, shows where (once per shape)."""
    N, K = module.n_padded, module.in_features
    q = torch.empty(N * K, dtype=torch.uint8)
    q[_torch_nibble_order(N, K)] = unpack_nibbles(module.packed).reshape(-1)
    scale_zero = module.scale_zero[:, :module.out_features].transpose(0, 1)  # (N, K/group, 2)
    return q.reshape(N, K)[:module.out_features], scale_zero[..., 0], scale_zero[..., 1]


def forget_torch_layouts() -> None:
    """Drop _torch_nibble_order's tables (8 bytes per weight of each shape seen: 242 MB for the 1.5B's
    four shapes), once a model's layers are converted."""
    _torch_nibble_order.cache_clear()


@functools.cache
def _torch_nibble_order(N: int, K: int) -> torch.Tensor:
    """For each nibble of torch's packed (N, K/2) bytes, low nibble first: the index n * K + k it holds."""
    index, order, shift = torch.arange(N * K).reshape(N, K), torch.zeros(N * K, dtype=torch.long), 0
    while (N * K - 1) >> shift:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(((index >> shift) & 15).to(torch.int32), 1)
        order |= unpack_nibbles(packed).reshape(-1).long() << shift
        shift += 4
    return order
