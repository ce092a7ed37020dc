"""The training loop behind train.py: AdamW, warmup + cosine LR, clipping, accumulation,
periodic eval, best-val checkpoints, exact resume.

A run goes through three phases, each a function below:
    setup        load_sources, load_ids, build_model, make_loss, make_trainable, make_optimizer,
                 resume, distribute: everything before the first step, gathered in a `Run`
    train_loop   nanoGPT's loop: every eval_interval evaluate and save; then set the lr, forward and
                 backward over grad_accum micro-batches, clip, step
    finish       DDP check, LoRA merge, loss plot, the TrainResult
The loop is given two small objects. The loss, called as loss(model, x, y): `cross_entropy`, or
distill.DistillLoss with a teacher. The trainable set, which says what trains (`prepare`) and what
a new best val writes (`save_best`): `FullModel`, or lora.Adapters.

What is trained, and on which ids:
    from scratch (default)   a char-level model of the preset's shape, alphabet taken from the text
    init_from=CKPT           the checkpoint's weights, config and tokenizer (full fine-tune); the text is
                             tokenized with that tokenizer once and cached (data.cached_token_ids)
    ... lora_rank=R          the checkpoint frozen, only LoRA adapters trained (lora.py)
    distill_from=TEACHER     loss mixes the labels with the teacher's distribution (distill.py); the student
                             is fresh (preset/shape fields, the teacher's vocabulary), init_from, or the
                             teacher's first N blocks (init_from_layers=N)

Files written for a run named NAME in out_dir:
    NAME.safetensors         the best-val model (our format: weights + config + tokenizer + provenance);
                             with LoRA only when merge=True (the best adapters folded into the base)
    NAME.lora.safetensors    LoRA: the best-val adapters only, naming their base checkpoint and its sha256
    NAME.train.safetensors   the latest training state: weights, optimizer moments, step, RNG states
    NAME.loss.png            train/val loss curve (when matplotlib is installed)
    NAME.lock                held (flock) by the run writing these files, removed when it ends: a second
                             run of the same name and folder is refused meanwhile
A resume continues the training state only with the data it was trained on (its sha256 is in the
state) and only forward (max_iters above the saved iteration).

Every value is checked before anything is read or written (TrainConfig.check). Errors about the
configuration are ConfigError and name TrainConfig fields (lora_rank); train.py shows them as flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

try:
    import fcntl  # the output lock (Linux, macOS)
except ImportError:  # Windows: runs are not locked
    fcntl = None
import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, data, ddp, distill, lora
from .config import ModelConfig, preset
from .device import autocast_for, pick_device, uses_bf16
from .model import Transformer
from .tokenizer import CharTokenizer, check_same_tokenizer

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
    def stop(self) -> int:
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


class TrainingDiverged(RuntimeError):
    pass


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says which checkpoint is the last good one and how to
    continue. `fields` as in ConfigError."""

    def __init__(self, message: str, *fields: str):
        super().__init__(message)
        self.fields = fields


@dataclass
class TrainResult:
    model_path: Path
    best_val: float
    final_train: float
    final_val: float
    iters: int
    ms_per_iter: float  # median over training steps (eval steps excluded)
    tokens_per_s: float
    wall_s: float
    history: list = field(default_factory=list)  # (iter, train loss) per step
    evals: list = field(default_factory=list)  # (iter, train loss, val loss) per eval
    adapters_path: Path | None = None  # LoRA runs: the adapters file
    trainable_params: int = 0


@dataclass
class Step:
    """What the loop reports after each optimizer step (train.py draws its progress bar from it)."""
    iter: int  # iterations done
    first: int  # the iteration this run started at (> 0 when resumed)
    stop: int  # the iteration it stops at
    loss: float
    lr: float
    ms: float
    tokens: int  # tokens per step, all ranks together


# ----------------------------------------------------------------------------- the loss and the trainable set

