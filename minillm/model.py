"""The transformer: GPT-2 and LLaMA families side by side in one readable file.

| part            | gpt2                          | llama                                 |
|-----------------|-------------------------------|---------------------------------------|
| position        | learned absolute embedding    | RoPE rotation of q and k              |
| norm            | LayerNorm (with bias)         | RMSNorm                               |
| MLP             | GELU (tanh approx), 4x        | SwiGLU: down(silu(gate(x)) * up(x))   |
| K/V heads       | n_head                        | n_kv_head (grouped-query attention)   |
| biases          | yes                           | no                                    |
| output head     | tied to the token embedding   | tied or separate                      |

`forward(tokens, cache=None, start_pos=0)` covers training (no cache), prefill (many tokens into an
empty cache), decode (one token) and speculative verification (k tokens appended, later cropped).
Attention is written out (Attention.attend); config.attn_impl="sdpa" takes the same maths through
F.scaled_dot_product_attention instead, and tests/test_model.py holds the two equal. This file is the
reference: faster routes to the same numbers live in speed.py, which this file never mentions.
Shapes: B batch, T new tokens, S = start_pos + T visible positions, C n_embd, nh heads, hd head_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring or bias (computed in fp32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "gpt2":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(cfg.n_embd, cfg.norm_eps)


# ----------------------------------------------------------------------------- RoPE (llama)

def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotation speed of each of the head_dim/2 channel pairs: theta^(-2i/hd), optionally llama3-scaled."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = cfg.rope_scaling
    if s is not None:
        # Llama 3.1: slow channels (wavelength > old_ctx/low) are slowed by `factor`, fast ones
        # (wavelength < old_ctx/high) are kept, and the band between is blended linearly.
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        smooth = smooth.clamp(0.0, 1.0)  # 0: long wavelength (scale), 1: short wavelength (keep)
        inv_freq = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    return inv_freq.float()


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, (block_size, head_dim/2) each, float32, on the
    default device. Computed on the CPU, so that building a model on the meta device runs no meta ops."""
    with torch.device("cpu"):
        angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), rope_inv_freq(cfg))
        cos, sin = angles.cos(), angles.sin()
    return cos.to(torch.get_default_device()), sin.to(torch.get_default_device())


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hd) by position. Layout: channel i pairs with channel i + hd/2
    ("rotate half", as Hugging Face stores LLaMA weights; GGUF/Meta weights are permuted on import)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hd/2) each
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


# ----------------------------------------------------------------------------- blocks

class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, nh * hd, bias=cfg.bias or cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, nkv * hd, bias=cfg.bias or cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, nkv * hd, bias=cfg.bias or cfg.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:  # Qwen3: each head's q and k scaled to unit RMS (learned gain) before RoPE
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.norm_eps), RMSNorm(hd, cfg.norm_eps)
        self.dropout = cfg.dropout

    def forward(self, x, rope, mask, cache: KVCache | None, start_pos: int):
        B, T, _ = x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start_pos)  # (B, nkv, S, hd), S = start_pos + T
        y = self.attend(q, k, v, mask)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh*hd): heads side by side again
        return F.dropout(self.o_proj(y), self.dropout if self.training else 0.0, self.training)

    def project(self, x, rope):
        """x (B, T, C) -> q (B, nh, T, hd), k and v (B, nkv, T, hd), q and k rotated by position."""
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = self.qkv(x)  # (B, T, nh*hd), (B, T, nkv*hd) twice
        q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # over hd, per head and position
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def qkv(self, x):
        """x's three projections, heads side by side (one method: a faster route may do one matmul)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q, k, v, mask):
        """softmax(q·kᵀ/√hd, causal) · v for q (B, nh, T, hd) and k, v (B, nkv, S, hd); mask (T, S)
        is True where a query may see a key (None: T == 1, the newest token sees every key)."""
        cfg = self.cfg
        gqa = cfg.n_kv_head != cfg.n_head  # GQA: each K/V head serves n_head/n_kv_head query heads
        p_drop = self.dropout if self.training else 0.0
        if cfg.attn_impl == "sdpa":  # the same maths in one fused call
            square = mask is not None and mask.shape[0] == mask.shape[1]  # plain causal: its fast path
            return F.scaled_dot_product_attention(q, k, v, attn_mask=None if square else mask, dropout_p=p_drop,
                                                  is_causal=square, enable_gqa=gqa)
        if gqa:
            rep = cfg.n_head // cfg.n_kv_head
            k = k.repeat_interleave(rep, dim=1)  # (B, nh, S, hd)
            v = v.repeat_interleave(rep, dim=1)  # (B, nh, S, hd)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(cfg.head_dim))  # (B, nh, T, S)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))  # a query never sees later keys
        att = F.softmax(att.float(), dim=-1).type_as(q)  # (B, nh, T, S), each row sums to 1
        att = F.dropout(att, p_drop, self.training)
        return att @ v  # (B, nh, T, hd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.family = cfg.family
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        if cfg.family == "llama":
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.family == "gpt2":
            h = F.gelu(self.up_proj(x), approximate="tanh")
        else:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # SwiGLU
        return self.dropout(self.down_proj(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache, start_pos):
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, start_pos)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.family == "gpt2":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:
            cos, sin = rope_tables(cfg)  # (block_size, hd/2) each
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _apply(self, fn, recurse=True):
        # .to(device / dtype) goes through here. Keep the RoPE tables float32 whatever the weights
        # become: angles rounded to bf16 would be off by whole radians at long positions.
        super()._apply(fn, recurse)
        if self.config.family == "llama":
            device = self.rope_cos.device
            self.rope_cos, self.rope_sin = (t.to(device) for t in rope_tables(self.config))
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied matrix once

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) at positions start_pos..start_pos+T-1 -> logits (B, T, vocab), or (B, 1, vocab)
        with last_only. One call serves every use: training (no cache), prefill (the prompt into an
        empty cache), decode (one token) and speculative verification (k tokens appended, cropped later).
        Without a cache the model sees only `tokens`; with one, also the cache's first start_pos positions."""
        cfg = self.config
        B, T = tokens.shape
        end = start_pos + T
        if end > cfg.block_size:
            raise ValueError(f"sequence of {end} positions exceeds the model's context (block_size={cfg.block_size})")
        pos = torch.arange(start_pos, end, device=tokens.device)  # (T,)
        x = self.tok_emb(tokens)  # (B, T, C)
        rope = None
        if cfg.family == "gpt2":
            x = x + self.pos_emb(pos)  # (B, T, C) + (T, C)
        else:
            rope = (self.rope_cos[pos], self.rope_sin[pos])  # (T, hd/2) each; applied to q and k in attention
        x = self.drop(x)
        # Causal mask: query i sits at position start_pos + i and sees keys 0..start_pos + i, a (T, S)
        # lower triangle shifted right by the S - T cached positions. One new token sees every key.
        S = end if cache is not None else T
        mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=tokens.device).tril(S - T)
        for block in self.blocks:
            x = block(x, rope, mask, cache, start_pos)  # (B, T, C)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): only the next token's logits (a prompt's vocab-wide logits are large)
        return self.lm_head(self.norm(x))  # (B, T, vocab)
