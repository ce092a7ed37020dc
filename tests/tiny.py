"""The tests' one tiny-model factory: the "nano" preset (2 layers, 4 heads, width 32, context 32) with a
40-token vocabulary and, for the llama family, grouped-query attention (2 K/V heads). A test passes
what it needs different (its vocabulary, context, sizes, attention) as overrides; n_kv_head=None gives
a llama model one K/V head per head."""

import torch

from minillm.config import PRESETS, ModelConfig
from minillm.model import Transformer


def tiny_config(family: str = "llama", **overrides) -> ModelConfig:
    base = {**PRESETS["nano"], "family": family, "vocab_size": 40, "n_kv_head": 2 if family == "llama" else None}
    return ModelConfig(**{**base, **overrides})


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> Transformer:
    """A random tiny model in eval mode, its weights drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return Transformer(tiny_config(family, **overrides)).eval()


def lively(model: Transformer) -> Transformer:
    """Larger random weights (give the model an untied head): a freshly initialised tiny model repeats one
    character greedily, which would make token-for-token comparisons too easy to pass."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "emb" in name else 0.3)
    return model.eval()
