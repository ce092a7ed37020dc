"""KVCache: preallocated keys and values for every layer, a length, append and crop.

Decoding one token at a time would recompute every earlier position's keys and values at each
step. The cache keeps them: prefill writes the prompt's K/V once, each decode step appends one
position, and speculative decoding appends k positions then `crop`s back to what was accepted.

The buffers are allocated once, (batch, n_kv_head, max_len, head_dim) per layer, so decoding never
reallocates. Positions >= `length` hold stale values and are never read.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        # torch.empty, not zeros: nothing past `length` is ever read, and pages never written stay
        # out of memory (SmolLM2's full 8192-position cache would be 377 MB in fp32).
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0  # positions 0..length-1 are valid

    @classmethod
    def for_model(cls, model, batch_size: int = 1, max_len: int | None = None) -> "KVCache":
        """A cache shaped for `model`, in the dtype its activations take (that of its floating-point
        parameters) on its device; max_len defaults to the context length."""
        cfg = model.config
        max_len = cfg.block_size if max_len is None else max_len
        if not 1 <= max_len <= cfg.block_size:
            raise ValueError(f"KVCache max_len must be in [1, {cfg.block_size}] (the model's context), got {max_len}")
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return cls(cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim, dtype, model.tok_emb.weight.device)

    @classmethod
    def for_run(cls, model, batch_size: int, prompt_len: int, max_new_tokens: int) -> "KVCache":
        """The one sizing rule: as many positions as a run feeds the model (the prompt and every new
        token but the last, which is never fed back), at most the context. A 32k-context model's full
        cache would be GBs per row."""
        fed = max(1, prompt_len + max(0, max_new_tokens - 1))
        return cls.for_model(model, batch_size, min(model.config.block_size, fed))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_head, T, head_dim) at positions start_pos..start_pos+T-1 and return
        the valid keys and values (B, n_kv_head, start_pos+T, head_dim).

        Writing at start_pos < length overwrites (an implicit crop); start_pos > length would leave
        a gap of unwritten positions and is an error."""
        B, _, T, _ = k.shape
        end = self.check_write(B, start_pos, T)
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        self.length = end  # every layer writes the same positions, so each sets the same length
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def check_write(self, B: int, start_pos: int, T: int) -> int:
        """The rules for writing T positions of a batch of B rows from start_pos (update's, and a step's
        that writes the buffers itself) -> the end, start_pos + T, the length after the write."""
        end = start_pos + T
        if B != self.batch_size:
            raise ValueError(f"KVCache was built for batch {self.batch_size}, got a batch of {B}")
        if start_pos > self.length:
            raise ValueError(f"KVCache: start_pos {start_pos} is past the cached length {self.length} (positions would be missing)")
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {end} positions needed, the cache holds {self.max_len} "
                             f"(context full; ask generate() for a sliding window, or use a shorter prompt)")
        return end

    def crop(self, n: int) -> None:
        """Roll back to the first n positions (speculative decoding drops rejected drafts this way)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"KVCache.crop: n must be in [0, {self.length}], got {n}")
        self.length = n

    def reset(self) -> None:
        self.length = 0
