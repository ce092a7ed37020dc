"""The one place where q/k rows are permuted between the two RoPE layouts.

RoPE rotates pairs of channels of each head. Two conventions exist for *which* channels pair up:

    interleaved  (Meta's original llama, GGUF/llama.cpp): channel 2i pairs with 2i+1
    rotate-half  (Hugging Face, and minillm's model.py):   channel i  pairs with i + head_dim/2

Both compute the same attention if the rows of W_q and W_k (the output channels of each head) are
reordered to match, because q·k is unchanged by applying one permutation to both q and k. Hugging
Face's conversion script from Meta weights permutes rows so that, within each head, the even rows
(first of each pair) come first and the odd rows second; GGUF files are written from HF weights with
the inverse, i.e. back to interleaved. We keep HF's rotate-half layout (as LitGPT does), so:

    Hugging Face -> ours:    nothing to do
    GGUF (llama) -> ours:    unpermute (below)
    GGUF (qwen2, qwen3):     nothing to do: llama.cpp permutes rows for its llama architecture only;
                             Qwen models rotate halves (its NEOX RoPE mode), so their rows stay HF's
    ours -> GGUF/Meta:       permute (used by the tests to make llama GGUF files)

Per head, a weight of shape (n_heads * head_dim, in) is viewed as (n_heads, head_dim/2, 2, in) in the
interleaved layout (pair index, member of the pair); rotate-half wants (n_heads, 2, head_dim/2, in).
n_heads is the number of heads *of that matrix*: n_head for q, n_kv_head for k.
"""

from __future__ import annotations

import torch


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved (GGUF/Meta) rows -> rotate-half (HF/ours). w: (n_heads*head_dim, in) or a bias (n_heads*head_dim,)."""
    out = w.shape[0]
    rest = w.shape[1:]
    return (w.reshape(n_heads, out // n_heads // 2, 2, *rest)  # (nh, hd/2, 2, in): pair i = rows 2i, 2i+1
             .transpose(1, 2)                                     # (nh, 2, hd/2, in): first members, then second
             .reshape(out, *rest))


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half (HF/ours) rows -> interleaved (GGUF/Meta); the inverse of `unpermute`."""
    out = w.shape[0]
    rest = w.shape[1:]
    return (w.reshape(n_heads, 2, out // n_heads // 2, *rest)  # (nh, 2, hd/2, in)
             .transpose(1, 2)                                     # (nh, hd/2, 2, in)
             .reshape(out, *rest))
