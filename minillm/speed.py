"""The speed layer: faster ways to compute exactly what model.py computes, opted into by the caller.

model.py is the reference a reader learns from and never mentions this file. A command line (or a
user) calls `speed_up(model)` after loading, and optionally `compile_decode(model)`; both change the
model in place by giving some of its modules a subclass whose one overridden method takes a faster
route to the same numbers (tests/test_speed.py holds each against the reference):

* FewRowLinear: a float32 x @ Wᵀ of 2..FEW_ROWS rows (speculative verification of k drafts, a short
  prompt) taken as (W @ xᵀ)ᵀ, which streams W once like the one-row product does. PyTorch's CPU GEMM
  is slower for so few rows (`python -m bench.step_cost few-rows` prints both). CPU, float32, no grad only.
* GQADecodeAttention: at decode (one query token, grouped-query attention, SDPA), the n_head/n_kv_head
  query heads that share a K/V head become that many query rows of it, so the cached K/V are read
  once instead of being expanded per query head.
* compile_decode: one-token cached calls without grad run through torch.compile (the many small ops
  between the matmuls fused); every other call stays eager. The first such call compiles (needs a
  C++ compiler; minutes for a 135M model on two CPU cores).
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kv_cache import KVCache
from .model import Attention, Transformer


class FewRowLinear(nn.Linear):
    FEW_ROWS = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if 1 < rows <= self.FEW_ROWS and x.dtype == torch.float32 and x.device.type == "cpu" \
                and self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            y = (self.weight @ x.reshape(rows, self.in_features).t()).t()  # (rows, out)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        return super().forward(x)


class GQADecodeAttention(Attention):
    def attend(self, q, k, v, mask):
        cfg = self.cfg
        B, nh, T, hd = q.shape
        if cfg.attn_impl != "sdpa" or cfg.n_kv_head == nh or T != 1 or mask is not None:
            return super().attend(q, k, v, mask)
        p_drop = self.dropout if self.training else 0.0
        q = q.reshape(B, cfg.n_kv_head, nh // cfg.n_kv_head, hd)  # (B, nkv, rep, hd): rep query rows per K/V head
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop)  # (B, nkv, rep, hd)
        return y.reshape(B, nh, 1, hd)


class CompiledDecode(Transformer):
    def forward(self, tokens, cache=None, start_pos=0, last_only=False):
        if tokens.shape[1] == 1 and cache is not None and not torch.is_grad_enabled():
            # fresh strides: a column sliced from the loop's token buffer would recompile the step
            return self.compiled_step(tokens.clone(memory_format=torch.contiguous_format), cache, start_pos, last_only)
        return super().forward(tokens, cache, start_pos, last_only)


def speed_up(model: Transformer) -> Transformer:
    """Give every plain nn.Linear the few-row route and every attention the GQA decode route, in place."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FewRowLinear
        elif type(module) is Attention:
            module.__class__ = GQADecodeAttention
    return model


def compile_decode(model: Transformer) -> Transformer:
    """From now on run one-token cached calls without grad through torch.compile, in place (see above).
    The compile itself happens at the first such call: warm_up(model) makes that call now."""
    model.compiled_step = torch.compile(functools.partial(Transformer.forward, model), dynamic=True)
    model.__class__ = CompiledDecode
    return model


def warm_up(model: Transformer) -> float:
    """Compile a compile_decode model's one-token step now, on a short throwaway cache, instead of in
    the middle of the first decode (where it was counted as decoding time) -> the seconds it took."""
    t0 = time.perf_counter()
    with torch.inference_mode():  # as the decode loops call it (generate.next_logits): no guard differs
        device = model.tok_emb.weight.device
        cache = KVCache.for_model(model, 1, min(8, model.config.block_size))
        model(torch.zeros(1, 2, dtype=torch.long, device=device), cache, 0, last_only=True)  # eager prefill
        model(torch.zeros(1, 1, dtype=torch.long, device=device), cache, 2, last_only=True)  # compiles
    return time.perf_counter() - t0
