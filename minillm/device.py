"""Which device to run on, and in which precision a forward pass runs there.

    pick_device("auto")   a CUDA GPU if there is one, else Apple's MPS, else the CPU
    autocast_for(device)  bf16 autocast on a CUDA GPU that supports it, float32 everywhere else
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager

import torch


def available_devices() -> list[str]:
    """The device names this machine can run on: cpu, then cuda:N for each GPU, then mps."""
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def pick_device(name: str = "auto") -> torch.device:
    """The device called `name` (cpu, cuda, cuda:1, mps), or for "auto" the best one present.
    A name that is not a device, or a device this machine lacks, is a ValueError naming those it has."""
    if name == "auto":
        here = available_devices()
        return torch.device("cuda" if len(here) > 1 and here[1].startswith("cuda") else here[-1])
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    here = available_devices()
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not a device name: use auto or one of {', '.join(here)}")
    present = device.type in {torch.device(h).type for h in here}
    if not present or (device.type == "cuda" and device.index is not None and str(device) not in here):
        raise ValueError(f"device {name!r} is not available on this machine (torch {torch.__version__}): "
                         f"use auto or one of {', '.join(here)}")
    return device


def uses_bf16(device: torch.device) -> bool:
    """True on a CUDA GPU with bf16 support: there matmuls run in bf16 under autocast."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast_for(device: torch.device) -> Callable[[], ContextManager]:
    """A factory of the context each forward runs in: `with autocast(): logits = model(x)`.
    bf16 autocast where `uses_bf16`, else a context that changes nothing (float32)."""
    if uses_bf16(device):
        return functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext
