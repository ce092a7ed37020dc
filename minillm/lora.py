"""LoRA: fine-tune a frozen model through small low-rank adapters (Hu et al., 2021).

A targeted Linear layer y = x Wᵀ + b keeps W frozen and learns a low-rank change to it:

    y = x Wᵀ + b + (alpha / r) · (x Aᵀ) Bᵀ        A: (r, in_features), B: (out_features, r)

B starts at zero, so at step 0 the adapted model is exactly the base model; A starts random, so
B's gradient is not zero and learning can begin. r·(in + out) numbers per layer instead of in·out.
After training, W + (alpha / r) · B A is an ordinary weight again: `merge_lora` folds the adapters
in and the result is a plain checkpoint that needs no LoRA code to load (`save_merged` does it file to file).

An adapters file is a small .safetensors holding only the A and B matrices (under the model's
names, e.g. `blocks.3.attn.q_proj.lora_A`) and, in its metadata:
    format        "minillm-lora/1"
    lora          JSON: rank, alpha, targets
    base          the base checkpoint's path when the adapters were trained
    base_sha256   the base file's sha256: adapters only make sense on the exact weights they were trained on
    config        the base's ModelConfig (JSON), checked too for a clearer error
    provenance    JSON: the training run

Fold an adapters file into its base afterwards (train.py --merge does the same at the end of a run):
    python -m minillm.lora weights/BASE.safetensors weights/NAME.lora.safetensors --out weights/NAME.safetensors

For the trainer, `Adapters` is LoRA as a trainable set: what trains, and what the best-val save writes.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from . import checkpoint
from .data import file_sha256
from .flags import Parser, add_input, add_output, fail
from .model import Transformer
from .trainer import count_trainable  # noqa: F401  (lora.count_trainable, as before)

FORMAT = "minillm-lora/1"
# short target names -> the Linear layers they mean in every block (model.py's names)
TARGETS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


class LoRAError(ValueError):
    """Adapters that do not fit the model they are being loaded onto, or a bad LoRA setting."""


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update. It keeps the Linear's own `weight` and
    `bias` parameters under the same names, so the base tensors' state-dict keys do not change."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 0:
            raise LoRAError(f"LoRA rank must be >= 0, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the very same Parameters: no copy
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank if rank > 0 else 0.0
        self.enabled = True  # False: behave exactly as the base layer (compare with and without)
        if rank > 0:
            w = base.weight
            self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init for an (r, in) weight

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # the base layer, bit for bit
        if self.rank > 0 and self.enabled:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling  # (.., in) -> (.., r) -> (.., out)
        return y

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) · B A: the one matrix that computes what base + adapter compute."""
        if self.rank == 0:
            return self.weight.detach().clone()
        return (self.weight + (self.lora_B @ self.lora_A) * self.scaling).detach()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def parse_targets(targets: str | list[str], family: str) -> list[str]:
    """'q,k,v,o' -> ['q', 'k', 'v', 'o'], checked against TARGETS and the model family."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    names = [t for t in names if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise LoRAError(f"LoRA targets {unknown or names} not understood; choose from {','.join(TARGETS)}")
    if "gate" in names and family != "llama":
        raise LoRAError("LoRA target 'gate' exists only in the llama family (SwiGLU); this model is gpt2")
    return list(dict.fromkeys(names))


def apply_lora(model: Transformer, rank: int, alpha: float, targets: str | list[str]) -> list[str]:
    """Freeze every parameter of `model`, then put a LoRALinear around each targeted Linear of every
    block (in place). Returns the wrapped layers' names. Only lora_A / lora_B are left trainable."""
    names = parse_targets(targets, model.config.family)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for i, block in enumerate(model.blocks):
        for t in names:
            parent_name, attr = TARGETS[t].split(".")
            parent = getattr(block, parent_name)
            layer = getattr(parent, attr)
            if not isinstance(layer, LoRALinear):
                setattr(parent, attr, LoRALinear(layer, rank, alpha))
            wrapped.append(f"blocks.{i}.{TARGETS[t]}")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    for m in lora_layers(model).values():
        m.enabled = enabled


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Just the adapter matrices, under their full names (`blocks.0.attn.q_proj.lora_A`, ...)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def lora_settings(model: nn.Module) -> dict:
    """rank, alpha and targets of the adapters in `model` (one setting for all layers)."""
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA adapters")
    first = next(iter(layers.values()))
    targets = [t for t, suffix in TARGETS.items() if any(n.endswith(suffix) for n in layers)]
    return {"rank": first.rank, "alpha": first.alpha, "targets": targets}


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its weight and put a plain Linear back (in place): the model is then
    an ordinary Transformer, with the same outputs, that checkpoint.save_model stores as usual."""
    for name, layer in lora_layers(model).items():
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device="meta")  # no memory: both tensors are assigned just below
        plain.weight = nn.Parameter(layer.merged_weight(), requires_grad=layer.weight.requires_grad)
        if layer.bias is not None:
            plain.bias = layer.bias
        setattr(parent, attr, plain)
    return model


def save_adapters(path: str | Path, model: Transformer, base_path: str | Path, base_sha256: str | None = None,
                  provenance: dict | None = None) -> None:
    """Write the adapter matrices and what they belong to (see the module docstring), atomically.
    Pass base_sha256 when it is already known: hashing a big base file takes a second or two."""
    metadata = {"format": FORMAT, "lora": json.dumps(lora_settings(model)), "base": str(base_path),
                "base_sha256": base_sha256 or file_sha256(base_path), "config": model.config.to_json(),
                "provenance": json.dumps(provenance or {})}
    checkpoint.atomic_save(lora_state_dict(model), path, metadata)


def load_adapters(path: str | Path, model: Transformer, base_path: str | Path) -> dict:
    """Put the adapters of file `path` onto `model`, which was loaded from `base_path` (in place).

    The base file must hash to the adapters' recorded base_sha256: adapters trained on other weights
    would load without complaint and compute nonsense, so a mismatch is an error. Returns the metadata."""
    path = Path(path)
    meta = checkpoint.read_metadata(path)
    if meta.get("format") != FORMAT:
        raise LoRAError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r} (not a minillm adapters file)")
    found = file_sha256(base_path)
    if found != meta["base_sha256"]:
        raise LoRAError(f"{path}: these adapters were trained on base {meta['base']} (sha256 {meta['base_sha256'][:16]}…), "
                        f"but {base_path} has sha256 {found[:16]}…: wrong base checkpoint")
    if json.loads(meta["config"]) != model.config.to_dict():
        raise LoRAError(f"{path}: the adapters' base config differs from the model's config")
    settings = json.loads(meta["lora"])
    apply_lora(model, settings["rank"], settings["alpha"], settings["targets"])
    expected = {k: tuple(v.shape) for k, v in lora_state_dict(model).items()}
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        if names != set(expected):
            odd = sorted(names ^ set(expected))
            raise LoRAError(f"{path}: adapter tensors do not match the settings {settings}: e.g. {odd[0]!r}")
        tensors = {k: f.get_tensor(k) for k in names}
    for k, v in tensors.items():
        if tuple(v.shape) != expected[k]:
            raise LoRAError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}, expected {expected[k]}")
    model.load_state_dict(tensors, strict=False)
    return meta


def save_merged(base_path: str | Path, adapters_path: str | Path, out_path: str | Path) -> None:
    """Load the base checkpoint, put the adapters file on it, fold them in and save the result as a
    plain checkpoint (base tokenizer; provenance: the adapters' run, plus which adapters and base)."""
    loaded = checkpoint.load_model(base_path)
    meta = load_adapters(adapters_path, loaded.model, base_path)
    merge_lora(loaded.model)
    provenance = {**json.loads(meta.get("provenance", "{}")), "lora_merged": str(adapters_path),
                  "base_sha256": meta["base_sha256"]}
    checkpoint.save_model(out_path, loaded.model, loaded.tokenizer, provenance)


@dataclass
class Adapters:
    """LoRA as the trainer's trainable set (trainer.FullModel is the other one): `prepare` freezes the
    model and wraps its targeted layers; `save_best` writes the adapters alone, naming their base."""
    rank: int
    alpha: float
    targets: str
    path: Path  # where the best-val adapters go (NAME.lora.safetensors)
    base_path: str  # the checkpoint being adapted
    base_sha256: str
    trainable_only: ClassVar[bool] = True  # a training state keeps the adapters; the base is base_path

    def prepare(self, model: Transformer) -> None:
        apply_lora(model, self.rank, self.alpha, self.targets)

    def save_best(self, model: Transformer, provenance: dict) -> None:
        save_adapters(self.path, model, self.base_path, self.base_sha256, provenance)


def make_parser():
    p = Parser(prog="python -m minillm.lora", description="Merge a LoRA adapters file into its base checkpoint.")
    add_input(p, "base", help="the base checkpoint the adapters were trained on")
    add_input(p, "adapters", help="the adapters file (NAME.lora.safetensors)")
    add_output(p, "--out", required=True, help="where to write the merged checkpoint")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    try:
        save_merged(args.base, args.adapters, args.out)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    print(f"merged {args.adapters} into {args.base} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
