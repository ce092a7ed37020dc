"""GGUF 4-bit blocks -> our int4 group-32 form, codes unchanged: for `convert --keep-quant`.

Ours (minillm.quantize): each group of 32 consecutive inputs of a row has a scale and a zero, and
    W = (q - 8) * scale + zero,   q in [0, 15].
Each function below returns q uint8 (N, K) and scale, zero float32 (N, K/32) for the raw bytes of an
(N, K) GGUF matrix (its rows are N, its blocks run along K), with the same codes and the same values;
quantized.py rounds scale and zero once to bf16, the dtype our kernels take them in.

Q4_0 / Q4_1 (32 inputs per block): bytes = d (float16) [, m (float16)], then 16 bytes of codes: byte j
holds input j in its low nibble and input j + 16 in its high nibble. Q4_0: w = d * (q - 8), so
scale = d, zero = 0; Q4_1: w = d * q + m, so scale = d, zero = m + 8 d.

Q4_K (256 inputs per super-block, 144 bytes; llama.cpp's ggml-common.h block_q4_K):
    bytes 0-1 d (float16), 2-3 dmin (float16), 4-15 eight 6-bit scales sc and eight 6-bit minimums m
    (one pair per sub-block of 32), 16-143 the 256 codes.
    Scales: byte j (j < 4) holds sc[j] in its low 6 bits, byte 4 + j holds m[j]; byte 8 + j holds the low
    4 bits of sc[4 + j] (low nibble) and of m[4 + j] (high nibble), whose top 2 bits are the top 2 bits
    of bytes j and 4 + j.
    Codes: 4 chunks of 32 bytes; chunk c gives sub-block 2c its low nibbles and sub-block 2c + 1 its high ones.
    w = d * sc * q - dmin * m, so per sub-block scale = d * sc and zero = 8 * scale - dmin * m.
d * sc and dmin * m are exact in float32 (11-bit times 6-bit mantissas); zero is one float32 subtraction.
"""

from __future__ import annotations

import numpy as np
import torch

Q4_BLOCK = {"Q4_0": 18, "Q4_1": 20}  # bytes per block of 32
Q4K_BYTES, Q4K_SIZE = 144, 256  # bytes and inputs per Q4_K super-block


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 little-endian float16 bytes -> (...) float32."""
    return b.copy().view(np.float16)[..., 0].astype(np.float32)


def q4_codes(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw Q4_0/Q4_1 bytes of an (N, K) matrix -> q uint8 (N, K) in [0, 15], scale, zero float32 (N, K/32)."""
    N, K = shape
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(N, K // 32, Q4_BLOCK[type_name])
    d = _f16(blocks[..., 0:2])  # (N, K/32)
    zero = _f16(blocks[..., 2:4]) + 8 * d if type_name == "Q4_1" else np.zeros_like(d)
    qs = blocks[..., -16:]  # (N, K/32, 16)
    q = np.concatenate((qs & 0xF, qs >> 4), axis=-1).reshape(N, K)  # inputs 0..15, then 16..31 of each block
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zero)


def q4k_codes(raw: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw Q4_K bytes of an (N, K) matrix -> q uint8 (N, K) in [0, 15], scale, zero float32 (N, K/32)."""
    N, K = shape
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(N, K // Q4K_SIZE, Q4K_BYTES)
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])  # (N, K/256) each
    lo, hi, mix = blocks[..., 4:8], blocks[..., 8:12], blocks[..., 12:16]  # (N, K/256, 4) each
    sc = np.concatenate((lo & 63, (mix & 0xF) | ((lo >> 6) << 4)), axis=-1)  # (N, K/256, 8): sub-blocks 0..7
    m = np.concatenate((hi & 63, (mix >> 4) | ((hi >> 6) << 4)), axis=-1)  # (N, K/256, 8)
    qs = blocks[..., 16:].reshape(N, K // Q4K_SIZE, 4, 1, 32)  # chunk c of 32 bytes
    q = np.concatenate((qs & 0xF, qs >> 4), axis=3).reshape(N, K)  # sub-block 2c (low nibbles), then 2c + 1 (high)
    scale = (d[..., None] * sc).reshape(N, K // 32)  # float32, exact
    zero = 8 * scale - (dmin[..., None] * m).reshape(N, K // 32)
    return torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(zero)


def int4_codes(raw: np.ndarray, type_name: str, shape: tuple[int, int]):
    """q, scale, zero for a GGUF type whose codes are kept (Q4_0, Q4_1, Q4_K); None for any other type."""
    if type_name in Q4_BLOCK:
        return q4_codes(raw, type_name, shape)
    if type_name == "Q4_K":
        return q4k_codes(raw, shape)
    return None


KEEPABLE = (*Q4_BLOCK, "Q4_K")  # the GGUF types int4_codes reads
