"""A training step, read top to bottom: the batches, the learning rate, forward and backward, the
evaluation (and the best-val save), then the loop that runs them (nanoGPT's train.py, the same order).

    Batches          random windows of seq_len tokens from the train or val split
    lr_at            linear warmup, then cosine decay to min_lr
    forward_backward gradients of one step over grad_accum micro-batches
    estimate_loss    mean loss per split on fixed batches; evaluate_and_save keeps the best weights
    train_loop       every eval_interval: evaluate; then lr, forward/backward, clip, optimizer step

The loop is handed everything in a `Run`: the model, the optimizer, the loss (called as
loss(model, x, y): `cross_entropy` here, or a distillation loss) and the trainable set (what a
new best val writes: `FullModel` here, or LoRA adapters). It names no such layer: train_setup.py
builds the Run from a TrainConfig (train_config.py), with the output lock (train_lock.py) and DDP
(ddp.py); train_resume.py writes and reads the training state; train_finish.py sums the run up.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, data, ddp
from .model import Transformer
from .train_config import Files, TrainConfig
from .train_resume import save_state


@dataclass
class Run:
    """What the loop works with, built once by `setup`."""
    tc: TrainConfig
    files: Files
    model: Transformer  # the weights: evaluation, clipping and saving use it
    step_model: torch.nn.Module  # what a training step calls: the model, maybe compiled, maybe DDP-wrapped
    optimizer: torch.optim.Optimizer
    loss: Callable  # loss(model, x, y): cross_entropy, or a distillation loss
    trainable: object  # FullModel or lora.Adapters: prepare(model), save_best(model, provenance), path
    batches: Batches
    autocast: Callable  # () -> the context a forward runs in (device.autocast_for)
    provenance: dict  # what every save records: data, its sha256, the config
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


@dataclass
class Step:
    """What the loop reports after each optimizer step (train.py draws its progress bar from it)."""
    iter: int  # iterations done
    first: int  # the iteration this run started at (> 0 when resumed)
    last_iter: int  # the iteration it stops at
    loss: float
    lr: float
    ms: float
    tokens: int  # tokens per step, all ranks together


# ----------------------------------------------------------------------------- batches

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


# ----------------------------------------------------------------------------- learning rate

def lr_at(it: int, tc: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_iters."""
    if it < tc.warmup_iters:
        return tc.lr * (it + 1) / (tc.warmup_iters + 1)
    progress = min(1.0, (it - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters))
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


# ----------------------------------------------------------------------------- forward and backward

def cross_entropy(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default loss: next-token cross-entropy of the model's logits against the labels."""
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


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


# ----------------------------------------------------------------------------- evaluation

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
            run.trainable.save_best(run.model, {**run.provenance, "step": it, "val_loss": losses["val"],
                                                "train_loss": losses["train"], "kept": run.tc.keep})
            saved = f" -> saved {run.trainable.path}"
    if improved:
        state.best_val = losses["val"]
    if run.rank.main:
        save_state(run, state, it)  # what a resume continues from
    state.saved_at = it
    run.log(f"iter {it}: train {losses['train']:.4f}, val {losses['val']:.4f}{saved}")
    return losses


# ----------------------------------------------------------------------------- the loop

def train_loop(run: Run, state: State, on_step: Callable[[Step], None] | None = None) -> None:
    """nanoGPT's loop: every eval_interval iterations evaluate (and save); then one optimizer step:
    set the lr, accumulate gradients, clip, step. A last evaluation when it stops."""
    tc, model, optimizer = run.tc, run.model, run.optimizer
    first = state.iter
    model.train()
    for it in range(first, tc.last_iter):
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
            on_step(Step(it + 1, first, tc.last_iter, loss, lr, state.step_ms[-1], run.tokens_per_iter))
    evaluate_and_save(run, state, tc.last_iter)


class TrainingDiverged(RuntimeError):
    pass


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


# ----------------------------------------------------------------------------- the default trainable set

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


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied matrix counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
