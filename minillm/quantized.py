"""The quantized weight forms of our file format: int8 per-channel and int4 group-wise Linear layers
and the quantized token embedding, multiplied without dequantizing. A checkpoint that holds them
loads into these modules (checkpoint.py builds them with `empty_quantized`); `quantize/` is the
layer that turns float weights into them.

    int8, per output channel (row n of W, shape (N, K)):   W ~ q * scale[n],  q in [-127, 127]
    int4, per group of `group_size` inputs in a row:       W ~ (q - 8) * scale + zero,  q in [0, 15]

Kernels (torch 2.13): int8 -> aten._weight_int8pack_mm(x, q (N, K) int8, scale (N,)); int4 on CPU ->
aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero (K/group, N, 2)) with `packed`
made by aten._convert_weight_to_int4pack_for_cpu; on CUDA the same without `_for_cpu`. Both want x
in the dtype of the scales (bf16). The CPU int4 kernel needs N % 16 == 0 (rows are padded with
zeros) and group_size in {32, 64, 128, 256} dividing K. The CPU int8 kernel needs K % 16 == 0 and
checks nothing (other widths crashed or returned garbage: bench/README.md), so an Int8Linear of
another width keeps its codes padded with zero columns and pads each input to match.

File format (metadata "quantization" = {"bits", "group_size", "embedding_bits"}; the rest of the format is checkpoint.py's):
    NAME.weight   int8 (N, K)        | int4: uint8 (N, K/2), q[:, 2j] in the low nibble, q[:, 2j+1] in the high
    NAME.scales   bf16 (N,)          | int4: bf16 (N, K/group)
    NAME.zeros                       | int4: bf16 (N, K/group)
    NAME.bias     as in float models
With tied embeddings the file holds tok_emb's quantized tensors only; the head is built from them.
The kernel's packed int4 layout is private to torch and depends on the CPU; the file keeps the
portable nibble layout above and packing happens at load.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .host_memory import release_freed_memory
from .model import Transformer

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels accept
INT8_K_ALIGN = 16  # the int8 kernel's in_features must be a multiple of this (see the top)
COMPUTE_DTYPE = torch.bfloat16  # scales, zeros, and the activations the kernels multiply


def make_spec(bits: int, group_size: int | None = None, embedding_bits: int | None = None) -> dict:
    """The scheme as stored in a checkpoint's metadata; a ValueError names any bad value.
    embedding_bits (the token embedding and the output head) defaults to 8: these matrices are the
    most sensitive to rounding (bench/README.md has the perplexities), and decode reads only one row
    of the embedding. llama.cpp's Q4 files keep them in 8 bits too."""
    embedding_bits = 8 if embedding_bits is None else embedding_bits
    for name, b in (("bits", bits), ("embedding_bits", embedding_bits)):
        if b not in BITS:
            raise ValueError(f"quantization {name} must be one of {BITS}, got {b!r}")
    if 4 in (bits, embedding_bits):
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    else:
        group_size = None
    return {"bits": bits, "group_size": group_size, "embedding_bits": embedding_bits}


# ----------------------------------------------------------------------------- the format's math

def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float matrix an int4 triple stands for, (N, K) fp32 (for reference checks and embeddings)."""
    N, K = q.shape
    g = K // scale.shape[1]
    wg = (q.float().reshape(N, -1, g) - 8) * scale.float()[..., None] + zero.float()[..., None]
    return wg.reshape(N, K)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8: even columns in the low nibble, odd in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: (N, K/2) uint8 -> (N, K) uint8."""
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)


# ----------------------------------------------------------------------------- int4 kernel plumbing

