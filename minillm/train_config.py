"""What a training run is asked to do: TrainConfig (every field is a train.py flag), the presets
that fill what it leaves out, and the checks that refuse a configuration before anything is read or
written (ConfigError names the TrainConfig fields, so that train.py can show them as flags).

The loop itself is trainer.py; train_setup.py builds a run from a TrainConfig.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint
from .config import ModelConfig, preset

# Training presets: the model shape comes from config.PRESETS of the same name (finetune and lora take
# theirs from init_from, and are the default when it is given: a few minutes for SmolLM2-135M on 2 cores).
TRAIN_PRESETS: dict[str, dict] = {
    # nanoGPT's CPU config for shakespeare_char: reaches val ~1.88 in 2000 iters
    "baby": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250, eval_iters=20),
    # nanoGPT's GPU config: val ~1.47 after 5000 iters (needs a GPU to be quick)
    "shakespeare": dict(batch_size=64, max_iters=5000, lr=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250, eval_iters=200),
    # fine-tuning every weight of a checkpoint on a few KB of text
    "finetune": dict(batch_size=4, seq_len=128, max_iters=60, lr=1e-4, min_lr=1e-5, warmup_iters=5, eval_interval=10,
                     eval_iters=4),
    # LoRA adapters on a checkpoint: a larger lr (only the small adapters move)
    "lora": dict(batch_size=4, seq_len=128, max_iters=60, lr=1e-3, min_lr=1e-4, warmup_iters=5, eval_interval=10,
                 eval_iters=4),
}
KEEPS = ("best", "last")  # which weights NAME.safetensors keeps
ARCH_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "mlp_hidden", "dropout")
# The numeric fields and what each allows (a None field is left to the preset or unused)
INT_AT_LEAST = {"batch_size": 1, "grad_accum": 1, "eval_interval": 1, "eval_iters": 1, "max_iters": 0,
                "stop_after": 0, "warmup_iters": 0, "seed": 0, "lora_rank": 0, "seq_len": 1, "init_from_layers": 1,
                **{k: 1 for k in ARCH_FIELDS if k != "dropout"}}
FLOAT_RANGES = {  # field: (low, high, whether low itself is allowed, whether high itself is allowed)
    "lr": (0, math.inf, False, False), "min_lr": (0, math.inf, True, False),
    "weight_decay": (0, math.inf, True, False), "grad_clip": (0, math.inf, True, False),
    "beta1": (0, 1, True, False), "beta2": (0, 1, True, False), "dropout": (0, 1, True, False),
    "lora_alpha": (0, math.inf, False, False), "distill_temperature": (0, math.inf, False, False),
    "distill_alpha": (0, 1, True, True)}
MAX_SEED = 2**62  # torch seeds are 64-bit; DDP ranks add small offsets


class ConfigError(ValueError):
    """A TrainConfig that cannot mean anything. `fields` are the TrainConfig fields its message names,
    so that a command line can show them under its own flag names (train.py does)."""

    def __init__(self, message: str, *fields: str):
        super().__init__(message)
        self.fields = fields


@dataclass
class TrainConfig:
    name: str = "shakespeare-char"  # output file stem in out_dir
    out_dir: str = "weights"
    data: str | None = None  # a text file; default: tinyshakespeare (local copy, cache or download)
    preset: str | None = None  # model shape + training schedule (None: baby; finetune or lora with init_from)
    family: str = "gpt2"  # gpt2 | llama
    # model overrides (None: the preset's value)
    n_layer: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    mlp_hidden: int | None = None
    dropout: float | None = None
    attn_impl: str = "sdpa"
    # optimisation (None: the preset's value)
    batch_size: int | None = None
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int | None = None
    stop_after: int | None = None  # stop at this iteration (schedule still follows max_iters); continue with resume
    lr: float | None = None
    min_lr: float | None = None
    warmup_iters: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables
    eval_interval: int | None = None
    eval_iters: int | None = None
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | mps
    compile: bool = False
    resume: bool = False
    plot: bool = True
    keep: str = "best"  # which weights the model file keeps: best (lowest val loss) or last (the latest eval)
    # fine-tuning a checkpoint: its weights, config and tokenizer (architecture fields are then refused)
    init_from: str | None = None  # a .safetensors checkpoint to start from
    seq_len: int | None = None  # tokens per training sequence (finetune, lora: 128; other presets: the model's block_size)
    lora_rank: int = 0  # > 0: freeze the init_from model and train rank-R LoRA adapters only
    lora_alpha: float = 16.0  # adapter output scaled by alpha / rank
    lora_targets: str = "q,k,v,o"  # which Linear layers get adapters: q,k,v,o,gate,up,down
    merge: bool = False  # LoRA: also write the best adapters merged into a full checkpoint NAME.safetensors
    # distillation: loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)
    distill_from: str | None = None  # teacher checkpoint; the student must share its tokenizer
    distill_temperature: float = 2.0  # T
    distill_alpha: float = 0.5  # alpha: weight of the teacher's soft targets
    init_from_layers: int | None = None  # student = the teacher's first N blocks (+ embeddings, final norm, head)

    def resolved(self) -> "TrainConfig":
        """A copy with the preset's values filled in for every None (the preset: baby, or with init_from
        finetune / lora). An eval_interval left to the preset that would skip every eval before the end
        becomes a fifth of the run, so that a short run is still evaluated as it goes."""
        name = self.preset or ("lora" if self.lora_rank and self.init_from else "finetune" if self.init_from else "baby")
        if name not in TRAIN_PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {sorted(TRAIN_PRESETS)}", "preset")
        filled = {k: v for k, v in TRAIN_PRESETS[name].items() if getattr(self, k) is None}
        out = dataclasses.replace(self, preset=name, **filled)
        if self.eval_interval is None and out.eval_interval >= out.max_iters > 1:
            out.eval_interval = max(1, out.max_iters // 5)
        return out

    def check(self) -> None:
        """Refuse values and field combinations that cannot mean anything (ConfigError, naming the
        fields), before anything is read or written. Call it on the resolved() config."""
        check_numbers(self)
        check_name(self.name)
        if self.keep not in KEEPS:
            raise ConfigError(f"keep must be one of {KEEPS}, got {self.keep!r}", "keep")
        if self.preset in ("finetune", "lora") and not self.init_from:
            raise ConfigError(f"preset {self.preset} fine-tunes a checkpoint: it needs init_from", "preset", "init_from")
        arch = [k for k in ARCH_FIELDS if getattr(self, k) is not None]
        if (self.init_from or self.init_from_layers is not None) and arch:
            source = "init_from" if self.init_from else "init_from_layers"
            raise ConfigError(f"{source} takes the architecture from the checkpoint, so {', '.join(arch)} cannot "
                              "be set (use seq_len for the training sequence length)", source, *arch, "seq_len")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0, got {self.lora_rank}", "lora_rank")
        if self.lora_rank and not self.init_from:
            raise ConfigError("lora_rank needs init_from: adapters adapt a pretrained checkpoint", "lora_rank", "init_from")
        if self.merge and not self.lora_rank:
            raise ConfigError("merge folds LoRA adapters into the base: it needs lora_rank > 0", "merge", "lora_rank")
        check_not_own_output(self)
        if self.init_from_layers is not None and not self.distill_from:
            raise ConfigError("init_from_layers copies the teacher's first layers: it needs distill_from",
                              "init_from_layers", "distill_from")
        if self.init_from_layers is not None and self.init_from:
            raise ConfigError("init_from and init_from_layers both choose the student's weights; pass one",
                              "init_from", "init_from_layers")
        if not self.init_from and self.init_from_layers is None:
            try:  # a fresh model's shape: the same checks ModelConfig makes, named as fields here
                self.model_config(vocab_size=1)
            except ValueError as e:
                raise ConfigError(str(e).replace("ModelConfig.", ""), *ARCH_FIELDS, "family", "attn_impl") from None

    def model_config(self, vocab_size: int) -> ModelConfig:
        over = {k: getattr(self, k) for k in ARCH_FIELDS if getattr(self, k) is not None}
        return preset(self.preset, family=self.family, vocab_size=vocab_size, attn_impl=self.attn_impl, **over)

    @property
    def last_iter(self) -> int:
        """The iteration this run stops at: max_iters, or stop_after when earlier."""
        return self.max_iters if self.stop_after is None else min(self.stop_after, self.max_iters)


def check_numbers(tc: TrainConfig) -> None:
    """Every numeric field within what it allows (INT_AT_LEAST, FLOAT_RANGES): ConfigError naming it."""
    for name, low in INT_AT_LEAST.items():
        value = getattr(tc, name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a whole number, got {value!r}", name)
        if not low <= value <= MAX_SEED:
            raise ConfigError(f"{name} must be >= {low}{' and <= 2**62' if value > 0 else ''}, got {value}", name)
    for name, (low, high, low_ok, high_ok) in FLOAT_RANGES.items():
        value = getattr(tc, name)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (ok and (low < value or low_ok and value == low) and (value < high or high_ok and value == high)):
            above = f">= {low}" if low_ok else f"> {low}"
            below = "" if high == math.inf else f" and {'<=' if high_ok else '<'} {high}"
            raise ConfigError(f"{name} must be a number {above}{below}, got {value!r}", name)


def check_not_own_output(tc: TrainConfig) -> None:
    """No file the run reads (init_from, distill_from, data) may be one it writes (Files.of), through links too."""
    files = Files.of(tc)
    for name in ("init_from", "distill_from", "data"):
        src = getattr(tc, name)
        for out in (files.model, files.adapters, files.state):
            if src and out.exists() and Path(src).exists() and os.path.samefile(src, out):
                raise ConfigError(f"{name} {src} is this run's own output {out}: the run would overwrite what it "
                                  "reads; choose another name or out_dir", name, "name", "out_dir")


def check_name(name: str) -> None:
    """A run's name is a file stem inside out_dir: no folder part, no '..', nothing hidden or empty."""
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    if not name or name.startswith(".") or any(sep in name for sep in seps) or "\0" in name:
        raise ConfigError(f"name must be a plain file stem, with no folder part (its files go in out_dir), got {name!r}",
                          "name", "out_dir")


@dataclass(frozen=True)
class Files:
    """The files of a run named NAME in out_dir (see the module docstring)."""
    model: Path
    adapters: Path
    state: Path
    plot: Path
    lock: Path  # held while a run writes the others (output_lock)

    @classmethod
    def of(cls, tc: TrainConfig) -> "Files":
        out = Path(tc.out_dir)
        model = out / f"{tc.name}.safetensors"
        return cls(model, out / f"{tc.name}.lora.safetensors", checkpoint.train_state_path(model),
                   out / f"{tc.name}.loss.png", out / f"{tc.name}.lock")
