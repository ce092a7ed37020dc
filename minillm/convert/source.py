"""What every reader (hf.py, gguf.py) produces: a `Source`, and the checks it is built with.

A Source is a ModelConfig, a tokenizer, and an explicit map from each of our tensor names to a
small recipe that produces it (read, transpose, split, dequantize, un-permute) together with the
shape it will have. A reader fills the map through a `TensorMap`, which checks every source tensor
it takes for presence and shape as it goes and can name the ones nothing took.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import ModelConfig
from ..tokenizer import BPETokenizer, CharTokenizer


class ConvertError(ValueError):
    """The source cannot be converted: unreadable, unsupported, or inconsistent. Nothing was written."""


@dataclass
class Tensor:
    """How to make one of our tensors: `shape` is known without reading; `load()` reads it (float)."""
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    source: str  # the source tensor name(s), for messages
    kind: str = ""  # the source's storage type (GGUF: "Q4_1", "F32", ...), for reports
    codes: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    # codes: a block-quantized source's own int4 codes (q (N, K) in [0, 15], scale, zero (N, K/32)) with
    # W = (q - 8) * scale + zero, as quantize stores them (blocks.py): lets --keep-quant skip the float round trip


@dataclass
class Entry:
    """One tensor of the file being written: shape and dtype known up front, `load()` makes it."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    source: str


@dataclass
class Source:
    config: ModelConfig
    tokenizer: BPETokenizer | CharTokenizer
    tensors: dict[str, Tensor]  # our name -> recipe
    provenance: dict = field(default_factory=dict)
    files: list = field(default_factory=list)  # the files it reads (an output may be none of them)


# recipe(source name, transform or None, our shape) -> Tensor: how a reader reads one of its tensors
Recipe = Callable[[str, Callable | None, tuple[int, ...]], Tensor]


class TensorMap:
    """Our tensor names -> recipes, filled one `take` at a time from a source's tensors.

    shapes: every tensor the source holds -> its shape (GGUF's reversed to (out, in)).
    implied_by: what the expected shapes come from ("config.json", "the GGUF metadata"), for messages."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], implied_by: str, recipe: Recipe):
        self.shapes, self.implied_by, self.recipe = shapes, implied_by, recipe
        self.tensors: dict[str, Tensor] = {}
        self.used: set[str] = set()

    def take(self, ours: str, theirs: str, shape: tuple[int, ...], transform: Callable | None = None,
             out_shape: tuple[int, ...] | None = None) -> None:
        """Our `ours` is source tensor `theirs`, which must exist with `shape`, passed through
        `transform` when it is read (then of shape `out_shape`)."""
        if theirs not in self.shapes:
            raise ConvertError(f"missing tensor {theirs!r} (needed for {ours!r})")
        if tuple(self.shapes[theirs]) != tuple(shape):
            raise ConvertError(f"tensor {theirs!r} has shape {tuple(self.shapes[theirs])}, but {self.implied_by} "
                               f"implies {tuple(shape)}: config and weights disagree")
        self.tensors[ours] = self.recipe(theirs, transform, tuple(out_shape or shape))
        self.used.add(theirs)

    def unused(self, ignore: re.Pattern | None = None) -> list[str]:
        """Source tensors no `take` used (and `ignore` does not match), sorted: a conversion must not drop weights."""
        return sorted(n for n in self.shapes if n not in self.used and not (ignore and ignore.match(n)))