def cross_entropy(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default loss: next-token cross-entropy of the model's logits against the labels."""
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@dataclass
class FullModel:
    """The default trainable set (lora.Adapters is the other one): every weight trains, and a new best
    val saves the whole model as a checkpoint with its tokenizer."""
    path: Path
    tokenizer: object
    trainable_only: ClassVar[bool] = False  # a training state keeps every weight

    def prepare(self, model: Transformer) -> None:
        pass  # every parameter already trains

    def save_best(self, model: Transformer, provenance: dict) -> None:
        checkpoint.save_model(self.path, model, self.tokenizer, provenance)


# ----------------------------------------------------------------------------- what the loop works with

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


@dataclass
class Batches:
    """nanoGPT's get_batch: random windows of seq_len tokens from one split. Under DDP every rank draws
    the same global batch (batch_size rows per rank) and keeps its own rows (see ddp.py)."""
    splits: dict[str, np.ndarray]  # "train", "val" -> token ids
    seq_len: int
    batch_size: int
    device: torch.device
    rank: ddp.Rank = ddp.Rank()

    def get(self, split: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.batch_size * self.rank.world
        return data.get_batch(self.splits[split], self.seq_len, rows, gen, self.device, self.rank.rows)


@dataclass
class Run:
    """What the loop works with, built once by `setup`."""
    tc: TrainConfig
    files: Files
    model: Transformer  # the weights: evaluation, clipping and saving use it
    step_model: torch.nn.Module  # what a training step calls: the model, maybe compiled, maybe DDP-wrapped
    optimizer: torch.optim.Optimizer
    loss: Callable  # loss(model, x, y): cross_entropy or distill.DistillLoss
    trainable: FullModel | lora.Adapters
    batches: Batches
    autocast: Callable  # () -> the context a forward runs in (device.autocast_for)
    source: dict  # provenance that every save shares: data, its sha256, the config
    log: Callable
    t_start: float

    @property
    def rank(self) -> ddp.Rank:
        return self.batches.rank

    @property
    def tokens_per_iter(self) -> int:
        return self.tc.batch_size * self.tc.grad_accum * self.batches.seq_len * self.rank.world


@dataclass
class State:
    """What changes as the loop runs; the training-state file keeps it and a resume restores it."""
    batch_gen: torch.Generator  # the training batches' random stream
    iter: int = 0  # the next iteration to run
    best_val: float = math.inf
    evals: list = field(default_factory=list)  # (iter, train loss, val loss) per eval
    history: list = field(default_factory=list)  # (iter, train loss) per step of this process
    step_ms: list = field(default_factory=list)
    resumed_at: int | None = None  # the eval at this iteration was done before the run stopped
    saved_at: int | None = None  # the iteration the training-state file holds (rank 0 wrote it)


# ----------------------------------------------------------------------------- the loop

def lr_at(it: int, tc: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_iters."""
    if it < tc.warmup_iters:
        return tc.lr * (it + 1) / (tc.warmup_iters + 1)
    progress = min(1.0, (it - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters))
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def train_loop(run: Run, state: State, on_step: Callable[[Step], None] | None = None) -> None:
    """nanoGPT's loop: every eval_interval iterations evaluate (and save); then one optimizer step:
    set the lr, accumulate gradients, clip, step. A last evaluation when it stops."""
    tc, model, optimizer = run.tc, run.model, run.optimizer
    first = state.iter
    model.train()
    for it in range(first, tc.stop):
        if it % tc.eval_interval == 0 and it != state.resumed_at:
            evaluate_and_save(run, state, it)
        t0 = time.perf_counter()
        lr = lr_at(it, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = forward_backward(run, state.batch_gen)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss} at iter {it} (lr {lr:.2e}); stopping: {last_good(run, state)}")
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step_ms.append((time.perf_counter() - t0) * 1000)
        state.history.append((it + 1, loss))
        state.iter = it + 1
        if on_step is not None:
            on_step(Step(it + 1, first, tc.stop, loss, lr, state.step_ms[-1], run.tokens_per_iter))
    evaluate_and_save(run, state, tc.stop)


def last_good(run: Run, state: State) -> str:
    """Which files of this run hold good weights: the best-val checkpoint, and the training state a
    resume continues from (said when training stops early: divergence, Ctrl-C)."""
    if not math.isfinite(state.best_val):
        return "no checkpoint was written"
    val = state.evals[-1][2] if run.tc.keep == "last" else state.best_val
    kept = f"the last good checkpoint is kept at {run.trainable.path} (val {val:.4f})"
    if state.saved_at is not None:
        kept += f"; resume continues from iter {state.saved_at} ({run.files.state})"
    return kept


def forward_backward(run: Run, gen: torch.Generator) -> float:
    """One step's gradients, summed over grad_accum micro-batches whose losses are divided by grad_accum
    (so the sum is the mean). Returns the step's loss, averaged over the DDP ranks."""
    n = run.tc.grad_accum
    total = 0.0
    for micro in range(n):
        x, y = run.batches.get("train", gen)
        with ddp.sync_gradients(run.step_model, sync=micro == n - 1):  # all-reduce once, after the last
            with run.autocast():
                loss = run.loss(run.step_model, x, y) / n
            loss.backward()
        total += loss.item()
    return ddp.mean_over_ranks(total, run.rank, run.batches.device)


@torch.no_grad()
def estimate_loss(model, batches: Batches, eval_iters: int, seed: int,
                  autocast: Callable = contextlib.nullcontext) -> dict[str, float]:
    """Mean cross-entropy over eval_iters batches per split; the same batches at every eval (a generator
    of its own, seeded `seed`). Under DDP each rank scores its rows of the global batches and the means
    are averaged: every rank gets the single-process number."""
    model.eval()
    out = {}
    for split in batches.splits:
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(eval_iters):
            x, y = batches.get(split, gen)
            with autocast():
                losses.append(cross_entropy(model, x, y).item())
        out[split] = ddp.mean_over_ranks(sum(losses) / len(losses), batches.rank, batches.device)
    model.train()
    return out


def evaluate_and_save(run: Run, state: State, it: int) -> dict[str, float]:
    """Eval losses at iteration `it`. A new best val saves the trainable set (the model, or the LoRA
    adapters); the training state is saved every time, so that a resume continues from here."""
    losses = estimate_loss(run.model, run.batches, run.tc.eval_iters, run.tc.seed + 1, run.autocast)
    state.evals.append((it, losses["train"], losses["val"]))
    saved = ""
    improved = losses["val"] < state.best_val
    if improved or run.tc.keep == "last":
        if run.rank.main:  # one writer: rank 0
            run.trainable.save_best(run.model, {**run.source, "step": it, "val_loss": losses["val"],
                                                "train_loss": losses["train"], "kept": run.tc.keep})
            saved = f" -> saved {run.trainable.path}"
    if improved:
        state.best_val = losses["val"]
    if run.rank.main:
        counters = {"iter": it, "best_val": state.best_val, "evals": state.evals, "config": run.model.config.to_dict(),
                    "data": run.source["data"], "data_sha256": run.source["data_sha256"]}
        checkpoint.save_train_state(run.files.state, run.optimizer, counters, rng_states(state, run.batches.device),
                                    run.model, trainable_only=run.trainable.trainable_only)
    state.saved_at = it
    run.log(f"iter {it}: train {losses['train']:.4f}, val {losses['val']:.4f}{saved}")
    return losses


def rng_states(state: State, device: torch.device) -> dict[str, torch.Tensor]:
    """Every random stream the loop draws from: batches, dropout (CPU), dropout (CUDA)."""
    rng = {"batch": state.batch_gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


# ----------------------------------------------------------------------------- setup, phase by phase

def train(tc: TrainConfig, log: Callable = print, on_step: Callable[[Step], None] | None = None) -> TrainResult:
    """Train as tc says: setup, train_loop, finish. log(line) gets the run's messages, on_step(Step)
    a report after every step. Under torchrun (WORLD_SIZE > 1) this is one data-parallel rank (see
    ddp.py): rank 0 logs, reports and writes the files, every rank returns the same result.
    Ctrl-C during the loop raises TrainingInterrupted, which says what was saved."""
    tc = tc.resolved()
    tc.check()  # before a process group is joined or any file is read or written
    r, device_name = ddp.setup(tc.device)
    with ddp.process_group(r):
        return run_phases(tc, r, pick_device(device_name), log if r.main else quiet, on_step if r.main else None)


def run_phases(tc: TrainConfig, r: ddp.Rank, device: torch.device, log: Callable,
               on_step: Callable[[Step], None] | None) -> TrainResult:
    """setup, train_loop, finish, with the output lock held from setup to the end."""
    with contextlib.ExitStack() as held:
        run, state = setup(tc, r, device, log, held)
        try:
            train_loop(run, state, on_step)
        except KeyboardInterrupt:
            raise TrainingInterrupted(f"interrupted at iter {state.iter}: {last_good(run, state)}", "resume") from None
        return finish(run, state)


def quiet(*args, **kwargs) -> None:
    """The log of every rank but rank 0."""


def setup(tc: TrainConfig, r: ddp.Rank, device: torch.device, log: Callable,
          held: contextlib.ExitStack) -> tuple[Run, State]:
    """Everything before the first step: sources, data, model, loss, trainable set, optimizer, the
    output lock (rank 0 holds it in `held`), resume, DDP. Nothing is written before the lock is held."""
    t_start = time.perf_counter()
    files = Files.of(tc)
    if tc.resume and not files.state.is_file():
        raise FileNotFoundError(f"nothing to resume: no training state at {files.state}")
    text_path = data.resolve_text_path(tc.data)
    source = source_provenance(tc, text_path)
    tokenizer, init, teacher = load_sources(tc, files.model)
    tokenizer, ids = load_ids(text_path, tokenizer, from_checkpoint=init is not None or teacher is not None)
    torch.manual_seed(tc.seed)
    model = build_model(tc, tokenizer, init, teacher).to(device)
    seq_len = check_fits(tc, model.config, teacher)
    splits = make_splits(ids, text_path, seq_len)
    loss = make_loss(tc, teacher, device)
    trainable = make_trainable(tc, files, tokenizer)
    trainable.prepare(model)
    optimizer = make_optimizer(model, tc, device)
    if r.main:  # the one writer holds the lock to the end, from before a resume reads the state
        held.enter_context(output_lock(files.lock))
    state = State(torch.Generator().manual_seed(tc.seed))
    if tc.resume:
        resume(files.state, tc, source, model, optimizer, state, device)
        log(f"resumed from {files.state} at iter {state.iter} (best val {state.best_val:.4f})")
    step_model = distribute(model, tc, r, device, state.iter)
    batches = Batches(splits, seq_len, tc.batch_size, device, r)
    run = Run(tc, files, model, step_model, optimizer, loss, trainable, batches, autocast_for(device),
              source, log, t_start)
    log_setup(run, text_path, teacher)
    return run, state


@contextlib.contextmanager
def output_lock(path: Path):
    """Hold `path` (NAME.lock in out_dir) while this run writes NAME's files: another run of the same
    name in the same folder is refused meanwhile (ConfigError). An OS lock (flock): the OS drops it
    when the process ends, even when killed. The file is removed at the end; one left by a killed
    run is not locked, and the next run takes it."""
    fd = take_lock(path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: a run that opened this file meanwhile sees it gone (take_lock)
        os.close(fd)


def take_lock(path: Path) -> int:
    """Open and lock `path`, making its folder if need be -> the open descriptor (see output_lock)."""
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"out_dir {folder} is a file, not a folder", "out_dir")
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"cannot write in out_dir {folder}: {e.strerror}", "out_dir") from None
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"another run (pid {holder}) is writing the files of name {path.stem!r} in {folder} "
                              f"(it holds {path.name}): wait for it to end, or pick another name", "name") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # still the file at `path`: the lock is ours
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        os.close(fd)  # the run that held it removed it as we opened it: lock the new one


def load_sources(tc: TrainConfig, model_path: Path):
    """The checkpoints a run starts from, and the tokenizer it trains with: (tokenizer, init, teacher).

    init and teacher are checkpoint.Loaded (or None). The tokenizer is the init_from checkpoint's,
    else the teacher's, else (resuming a char run) the saved model's, else None: build one from the text."""
    init = checkpoint.load_model(tc.init_from) if tc.init_from else None
    teacher = checkpoint.load_model(tc.distill_from) if tc.distill_from else None
    if init is not None and teacher is not None:
        check_same_tokenizer(teacher.tokenizer, init.tokenizer, f"teacher {tc.distill_from}",
                             f"student {tc.init_from}", purpose="distillation")
    if init is not None:
        return init.tokenizer, init, teacher
    if teacher is not None:
        return teacher.tokenizer, None, teacher
    if tc.resume:
        return checkpoint.load_model(model_path).tokenizer, None, None
    return None, None, None


def load_ids(text_path: Path, tokenizer, from_checkpoint: bool) -> tuple[object, np.ndarray]:
    """The text's token ids and the tokenizer that made them. A checkpoint's tokenizer (BPE) encodes
    once and the ids are memory-mapped from a cache; the char path takes its alphabet from the text
    (or, resuming, from the saved model)."""
    if from_checkpoint:
        return tokenizer, data.cached_token_ids(text_path, tokenizer)
    text = data.read_text(text_path)
    tokenizer = tokenizer or CharTokenizer.from_text(text)
    return tokenizer, np.array(tokenizer.encode(text), dtype=data.id_dtype(tokenizer.vocab_size))


def build_model(tc: TrainConfig, tokenizer, init, teacher) -> Transformer:
    """The model to train: the init_from checkpoint's, the teacher's first layers, or a fresh one."""
    if init is not None:
        return init.model
    if tc.init_from_layers is not None:
        return distill.truncated_copy(teacher.model, tc.init_from_layers)
    return Transformer(tc.model_config(tokenizer.vocab_size))


def check_fits(tc: TrainConfig, cfg: ModelConfig, teacher) -> int:
    """The training sequence length (seq_len, default the model's block_size), checked against the
    model's and the teacher's context; a teacher must also predict over the student's vocabulary."""
    seq_len = tc.seq_len or cfg.block_size
    limits = [("the model", cfg.block_size)] + ([("the teacher", teacher.config.block_size)] if teacher else [])
    for who, limit in limits:
        if seq_len > limit:
            raise ConfigError(f"seq_len {seq_len} is longer than {who}'s context (block_size {limit})", "seq_len")
    if teacher is not None and teacher.config.vocab_size != cfg.vocab_size:
        raise ValueError(f"teacher {tc.distill_from} predicts {teacher.config.vocab_size} ids but the student "
                         f"{cfg.vocab_size}: distillation needs one vocabulary")
    return seq_len


def make_splits(ids: np.ndarray, text_path: Path, seq_len: int) -> dict[str, np.ndarray]:
    """The train and val splits of the text's ids (data.split_train_val), each long enough to draw a
    training sequence from: a ConfigError says which split of which file is too short."""
    try:
        splits = dict(zip(("train", "val"), data.split_train_val(ids)))
    except ValueError:
        raise ValueError(f"{text_path} has {len(ids)} tokens: too few to split into train and val") from None
    for split, part in splits.items():
        if len(part) <= seq_len:
            where = "first" if split == "train" else "last"
            raise ConfigError(f"the {split} split of {text_path} (the {where} {len(part):,} of its {len(ids):,} tokens) "
                              f"is too short for one sequence of seq_len {seq_len} (+1 for the labels): "
                              "use a longer text or a shorter seq_len", "seq_len")
    return splits


def make_loss(tc: TrainConfig, teacher, device: torch.device) -> Callable:
    """What the loop minimises: cross-entropy, or with a teacher the distillation mix (distill.py)."""
    if teacher is None:
        return cross_entropy
    teacher.model.to(device).eval().requires_grad_(False)
    return distill.DistillLoss(teacher.model, tc.distill_temperature, tc.distill_alpha)


def make_trainable(tc: TrainConfig, files: Files, tokenizer) -> FullModel | lora.Adapters:
    """What trains: the whole model, or (lora_rank > 0) LoRA adapters on the frozen init_from checkpoint."""
    if not tc.lora_rank:
        return FullModel(files.model, tokenizer)
    return lora.Adapters(tc.lora_rank, tc.lora_alpha, tc.lora_targets, files.adapters, tc.init_from,
                         data.file_sha256(tc.init_from))


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """Weight decay on 2-D weights (matmuls, embeddings) only; never on biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    cuda = device.type == "cuda"  # fused kernel on CUDA; multi-tensor (foreach) updates elsewhere, not a per-tensor loop
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=cuda, foreach=not cuda)


def resume(path: Path, tc: TrainConfig, source: dict, model: Transformer, optimizer: torch.optim.Optimizer,
           state: State, device: torch.device) -> None:
    """Continue where the training-state file left off: the latest weights, optimizer moments, counters
    and every random stream, so that the run goes on exactly as if it had never stopped."""
    check_resumable(path, tc, checkpoint.train_state_info(path), source, model.config)  # before any tensor is read
    saved, rng = checkpoint.load_train_state(path, optimizer, model)
    state.iter = state.resumed_at = state.saved_at = saved["iter"]
    state.best_val, state.evals = saved["best_val"], [tuple(e) for e in saved["evals"]]
    state.batch_gen.set_state(rng["batch"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])


def check_resumable(path: Path, tc: TrainConfig, saved: dict, source: dict, cfg: ModelConfig) -> None:
    """A resume goes on with the same model and data, and forward: it never rewinds over later weights."""
    if saved["config"] != cfg.to_dict():
        ours = cfg.to_dict()
        diff = [k for k in ours if saved["config"].get(k) != ours[k]]
        was = ", ".join(f"{k} {saved['config'].get(k)}" for k in diff)
        raise ConfigError(f"cannot continue {path}: it was trained with {was}; this run asks for "
                          f"{', '.join(f'{k} {ours[k]}' for k in diff)}. Pass the same shape, or leave out resume "
                          "to start fresh", *diff, "resume")
    if saved.get("data_sha256", source["data_sha256"]) != source["data_sha256"]:  # older states: not recorded
        raise ConfigError(f"cannot continue {path}: it was trained on {saved.get('data')} (sha256 "
                          f"{saved['data_sha256'][:12]}), not on {source['data']} (sha256 {source['data_sha256'][:12]}); "
                          "resume needs the same data. To start fresh, leave out resume (the run's files are "
                          "then replaced) or pick another name", "data", "resume", "name")
    if tc.stop <= saved["iter"]:
        field = "stop_after" if tc.stop_after is not None and tc.stop_after < tc.max_iters else "max_iters"
        raise ConfigError(f"cannot continue {path}: it is at iter {saved['iter']} and {field} {getattr(tc, field)} "
                          f"does not go past it; pass a {field} above {saved['iter']} to continue", field)


def distribute(model: Transformer, tc: TrainConfig, r: ddp.Rank, device: torch.device, start_iter: int):
    """What a training step calls: the model, compiled if asked, then wrapped for DDP when there are
    several ranks (nanoGPT's order)."""
    step_model = torch.compile(model) if tc.compile else model
    if r.world > 1:
        step_model = ddp.wrap(step_model, device)
        torch.manual_seed(tc.seed + 7919 * r.rank + start_iter)  # dropout: each rank its own masks (see ddp.py)
    return step_model


def source_provenance(tc: TrainConfig, text_path: Path) -> dict:
    """What every saved file records about the run that made it (each save adds step and losses)."""
    prov = {"source": "minillm train.py", "data": str(text_path), "data_sha256": data.file_sha256(text_path),
            "train_config": dataclasses.asdict(tc)}
    if tc.init_from:
        prov["init_from"] = tc.init_from
    if tc.distill_from:
        prov["distilled_from"] = tc.distill_from
    return prov


def log_setup(run: Run, text_path: Path, teacher) -> None:
    """What trains on what: parameters, data, tokens per iteration, device (nanoGPT prints the same)."""
    tc, cfg, r = run.tc, run.model.config, run.rank
    n_trainable, n_total = lora.count_trainable(run.model)
    n_train, n_val = (len(ids) for ids in run.batches.splits.values())
    start = f"from {tc.init_from}" if tc.init_from else (
        f"from the teacher's first {tc.init_from_layers} layers" if tc.init_from_layers else "fresh")
    run.log(f"model: {cfg.family} ({start}), {n_total / 1e6:.2f}M parameters, {n_trainable / 1e6:.3f}M trainable"
            f"{f' (LoRA rank {tc.lora_rank} on {tc.lora_targets})' if tc.lora_rank else ''}, vocab {cfg.vocab_size}; "
            f"data: {text_path} ({n_train:,} train / {n_val:,} val tokens); "
            f"{run.tokens_per_iter:,} tokens/iter on {run.batches.device}"
            f"{' (bf16 autocast)' if uses_bf16(run.batches.device) else ''}"
            f"{f' x {r.world} DDP ranks (batch {tc.batch_size} per rank)' if r.world > 1 else ''}")
    evals = (f"eval every {tc.eval_interval} iters on {tc.eval_iters} batches" if tc.eval_interval < tc.stop
             else f"eval only at iters 0 and {tc.stop} (eval_interval {tc.eval_interval})")
    run.log(f"schedule (preset {tc.preset}): {tc.max_iters} iters of {tc.batch_size} x {run.batches.seq_len} tokens, "
            f"lr {tc.lr:g} after {tc.warmup_iters} warm-up iters (rising from {lr_at(0, tc):.1e}), cosine to "
            f"{tc.min_lr:g}; {evals}; keeping the {tc.keep} weights")
    if teacher is not None:
        run.log(f"distilling from {tc.distill_from} ({teacher.model.num_params() / 1e6:.2f}M parameters), "
                f"T={tc.distill_temperature}, alpha={tc.distill_alpha}")


# ----------------------------------------------------------------------------- finish

def finish(run: Run, state: State) -> TrainResult:
    """After the last eval: check that the DDP ranks agree, fold the best LoRA adapters into the base
    (merge), plot the loss curve, and sum the run up."""
    tc, files, r, log = run.tc, run.files, run.rank, run.log
    if r.world > 1:
        log(f"{r.world} DDP ranks hold identical weights (sha256 {ddp.check_identical(run.model, r)[:16]})")
    report_no_gain(run, state)
    if tc.merge and r.main:  # the best-val adapters (not necessarily the last ones), folded into the base
        lora.save_merged(tc.init_from, files.adapters, files.model)
        log(f"merged the adapters of {files.adapters} into {files.model}")
    wall = time.perf_counter() - run.t_start
    ms = statistics.median(state.step_ms) if state.step_ms else float("nan")
    tokens_per_s = run.tokens_per_iter / ms * 1000
    if tc.plot and r.main and save_loss_plot(files.plot, state.history, state.evals):
        log(f"loss curve: {files.plot}")
    log(f"done: {tc.stop} iters, best val {state.best_val:.4f}, median {ms:.1f} ms/iter "
        f"({tokens_per_s:,.0f} tokens/s), wall {wall:.1f} s")
    _, final_train, final_val = state.evals[-1]
    adapters = files.adapters if tc.lora_rank else None
    return TrainResult(adapters if adapters and not tc.merge else files.model, state.best_val, final_train,
                       final_val, tc.stop, ms, tokens_per_s, wall, state.history, state.evals, adapters,
                       lora.count_trainable(run.model)[0])


def report_no_gain(run: Run, state: State) -> None:
    """Say plainly, in the log and in the kept file's provenance, when keeping the best weights kept the
    first evaluation's: no later one beat it (a fine-tune that overfits a tiny text keeps its start)."""
    evals = state.evals
    if run.tc.keep != "best" or len(evals) < 2 or min(e[2] for e in evals[1:]) < evals[0][2]:
        return
    (i0, _, v0), (i1, _, v1) = evals[0], evals[-1]
    note = (f"no evaluation beat the first (val {v0:.4f} at iter {i0}; the last: {v1:.4f} at iter {i1}), so "
            f"{run.trainable.path} holds the weights of iter {i0}")
    if run.rank.main:
        checkpoint.amend_provenance(run.trainable.path, {"note": note})
    run.log(f"note: {note}; more text, a lower lr or fewer iters may help, and keep=last keeps the latest weights")


def save_loss_plot(path: Path, history, evals) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        ax.plot(*zip(*history), lw=0.5, alpha=0.5, label="train (batch)")
    if evals:
        it, tr, va = zip(*evals)
        ax.plot(it, tr, "o-", label="train (eval)")
        ax.plot(it, va, "o-", label="val (eval)")
    ax.set_xlabel("iteration"), ax.set_ylabel("cross-entropy loss"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
