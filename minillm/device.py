"""Which device to run on, and in which precision a forward pass runs there.

    pick_device("auto")   a CUDA GPU if there is one, else Apple's MPS, else the CPU
    autocast_for(device)  bf16 autocast on a CUDA GPU that supports it, float32 everywhere else
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager

import torch


def pick_device(name: str = "auto") -> torch.device:
    """The device called `name` (cpu, cuda, cuda:1, mps), or for "auto" the best one present."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def uses_bf16(device: torch.device) -> bool:
    """True on a CUDA GPU with bf16 support: there matmuls run in bf16 under autocast."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast_for(device: torch.device) -> Callable[[], ContextManager]:
    """A factory of the context each forward runs in: `with autocast(): logits = model(x)`.
    bf16 autocast where `uses_bf16`, else a context that changes nothing (float32)."""
    if uses_bf16(device):
        return functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext
