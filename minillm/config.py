"""ModelConfig: every size and switch of the transformer, and the named presets.

This is the only place model sizes live. A config is stored as JSON inside each checkpoint,
so `ModelConfig.from_dict(cfg.to_dict())` must give the same model back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

FAMILIES = ("gpt2", "llama")
ATTN_IMPLS = ("manual", "sdpa")
MAX_CONTEXT = 1 << 20  # tokens: RoPE tables and a KV cache of 2**20 positions already take GBs
WHOLE = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "mlp_hidden", "head_dim")


@dataclass
class ModelConfig:
    family: str = "gpt2"  # "gpt2": learned positions, LayerNorm, GELU MLP, biases; "llama": RoPE, RMSNorm, SwiGLU
    vocab_size: int = 65  # tokenizer size (65 = tinyshakespeare's distinct characters)
    block_size: int = 64  # longest sequence the model accepts (context length)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: int | None = None  # grouped-query attention: K/V heads (None: = n_head; gpt2 needs n_head)
    mlp_hidden: int | None = None  # MLP width (None: 4*n_embd for gpt2, ~8/3*n_embd rounded to 32 for llama)
    bias: bool | None = None  # biases in Linear/LayerNorm (None: True for gpt2, False for llama)
    qkv_bias: bool = False  # biases on the q, k and v projections only (Qwen2), whatever `bias` says
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)
    head_dim: int | None = None  # width of one attention head (None: n_embd // n_head)
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # llama only
    rope_scaling: dict | None = None  # llama3-style: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    attn_impl: str = "sdpa"  # "manual": attention written out; "sdpa": F.scaled_dot_product_attention

    def __post_init__(self):
        """Fill the derived fields and refuse a model that cannot compute: every size a whole number
        >= 1, the context at most MAX_CONTEXT, heads dividing the width, norm_eps and rope_theta finite
        and > 0 (a ValueError naming the field; the loader and the converters add the file)."""
        self._check_numbers()
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family must be one of {FAMILIES}, got {self.family!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"ModelConfig.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"ModelConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be an even number >= 2, got {self.head_dim}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"ModelConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.family == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError("ModelConfig.n_kv_head: grouped-query attention is a llama-family feature; gpt2 needs n_kv_head == n_head")
        if self.bias is None:
            self.bias = self.family == "gpt2"
        if self.mlp_hidden is None:
            if self.family == "gpt2":
                self.mlp_hidden = 4 * self.n_embd
            else:  # SwiGLU has 3 matrices: 2/3 of 4x keeps the parameter count of a 4x GELU MLP
                self.mlp_hidden = 32 * -(-(8 * self.n_embd // 3) // 32)
        if self.rope_scaling is not None:
            need = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            missing = need - set(self.rope_scaling)
            if missing:
                raise ValueError(f"ModelConfig.rope_scaling is missing {sorted(missing)}")
            bad = {k: v for k, v in self.rope_scaling.items() if k in need and not _positive(v)}
            if bad:
                raise ValueError(f"ModelConfig.rope_scaling values must be finite numbers > 0, got {bad}")

    def _check_numbers(self) -> None:
        for name in WHOLE:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"ModelConfig.{name} must be a whole number >= 1, got {value!r}")
        if self.block_size > MAX_CONTEXT:
            raise ValueError(f"ModelConfig.block_size (the context) must be at most {MAX_CONTEXT:,} tokens, got "
                             f"{self.block_size:,}")
        for name in ("norm_eps", "rope_theta"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"ModelConfig.{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if not (_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x) -> bool:
    return _number(x) and x > 0


# Named model shapes. Training presets (iterations, lr, batch) live in train_config.py.
PRESETS: dict[str, dict] = {
    # nanoGPT's CPU shakespeare_char config: 0.8M parameters
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    # nanoGPT's GPU shakespeare_char config: 10.7M parameters
    "shakespeare": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
    # tiny shapes for tests
    "nano": dict(n_layer=2, n_head=4, n_embd=32, block_size=32),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