def pack_for_kernel(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 in [0, 15] -> the kernel's private packed layout, on q's device."""
    if q.is_cuda:  # the CUDA op takes nibble pairs with the even column in the HIGH nibble, and
        # tiles of `inner_k_tiles` x 16 inputs (2, 4 or 8) that must divide K
        inner_k_tiles = next(t for t in (8, 4, 2) if q.shape[1] % (16 * t) == 0)
        return torch.ops.aten._convert_weight_to_int4pack((q[:, 0::2] << 4 | q[:, 1::2]).contiguous(), inner_k_tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_zero: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scale_zero)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zero)


# ----------------------------------------------------------------------------- modules

class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + bias, with q int8 (out, in) and one scale per output feature.

    In memory `weight` is (out, k_padded): in_features rounded up to INT8_K_ALIGN with zero columns
    (the kernel needs it, see the top), and inputs are padded with zeros to match. The state dict
    (what checkpoints hold) is the unpadded (out, in)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.k_padded = -(-in_features // INT8_K_ALIGN) * INT8_K_ALIGN
        self.register_buffer("weight", torch.zeros(out_features, self.k_padded, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=COMPUTE_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=COMPUTE_DTYPE) if bias else None)
        self.tied = False  # True: the tied output head, whose matrix the checkpoint stores as tok_emb

    def set_codes(self, q: torch.Tensor) -> None:
        """Take q (out, in) int8: as it is (shared, not copied) when in is aligned, else padded."""
        pad = self.k_padded - self.in_features
        self.weight = F.pad(q, (0, pad)) if pad else q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.scales.dtype)
        if self.k_padded != self.in_features:
            x = F.pad(x, (0, self.k_padded - self.in_features))
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        y = y.reshape(*shape[:-1], self.out_features)  # (..., out)
        return y + self.bias if self.bias is not None else y

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.tied:
            return
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.k_padded != self.in_features:  # the portable form; on meta (shapes only) no op runs
            w = self.weight
            destination[prefix + "weight"] = (torch.empty(self.out_features, self.in_features, dtype=w.dtype,
                                                          device="meta") if w.is_meta else w[:, :self.in_features])

    def _load_from_state_dict(self, state_dict, prefix, *args):
        key, pad = prefix + "weight", self.k_padded - self.in_features
        if pad and key in state_dict and state_dict[key].shape[-1] == self.in_features:
            state_dict = {**state_dict, key: F.pad(state_dict[key], (0, pad))}
        super()._load_from_state_dict(state_dict, prefix, *args)


class Int4Linear(nn.Module):
    """y = x @ W^T + bias with W stored as 4-bit codes in groups of `group_size` inputs (see the top).

    In memory the codes live in the kernel's packed layout (`packed`) and scales/zeros as one
    (K/group, N_padded, 2) tensor, as the kernel wants them. The state dict (what checkpoints hold)
    is the portable form: weight (N, K/2) nibbles, scales and zeros (N, K/group)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.n_padded = -(-out_features // 16) * 16  # the CPU kernel handles rows in multiples of 16
        self.register_buffer("packed", torch.zeros(0, dtype=torch.uint8))  # filled by set_codes
        self.register_buffer("scale_zero", torch.zeros(in_features // group_size, self.n_padded, 2, dtype=COMPUTE_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=COMPUTE_DTYPE) if bias else None)
        self.tied = False  # True: the tied output head, whose matrix the checkpoint stores as tok_emb

    def set_codes(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Take q (N, K) uint8 and scale, zero (N, K/group); pad rows to n_padded and pack for the kernel."""
        q, self.scale_zero = self.padded(q, scale, zero)
        self.packed = pack_for_kernel(q)

    def padded(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q with rows up to n_padded, and scale_zero as the kernel wants it, (K/group, N_pad, 2)."""
        pad = self.n_padded - self.out_features
        q = F.pad(q, (0, 0, 0, pad), value=8)  # padded rows: (8 - 8) * 0 + 0 = 0
        scale_zero = F.pad(torch.stack((scale, zero), dim=-1), (0, 0, 0, 0, 0, pad))  # (N_pad, K/group, 2)
        return q, scale_zero.transpose(0, 1).contiguous().to(self.scale_zero.dtype)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Back from the kernel layout to q (N, K) uint8, scale, zero (N, K/group). The packed layout is
        private to torch, so we let the kernel itself undo it: multiplying the identity by W with every
        scale 1 and zero 8 gives (q - 8) * 1 + 8 = q, exactly (small integers are exact in bf16)."""
        K, N = self.in_features, self.out_features
        eye = torch.eye(K, dtype=torch.bfloat16, device=self.packed.device)
        unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16, device=self.packed.device).expand_as(self.scale_zero)
        q = int4_mm(eye, self.packed, self.group_size, unit.contiguous())  # (K, N_pad) = W^T
        q = q[:, :N].t().round().to(torch.uint8)
        scale_zero = self.scale_zero[:, :N].transpose(0, 1).to(COMPUTE_DTYPE)  # (N, K/group, 2)
        return q.contiguous(), scale_zero[..., 0].contiguous(), scale_zero[..., 1].contiguous()

    def _apply(self, fn, recurse=True):
        # .to(device) moves raw bytes, but the packed layout differs between CPU and CUDA: take the
        # codes out on the old device and pack them again on the new one.
        moving = (self.packed.numel() > 0 and not self.packed.is_meta
                  and fn(torch.zeros(1, device=self.packed.device)).device != self.packed.device)
        codes = self.codes() if moving else None
        super()._apply(fn, recurse)
        if codes is not None:
            self.set_codes(*(fn(t) for t in codes))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = int4_mm(x.reshape(-1, shape[-1]).to(self.scale_zero.dtype), self.packed, self.group_size, self.scale_zero)
        y = y[:, :self.out_features].reshape(*shape[:-1], self.out_features)  # (..., out)
        return y + self.bias if self.bias is not None else y

    # The state dict holds the portable form (see the module docstring), not the kernel layout.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.tied:
            return
        if self.packed.is_meta:  # shapes only (checkpoint.expected_shapes builds models on meta; no ops on
            # meta tensors here: see checkpoint.SkipInitOnMeta)
            nibbles = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8, device="meta")
            scale = zero = torch.empty(self.out_features, self.in_features // self.group_size, dtype=COMPUTE_DTYPE, device="meta")
        else:
            q, scale, zero = self.codes()
            nibbles = pack_nibbles(q)
        destination[prefix + "weight"] = nibbles
        destination[prefix + "scales"], destination[prefix + "zeros"] = scale, zero
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        names = ["weight", "scales", "zeros"] + (["bias"] if self.bias is not None else [])
        missing = [prefix + n for n in names if prefix + n not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        self.set_codes(unpack_nibbles(state_dict[prefix + "weight"]), state_dict[prefix + "scales"], state_dict[prefix + "zeros"])
        if self.bias is not None:
            self.bias = state_dict[prefix + "bias"].to(self.scale_zero.dtype, copy=True)  # not a view of the file
        release_freed_memory()  # repacking's temporaries (see there)


class QuantEmbedding(nn.Module):
    """Token embedding stored like a quantized Linear's weight (vocab, n_embd): a lookup dequantizes
    only the rows it gathers. Same state-dict names as Int8Linear / the portable int4 form."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        V, C = num_embeddings, embedding_dim
        if bits == 8:
            self.register_buffer("weight", torch.zeros(V, C, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(V, dtype=COMPUTE_DTYPE))
        else:
            self.register_buffer("weight", torch.zeros(V, C // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(V, C // group_size, dtype=COMPUTE_DTYPE))
            self.register_buffer("zeros", torch.zeros(V, C // group_size, dtype=COMPUTE_DTYPE))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            rows = self.weight[tokens].to(self.scales.dtype) * self.scales[tokens, None]  # (..., C)
        else:
            rows = dequantize_int4(unpack_nibbles(self.weight[tokens.flatten()]), self.scales[tokens.flatten()],
                                   self.zeros[tokens.flatten()]).reshape(*tokens.shape, self.embedding_dim)
        return rows.to(self.scales.dtype)

    def as_linear(self) -> nn.Module:
        """The tied output head: the same matrix as an Int8Linear / Int4Linear (int4: repacked for the kernel)."""
        V, C = self.num_embeddings, self.embedding_dim
        if self.bits == 8:
            head = Int8Linear(C, V, bias=False)
            head.scales = self.scales
            head.set_codes(self.weight)  # shared storage, not a copy (a padded one for C not a multiple of 16)
        else:
            head = Int4Linear(C, V, bias=False, group_size=C // self.scales.shape[1])
            head.set_codes(unpack_nibbles(self.weight), self.scales, self.zeros)
        head.tied = True
        return head


# ----------------------------------------------------------------------------- whole models

def _swap(model: nn.Module, make) -> None:
    """Replace every nn.Linear below `model` by make(linear, qualified name)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{name}.{child_name}" if name else child_name
                setattr(module, child_name, make(child, full))


def swap_in(model, spec: dict, linear: Callable, embedding: Callable, tie_now: bool) -> None:
    """Swap in the quantized modules `spec` names: linear(nn.Linear, qualified name, bits) and
    embedding(nn.Embedding, bits) make them (empty ones to load into, or, in quantize/, converted from
    the floats). A tied head becomes the embedding's matrix as a Linear now (tie_now), or an
    nn.Identity placeholder until finish_loading."""
    head, emb = model.lm_head, model.tok_emb
    model.lm_head = nn.Identity()  # keep it out of the swap below: it follows embedding_bits
    _swap(model, lambda lin, name: linear(lin, name, spec["bits"]))
    model.tok_emb = embedding(emb, spec["embedding_bits"])
    if not model.config.tie_embeddings:
        model.lm_head = linear(head, "lm_head", spec["embedding_bits"])
    elif tie_now:
        model.lm_head = model.tok_emb.as_linear()
    model.quantization = dict(spec)


def empty_quantized(cfg, quant: dict):
    """A Transformer with the quantized modules `quant` (a checkpoint's metadata) names, ready for
    load_state_dict; build it under torch.device("meta")."""
    unknown = set(quant) - {"bits", "group_size", "embedding_bits"}
    if unknown:
        raise ValueError(f"unknown quantization fields {sorted(unknown)}")
    spec = make_spec(quant.get("bits"), quant.get("group_size"), quant.get("embedding_bits"))
    g = spec["group_size"]

    def linear(lin: nn.Linear, name: str, bits: int) -> nn.Module:
        bias = lin.bias is not None
        return Int8Linear(lin.in_features, lin.out_features, bias) if bits == 8 else Int4Linear(
            lin.in_features, lin.out_features, bias, g)

    model = Transformer(cfg)
    swap_in(model, spec, linear, lambda emb, bits: QuantEmbedding(emb.num_embeddings, emb.embedding_dim, bits, g),
            tie_now=False)
    return model


def finish_loading(model) -> None:
    """After load_state_dict: give every tensor read from the file its own memory, and build the tied
    head from the embedding.

    Own memory: once no tensor points into the memory-mapped file, its pages leave the process's
    resident set; and the int8 kernel never reads from the file mapping (it has crashed on such
    tensors: bench/README.md). int4 codes own their memory already (repacked at load)."""
    for m in model.modules():
        if not isinstance(m, Int4Linear):
            for name, b in list(m.named_buffers(recurse=False)):
                setattr(m, name, b.clone())
            for name, p in list(m.named_parameters(recurse=False)):
                setattr(m, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    if model.config.tie_embeddings:
        model.lm_head = model.tok_emb.as_linear()
    release_freed_memory()
