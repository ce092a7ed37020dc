"""Weight-only quantization: float weights into the int8 / int4 forms of our file format
(minillm/quantized.py, the core, holds those forms, their kernels and the file layout).

Decoding one token reads every weight once and does little arithmetic with it, so its speed is set
by how many bytes the weights take. Storing them in 8 or 4 bits instead of 32 (activations stay
bf16) reads 4x or 8x fewer bytes; PyTorch's CPU kernels unpack the integers inside the matmul.

    int8, per output channel (row n of W, shape (N, K)):
        scale[n] = max|W[n, :]| / 127             q = round(W / scale) in [-127, 127]
        W ~ q * scale
    int4, per group of `group_size` consecutive inputs in a row (asymmetric: min and max kept):
        scale = (max - min) / 15,  zero = min + 8 * scale      q = round((W - zero) / scale) + 8 in [0, 15]
        W ~ (q - 8) * scale + zero

Every nn.Linear (attention, MLP, and the output head) and the token embedding are quantized (the
embedding and head to `embedding_bits`, 8 by default, see quantized.make_spec); norms and gpt2's
small position embedding stay in float. Scales and zeros are stored in bf16, the dtype the kernels
compute in, so a checkpoint defines its model exactly.

The command line (__main__.py) quantizes a float checkpoint:
    python -m minillm.quantize weights/smollm2-135m.safetensors --out weights/smollm2-135m-int4.safetensors --bits 4
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..quantized import (BITS, COMPUTE_DTYPE, GROUP_SIZES, Int4Linear, Int8Linear, QuantEmbedding,  # noqa: F401
                         dequantize_int4, make_spec, pack_nibbles, swap_in, unpack_nibbles)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) float -> q int8 (N, K), scale bf16 (N,), with W ~ q * scale (symmetric, per row)."""
    scale = (w.abs().amax(dim=1).float() / 127).clamp(min=1e-8).to(COMPUTE_DTYPE)  # round the scale first: q uses the stored one
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for i in range(0, w.shape[0], 4096):  # in slices: a (49152, 576) embedding needs no full-size float temporaries
        q[i:i + 4096] = torch.round(w[i:i + 4096].float() / scale[i:i + 4096].float()[:, None]).clamp_(-127, 127)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (N, K) float -> q uint8 (N, K) in [0, 15], scale and zero bf16 (N, K/group): W ~ (q - 8) * scale + zero."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"{name}: in_features {K} is not divisible by int4 group_size {group_size} "
                         f"(choose one of {[g for g in GROUP_SIZES if K % g == 0] or 'none: keep this model in int8'})")
    wg = w.float().reshape(N, K // group_size, group_size)  # (N, groups, g)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, groups)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(COMPUTE_DTYPE)
    zero = (lo + 8 * scale.float()).to(COMPUTE_DTYPE)  # the value q = 8 stands for (the kernels' convention)
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None]) + 8
    return q.clamp(0, 15).to(torch.uint8).reshape(N, K), scale, zero



def int8_linear(linear: nn.Linear) -> Int8Linear:
    """An nn.Linear as an Int8Linear."""
    m = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None)
    q, m.scales = quantize_int8(linear.weight.detach())
    m.set_codes(q)
    if linear.bias is not None:
        m.bias = linear.bias.detach().to(COMPUTE_DTYPE)
    return m


def int4_linear(linear: nn.Linear, group_size: int, name: str = "weight") -> Int4Linear:
    """An nn.Linear as an Int4Linear (name: for the error when group_size does not divide its width)."""
    m = Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, group_size)
    m.set_codes(*quantize_int4(linear.weight.detach(), group_size, name))
    if linear.bias is not None:
        m.bias = linear.bias.detach().to(COMPUTE_DTYPE)
    return m


def quant_embedding(emb: nn.Embedding, bits: int, group_size: int | None) -> QuantEmbedding:
    """An nn.Embedding as a QuantEmbedding of `bits`."""
    m = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, bits, group_size)
    if bits == 8:
        m.weight, m.scales = quantize_int8(emb.weight.detach())
    else:
        q, m.scales, m.zeros = quantize_int4(emb.weight.detach(), group_size, "tok_emb.weight")
        m.weight = pack_nibbles(q)
    return m


def quantize_model(model, bits: int, group_size: int | None = None, embedding_bits: int | None = None):
    """Quantize a float Transformer in place (every Linear + the token embedding) and return it, in bf16.

    The result computes in bf16 (the kernels' dtype); model.quantization records the scheme and
    checkpoint.save_model writes it to the file's metadata."""
    spec = make_spec(bits, group_size, embedding_bits)
    g = spec["group_size"]
    swap_in(model, spec, lambda lin, name, b: int8_linear(lin) if b == 8 else int4_linear(lin, g, name + ".weight"),
            lambda emb, b: quant_embedding(emb, b, g), tie_now=True)
    # eval mode after the swap: the new modules start in training mode
    return model.to(COMPUTE_DTYPE).eval()  # norms, position embedding, biases (integer codes are untouched)
