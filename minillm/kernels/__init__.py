"""Our own CPU kernel for int4 matmuls (int4_vnni.cpp), a speed-layer route for CPUs with AVX-512 VNNI.

It multiplies as llama.cpp does: each row of x rounded to int8 per block of 32 inputs, the products
with the 4-bit codes summed exactly in int32 by the CPU's int8 dot-product instruction (vpdpbusd, 64
at a time), floats once per block. Its result is thus dequant(W) @ dequant(x8) (int8_rows below says
what x8 is), which tests/test_int4_kernel.py holds it to within float rounding; rounding x to int8
per 32 inputs is about as coarse as the bf16 (8 significant bits) quantized.py's kernel, PyTorch's,
rounds x to, and the two agree to about 1% of the largest output. A row's numbers do not depend on
the other rows of a call, and each pass over the weights serves up to 16 rows, so verifying k
drafts costs little more than one row; PyTorch's CPU kernel (aten._weight_int4pack_mm_for_cpu)
takes rows four at a time and dequantizes the weights again for each four (`python -m
bench.step_cost few-rows` prints both).

speed.speed_up(model) gives every CPU Int4Linear this route (VNNIInt4Linear) where the kernel is
available. Built with torch.utils.cpp_extension (a C++ compiler and ninja: `pip install ninja`)
into PyTorch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions): the first
time on a machine takes a minute or two. MINILLM_INT4_KERNEL=aten keeps PyTorch's kernel (own, the
default, uses ours where the CPU has AVX-512 VNNI and it builds).
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from ..quantized import Int4Linear, unpack_nibbles

SOURCE = Path(__file__).with_name("int4_vnni.cpp")
CHOICES = ("own", "aten")
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma"]


def has_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI (x86, as PyTorch reports it)."""
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)  # private to torch: absent, say no
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() == "AVX512"
            and vnni())


@functools.cache
def int4_vnni():
    """The built extension (mm, pack, unpack), or None where it cannot run here (a warning says why when
    building failed). Decided once per process."""
    choice = os.environ.get("MINILLM_INT4_KERNEL", "own")
    if choice not in CHOICES:
        raise ValueError(f"MINILLM_INT4_KERNEL={choice!r}: expected one of {CHOICES}")
    if choice == "aten" or not has_vnni():
        return None
    try:
        module = load(name="minillm_int4_vnni", sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"])
    except (RuntimeError, OSError, ImportError) as e:
        warnings.warn(f"minillm: building {SOURCE} failed, int4 matmuls use PyTorch's kernel "
                      f"(set MINILLM_INT4_KERNEL=aten to skip the attempt): {str(e).strip()[-300:]}")
        return None
    # the operator minillm::int4_vnni_mm (defined in C++, what a compiled step calls): its output's shape
    torch.library.register_fake("minillm::int4_vnni_mm", lambda x, packed, scale_zero, group_size: x.new_empty(
        x.shape[0], scale_zero.shape[0] * scale_zero.shape[2]))  # scale_zero: (N/16, K/group, 16, 2)
    return module


def int8_rows(x: torch.Tensor) -> torch.Tensor:
    """What the kernel multiplies instead of x (M, K), in float32: each block of 32 inputs rounded to
    int8 steps of max|x| / 127 (the kernel's own float32 operations, rounding half to even). For tests
    and readers; the kernel does this itself."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    x8 = torch.round(blocks * torch.where(amax > 0, 127 / amax, 0))
    return (x8 * (amax / 127)).reshape(x.shape)


class VNNIInt4Linear(Int4Linear):
    """An Int4Linear multiplied by our kernel: on the CPU `packed` and `scale_zero` hold int4_vnni.cpp's
    layouts (packed 1-D); elsewhere (moved to CUDA) torch's, and it runs as Int4Linear does."""

    def set_codes(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        if q.device.type != "cpu":
            return super().set_codes(q, scale, zero)
        q, scale_zero = self.padded(q, scale, zero)
        self.packed, self.scale_zero = int4_vnni().pack(q.to(torch.uint8).contiguous(), scale_zero)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.packed.dim() != 1:
            return super().codes()
        q, scale_zero = int4_vnni().unpack(self.packed, self.scale_zero, self.in_features)
        N = self.out_features
        scale_zero = scale_zero[:, :N].transpose(0, 1)  # (N, K/group, 2)
        return q[:N].contiguous(), scale_zero[..., 0].contiguous(), scale_zero[..., 1].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed.dim() != 1:
            return super().forward(x)
        shape = x.shape
        args = (x.reshape(-1, shape[-1]), self.packed, self.scale_zero, self.group_size)
        # eager calls skip the operator's dispatch: microseconds a call, and it imports sympy
        y = torch.ops.minillm.int4_vnni_mm(*args) if torch.compiler.is_compiling() else int4_vnni().mm(*args)
        y = y.to(self.scale_zero.dtype)[:, :self.out_features].reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def use_int4_kernel(module: Int4Linear) -> None:
    """Give a CPU Int4Linear our kernel's route in place, where the kernel is available here."""
    if type(module) is not Int4Linear or module.packed.device.type != "cpu" or int4_vnni() is None:
        return
    q, scale, zero = torch_layout_codes(module)
    module.__class__ = VNNIInt4Linear
    module.set_codes(q, scale, zero)


def torch_layout_codes(module: Int4Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Int4Linear.codes() without its identity matmul (K x K x N products: minutes for a 1.5B model).
    torch's CPU packing puts each of the N x K nibbles somewhere in (N, K/2) bytes; packing codes that
    spell out each position's index, 4 bits at a time, shows where (once per shape)."""
    N, K = module.n_padded, module.in_features
    q = torch.empty(N * K, dtype=torch.uint8)
    q[_torch_nibble_order(N, K)] = unpack_nibbles(module.packed).reshape(-1)
    scale_zero = module.scale_zero[:, :module.out_features].transpose(0, 1)  # (N, K/group, 2)
    return q.reshape(N, K)[:module.out_features], scale_zero[..., 0], scale_zero[..., 1]


@functools.cache
def _torch_nibble_order(N: int, K: int) -> torch.Tensor:
    """For each nibble of torch's packed (N, K/2) bytes, low nibble first: the index n * K + k it holds."""
    index, order, shift = torch.arange(N * K).reshape(N, K), torch.zeros(N * K, dtype=torch.long), 0
    while (N * K - 1) >> shift:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(((index >> shift) & 15).to(torch.int32), 1)
        order |= unpack_nibbles(packed).reshape(-1).long() << shift
        shift += 4
    return order
