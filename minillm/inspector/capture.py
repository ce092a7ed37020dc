"""Capture: forward hooks that record what a forward pass computes inside the model, changing nothing.

While a Capture is active, each forward pass appends to
    residual   the residual stream after the embedding and after every block, each (B, T, C)
    attention  per Attention call, its probabilities (B, nh, T, S), float32

How attention is captured. PyTorch's fused attention (SDPA) never materialises the probabilities, and
the model is not ours to switch: the inspector does not touch model.config, attn_impl or any weight.
A hook on each Attention module reads that call's inputs (x, rope, mask, cache, start_pos) and
recomputes the probabilities on the written-out path, exactly as Attention.attend does it: q and k
from x (and the cache's earlier keys), RoPE, q·kᵀ/√hd, the causal mask, softmax in float32. The
model's own output is untouched (the hooks only read), so:
  * a model running the written-out path ("manual") multiplied V by exactly these maps, bit for bit;
  * a model running SDPA multiplied V by the same probabilities computed in another order: in float32,
    o_proj(maps @ V) agrees with the module's output to ~1e-6 relative (tests/test_inspector.py
    checks both cases).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kv_cache import KVCache


@torch.no_grad()
def attention_probs(attn, x: torch.Tensor, rope, mask, cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
    """An Attention module's probabilities for one call, from that call's inputs: x (B, T, C), rope,
    mask (T, S) or None, and the cache it wrote to (read after the call: it then holds keys
    0..start_pos+T-1). -> (B, nh, T, S) float32, S = T without a cache."""
    cfg = attn.cfg
    B, T, _ = x.shape
    q, k, _ = attn.project(x, rope)  # (B, nh, T, hd), (B, nkv, T, hd): as the call computed them
    if cache is not None:
        k = cache.k[attn.layer][:, :, :start_pos + T]  # (B, nkv, S, hd): every key the call attended to
    if cfg.n_kv_head != cfg.n_head:
        k = k.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)  # (B, nh, S, hd)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(cfg.head_dim))  # (B, nh, T, S)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return F.softmax(att.float(), dim=-1)


class Capture:
    """Context manager: hooks on the model while active, none left after (also after an error)."""

    def __init__(self, model, attention: bool = True):
        self.model, self.want_attention = model, attention
        self.residual: list[torch.Tensor] = []
        self.attention: list[torch.Tensor] = []
        self._handles = []

    def __enter__(self):
        m = self.model
        self._handles.append(m.drop.register_forward_hook(self._residual_hook))  # the embedding's output
        for block in m.blocks:
            self._handles.append(block.register_forward_hook(self._residual_hook))
            if self.want_attention:
                self._handles.append(block.attn.register_forward_hook(self._attn_hook))
        return self

    def _residual_hook(self, module, args, out):
        self.residual.append(out.detach())

    def _attn_hook(self, attn, args, out):
        x, rope, mask, cache, start_pos = args  # Attention.forward's positional arguments
        self.attention.append(attention_probs(attn, x, rope, mask, cache, start_pos))

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False
