"""train(tc): a training run as train.py runs it: setup, the loop (trainer.py), finish. This is where
the layers are wired in: the loss (cross-entropy, or distillation from a teacher: distill.py) and the
trainable set (the whole model, or LoRA adapters on a frozen checkpoint: lora.py).

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
    NAME.lock                held (flock) by the run writing these files (train_lock.py)
Every value is checked before anything is read or written (TrainConfig.check, train_config.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import checkpoint, data, ddp, distill, lora
from .config import ModelConfig
from .device import autocast_for, pick_device, uses_bf16
from .model import Transformer
from .tokenizer import CharTokenizer, check_same_tokenizer
from .train_config import ConfigError, Files, TrainConfig
from .train_finish import TrainResult, finish
from .train_lock import output_lock
from .train_resume import resume
from .trainer import Batches, FullModel, Run, State, Step, count_trainable, cross_entropy, last_good, lr_at, train_loop


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says which checkpoint is the last good one and how to
    continue. `fields` as in ConfigError."""

    def __init__(self, message: str, *fields: str):
        super().__init__(message)
        self.fields = fields


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
    provenance = run_provenance(tc, text_path)
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
        resume(files.state, tc, provenance, model, optimizer, state, device)
        log(f"resumed from {files.state} at iter {state.iter} (best val {state.best_val:.4f})")
    step_model = distribute(model, tc, r, device, state.iter)
    batches = Batches(splits, seq_len, tc.batch_size, device, r)
    run = Run(tc, files, model, step_model, optimizer, loss, trainable, batches, autocast_for(device),
              provenance, log, t_start)
    log_setup(run, text_path, teacher)
    return run, state


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


def distribute(model: Transformer, tc: TrainConfig, r: ddp.Rank, device: torch.device, start_iter: int):
    """What a training step calls: the model, compiled if asked, then wrapped for DDP when there are
    several ranks (nanoGPT's order)."""
    step_model = torch.compile(model) if tc.compile else model
    if r.world > 1:
        step_model = ddp.wrap(step_model, device)
        torch.manual_seed(tc.seed + 7919 * r.rank + start_iter)  # dropout: each rank its own masks (see ddp.py)
    return step_model


def run_provenance(tc: TrainConfig, text_path: Path) -> dict:
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
    n_trainable, n_total = count_trainable(run.model)
    n_train, n_val = (len(ids) for ids in run.batches.splits.values())
    start = f"from {tc.init_from}" if tc.init_from else (
        f"from the teacher's first {tc.init_from_layers} layers" if tc.init_from_layers else "fresh")
    run.log(f"model: {cfg.family} ({start}), {n_total / 1e6:.2f}M parameters, {n_trainable / 1e6:.3f}M trainable"
            f"{f' (LoRA rank {tc.lora_rank} on {tc.lora_targets})' if tc.lora_rank else ''}, vocab {cfg.vocab_size}; "
            f"data: {text_path} ({n_train:,} train / {n_val:,} val tokens); "
            f"{run.tokens_per_iter:,} tokens/iter on {run.batches.device}"
            f"{' (bf16 autocast)' if uses_bf16(run.batches.device) else ''}"
            f"{f' x {r.world} DDP ranks (batch {tc.batch_size} per rank)' if r.world > 1 else ''}")
    evals = (f"eval every {tc.eval_interval} iters on {tc.eval_iters} batches" if tc.eval_interval < tc.last_iter
             else f"eval only at iters 0 and {tc.last_iter} (eval_interval {tc.eval_interval})")
    run.log(f"schedule (preset {tc.preset}): {tc.max_iters} iters of {tc.batch_size} x {run.batches.seq_len} tokens, "
            f"lr {tc.lr:g} after {tc.warmup_iters} warm-up iters (rising from {lr_at(0, tc):.1e}), cosine to "
            f"{tc.min_lr:g}; {evals}; keeping the {tc.keep} weights")
    if teacher is not None:
        run.log(f"distilling from {tc.distill_from} ({teacher.model.num_params() / 1e6:.2f}M parameters), "
                f"T={tc.distill_temperature}, alpha={tc.distill_alpha}")
