"""The training loop behind train.py: AdamW, warmup + cosine LR, clipping, accumulation,
periodic eval, best-val checkpoints, exact resume.

What is trained, and on which ids:
    from scratch (default)   a char-level model of the preset's shape, alphabet taken from the text
    --init-from CKPT         the checkpoint's weights, config and tokenizer (full fine-tune); the text is
                             tokenized with that tokenizer once and cached (data.cached_token_ids)
    ... --lora-rank R        the checkpoint frozen, only LoRA adapters trained (lora.py)
    --distill-from TEACHER   loss mixes the labels with the teacher's distribution (distill.py); the student
                             is fresh (preset/flags, the teacher's vocabulary), --init-from, or the teacher's
                             first N blocks (--init-from-layers N)

Files written for a run named NAME in out_dir:
    NAME.safetensors         the best-val model (our format: weights + config + tokenizer + provenance);
                             with LoRA only when --merge (the best adapters folded into the base)
    NAME.lora.safetensors    LoRA: the best-val adapters only, naming their base checkpoint and its sha256
    NAME.train.safetensors   the latest training state: weights, optimizer moments, step, RNG states
    NAME.loss.png            train/val loss curve (when matplotlib is installed)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, data, ddp, distill, lora
from .config import ModelConfig, preset
from .model import Transformer
from .tokenizer import CharTokenizer

# Training presets: the model shape comes from config.PRESETS of the same name.
TRAIN_PRESETS: dict[str, dict] = {
    # nanoGPT's CPU config for shakespeare_char: reaches val ~1.88 in 2000 iters
    "baby": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250, eval_iters=20),
    # nanoGPT's GPU config: val ~1.47 after 5000 iters (needs a GPU to be quick)
    "shakespeare": dict(batch_size=64, max_iters=5000, lr=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250, eval_iters=200),
}


@dataclass
class TrainConfig:
    name: str = "shakespeare-char"  # output file stem in out_dir
    out_dir: str = "weights"
    data: str | None = None  # a text file; default: tinyshakespeare (local copy, cache or download)
    preset: str = "baby"  # model shape + training schedule
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
    progress: bool = True
    # fine-tuning a checkpoint: its weights, config and tokenizer (architecture flags are then refused)
    init_from: str | None = None  # a .safetensors checkpoint to start from
    seq_len: int | None = None  # tokens per training sequence (None: the model's block_size)
    lora_rank: int = 0  # > 0: freeze the --init-from model and train rank-R LoRA adapters only
    lora_alpha: float = 16.0  # adapter output scaled by alpha / rank
    lora_targets: str = "q,k,v,o"  # which Linear layers get adapters: q,k,v,o,gate,up,down
    merge: bool = False  # LoRA: also write the best adapters merged into a full checkpoint NAME.safetensors
    # distillation: loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)
    distill_from: str | None = None  # teacher checkpoint; the student must share its tokenizer
    distill_temperature: float = 2.0  # T
    distill_alpha: float = 0.5  # alpha: weight of the teacher's soft targets
    init_from_layers: int | None = None  # student = the teacher's first N blocks (+ embeddings, final norm, head)

    def resolved(self) -> "TrainConfig":
        """A copy with the preset's values filled in for every None."""
        if self.preset not in TRAIN_PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(TRAIN_PRESETS)}")
        filled = {k: v for k, v in TRAIN_PRESETS[self.preset].items() if getattr(self, k) is None}
        return dataclasses.replace(self, **filled)

    def check_finetune_flags(self) -> None:
        """Refuse flag combinations that cannot mean anything, naming the flags."""
        arch = [k for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "mlp_hidden", "dropout")
                if getattr(self, k) is not None]
        if (self.init_from or self.init_from_layers is not None) and arch:
            source = "--init-from" if self.init_from else "--init-from-layers"
            raise ValueError(f"{source} takes the architecture from the checkpoint, so "
                             f"{', '.join('--' + k.replace('_', '-') for k in arch)} cannot be set "
                             "(use --seq-len for the training sequence length)")
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank and not self.init_from:
            raise ValueError("--lora-rank needs --init-from: adapters adapt a pretrained checkpoint")
        if self.merge and not self.lora_rank:
            raise ValueError("--merge folds LoRA adapters into the base: it needs --lora-rank > 0")
        if self.init_from_layers is not None and not self.distill_from:
            raise ValueError("--init-from-layers copies the teacher's first layers: it needs --distill-from")
        if self.init_from_layers is not None and self.init_from:
            raise ValueError("--init-from and --init-from-layers both choose the student's weights; pass one")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"--seq-len must be >= 1, got {self.seq_len}")

    def model_config(self, vocab_size: int) -> ModelConfig:
        over = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size",
                                             "mlp_hidden", "dropout") if getattr(self, k) is not None}
        return preset(self.preset, family=self.family, vocab_size=vocab_size, attn_impl=self.attn_impl, **over)


class TrainingDiverged(RuntimeError):
    pass


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


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def lr_at(it: int, tc: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_iters."""
    if it < tc.warmup_iters:
        return tc.lr * (it + 1) / (tc.warmup_iters + 1)
    progress = min(1.0, (it - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters))
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """Weight decay on 2-D weights (matmuls, embeddings) only; never on biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    cuda = device.type == "cuda"  # fused kernel on CUDA; multi-tensor (foreach) updates elsewhere, not a per-tensor loop
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=cuda, foreach=not cuda)


@torch.no_grad()
def estimate_loss(model, splits: dict[str, np.ndarray], tc: TrainConfig, device, autocast,
                  seq_len: int | None = None, r: ddp.Rank = ddp.Rank()) -> dict[str, float]:
    """Mean cross-entropy over eval_iters batches of seq_len tokens (default: the model's block_size)
    per split; the same batches at every eval (own generator). Under DDP each rank scores its rows
    of the global batches and the means are averaged: every rank gets the single-process number."""
    model.eval()
    out = {}
    for name, ids in splits.items():
        gen = torch.Generator().manual_seed(tc.seed + 1)
        losses = []
        for _ in range(tc.eval_iters):
            x, y = data.get_batch(ids, seq_len or model.config.block_size, tc.batch_size * r.world, gen, device, r.rows)
            with autocast():
                logits = model(x)
            losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
        out[name] = ddp.mean_over_ranks(sum(losses) / len(losses), r, device)
    model.train()
    return out


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


def load_sources(tc: TrainConfig, model_path: Path):
    """The checkpoints a run starts from, and the tokenizer it trains with: (tokenizer, init, teacher).

    init and teacher are checkpoint.Loaded (or None). The tokenizer is the --init-from checkpoint's,
    else the teacher's, else (resuming a char run) the saved model's, else None: build one from the text."""
    init = checkpoint.load_model(tc.init_from) if tc.init_from else None
    teacher = checkpoint.load_model(tc.distill_from) if tc.distill_from else None
    if init is not None and teacher is not None:
        distill.check_same_tokenizer(teacher.tokenizer, init.tokenizer,
                                     f"teacher {tc.distill_from}", f"student {tc.init_from}")
    if init is not None:
        return init.tokenizer, init, teacher
    if teacher is not None:
        return teacher.tokenizer, None, teacher
    if tc.resume:
        return checkpoint.load_model(model_path).tokenizer, None, None
    return None, None, None


def build_model(tc: TrainConfig, tokenizer, init, teacher) -> Transformer:
    """The model to train: the --init-from checkpoint's, the teacher's first layers, or a fresh one."""
    if init is not None:
        return init.model
    if tc.init_from_layers is not None:
        return distill.truncated_copy(teacher.model, tc.init_from_layers)
    return Transformer(tc.model_config(tokenizer.vocab_size))


def train(tc: TrainConfig, log=print) -> TrainResult:
    """Train as tc says. Under torchrun (WORLD_SIZE > 1) this is one data-parallel rank (see ddp.py):
    rank 0 logs and writes the files, every rank returns the same result."""
    r, device_name = ddp.setup(tc.device)
    try:
        return _train(tc, r, device_name, log if r.main else (lambda *args, **kwargs: None))
    finally:
        ddp.teardown(r)


def _train(tc: TrainConfig, r: ddp.Rank, device_name: str, log) -> TrainResult:
    t_start = time.perf_counter()
    tc = tc.resolved()
    tc.check_finetune_flags()
    device = pick_device(device_name)
    out_dir = Path(tc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"{tc.name}.safetensors"
    adapters_path = out_dir / f"{tc.name}.lora.safetensors" if tc.lora_rank else None
    state_path = checkpoint.train_state_path(model_path)
    if tc.resume and not state_path.is_file():
        raise FileNotFoundError(f"--resume: no training state at {state_path}")

    text_path = data.resolve_text_path(tc.data)
    data_sha = data.file_sha256(text_path)
    tokenizer, init, teacher = load_sources(tc, model_path)
    if init is None and teacher is None:  # the char path: the alphabet comes from the text itself
        text = data.read_text(text_path)
        tokenizer = tokenizer or CharTokenizer.from_text(text)
        ids = np.array(tokenizer.encode(text), dtype=np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32)
    else:  # a checkpoint's tokenizer (BPE): encode once, then memory-map the cached ids
        ids = data.cached_token_ids(text_path, tokenizer)
    train_ids, val_ids = data.split_train_val(ids)

    torch.manual_seed(tc.seed)
    model = build_model(tc, tokenizer, init, teacher).to(device)
    cfg = model.config
    seq_len = tc.seq_len or cfg.block_size
    for who, limit in [("the model", cfg.block_size)] + ([("the teacher", teacher.config.block_size)] if teacher else []):
        if seq_len > limit:
            raise ValueError(f"--seq-len {seq_len} is longer than {who}'s context (block_size {limit})")
    if teacher is not None:
        if teacher.config.vocab_size != cfg.vocab_size:
            raise ValueError(f"teacher {tc.distill_from} predicts {teacher.config.vocab_size} ids but the student "
                             f"{cfg.vocab_size}: distillation needs one vocabulary")
        teacher.model.to(device).eval().requires_grad_(False)
    base_sha = None
    if tc.lora_rank:
        base_sha = data.file_sha256(tc.init_from)
        lora.apply_lora(model, tc.lora_rank, tc.lora_alpha, tc.lora_targets)
    n_trainable, n_total = lora.count_trainable(model)
    optimizer = make_optimizer(model, tc, device)
    batch_gen = torch.Generator().manual_seed(tc.seed)
    start_iter, best_val, evals, history = 0, float("inf"), [], []
    if tc.resume:
        state, rng = checkpoint.load_train_state(state_path, optimizer, model)
        if state["config"] != cfg.to_dict():
            raise ValueError(f"--resume: {state_path} was trained with config {state['config']}, not {cfg.to_dict()}")
        start_iter, best_val, evals = state["iter"], state["best_val"], [tuple(e) for e in state["evals"]]
        batch_gen.set_state(rng["batch"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        log(f"resumed from {state_path} at iter {start_iter} (best val {best_val:.4f})")

    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    train_model = model
    if r.world > 1:  # gradients averaged over ranks inside backward
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              forward_sync_buffers=False)  # the only buffers are RoPE tables: equal, never trained
        torch.manual_seed(tc.seed + 7919 * r.rank + start_iter)  # dropout: each rank its own masks (see ddp.py)
    step_model = torch.compile(train_model) if tc.compile else train_model
    tokens_per_iter = tc.batch_size * tc.grad_accum * seq_len * r.world
    start = f"from {tc.init_from}" if tc.init_from else (
        f"from the teacher's first {tc.init_from_layers} layers" if tc.init_from_layers else "fresh")
    log(f"model: {cfg.family} ({start}), {n_total / 1e6:.2f}M parameters, {n_trainable / 1e6:.3f}M trainable"
        f"{f' (LoRA rank {tc.lora_rank} on {tc.lora_targets})' if tc.lora_rank else ''}, vocab {cfg.vocab_size}; "
        f"data: {text_path} ({len(train_ids):,} train / {len(val_ids):,} val tokens); "
        f"{tokens_per_iter:,} tokens/iter on {device}{' (bf16 autocast)' if use_bf16 else ''}"
        f"{f' x {r.world} DDP ranks (batch {tc.batch_size} per rank)' if r.world > 1 else ''}")
    if teacher is not None:
        log(f"distilling from {tc.distill_from} ({teacher.model.num_params() / 1e6:.2f}M parameters), "
            f"T={tc.distill_temperature}, alpha={tc.distill_alpha}")

    def rng_states() -> dict[str, torch.Tensor]:
        r = {"batch": batch_gen.get_state(), "torch": torch.get_rng_state()}
        if device.type == "cuda":
            r["cuda"] = torch.cuda.get_rng_state()
        return r

    def provenance(it: int, losses: dict[str, float]) -> dict:
        prov = {"source": "minillm train.py", "data": str(text_path), "data_sha256": data_sha,
                "step": it, "val_loss": losses["val"], "train_loss": losses["train"],
                "train_config": dataclasses.asdict(tc)}
        if tc.init_from:
            prov["init_from"] = tc.init_from
        if tc.distill_from:
            prov["distilled_from"] = tc.distill_from
        return prov

    def evaluate_and_save(it: int) -> dict[str, float]:
        nonlocal best_val
        losses = estimate_loss(model, {"train": train_ids, "val": val_ids}, tc, device, autocast, seq_len, r)
        evals.append((it, losses["train"], losses["val"]))
        saved = ""
        if losses["val"] < best_val:
            best_val = losses["val"]
            if r.main and adapters_path is not None:  # one writer: rank 0
                lora.save_adapters(adapters_path, model, tc.init_from, base_sha, provenance(it, losses))
                saved = f" -> saved {adapters_path}"
            elif r.main:
                checkpoint.save_model(model_path, model, tokenizer, provenance(it, losses))
                saved = f" -> saved {model_path}"
        state = {"iter": it, "best_val": best_val, "evals": evals, "config": cfg.to_dict()}
        if r.main:
            checkpoint.save_train_state(state_path, optimizer, state, rng_states(), model,
                                        trainable_only=bool(tc.lora_rank))  # LoRA: the base is --init-from
        log(f"iter {it}: train {losses['train']:.4f}, val {losses['val']:.4f}{saved}")
        return losses

    def step_loss(x, y) -> torch.Tensor:
        with autocast():
            logits = step_model(x)
            if teacher is None:
                return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            with torch.no_grad():
                teacher_logits = teacher.model(x)
        return distill.distill_loss(logits, teacher_logits, y, tc.distill_temperature, tc.distill_alpha)[0]

    stop = tc.max_iters if tc.stop_after is None else min(tc.stop_after, tc.max_iters)
    step_ms = []
    bar = None
    if tc.progress and r.main:
        from tqdm import tqdm
        bar = tqdm(total=stop - start_iter, desc="train", unit="it", dynamic_ncols=True, mininterval=1.0)
    model.train()
    for it in range(start_iter, stop):
        if it % tc.eval_interval == 0 and not (tc.resume and it == start_iter):
            evaluate_and_save(it)
        t0 = time.perf_counter()
        lr = lr_at(it, tc)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            x, y = data.get_batch(train_ids, seq_len, tc.batch_size * r.world, batch_gen, device, r.rows)
            last = micro == tc.grad_accum - 1  # DDP: average gradients over ranks once, after the last micro-batch
            with train_model.no_sync() if r.world > 1 and not last else contextlib.nullcontext():
                loss = step_loss(x, y) / tc.grad_accum
                loss.backward()
            loss_sum += loss.item()
        loss_sum = ddp.mean_over_ranks(loss_sum, r, device)
        if not math.isfinite(loss_sum):
            if bar:
                bar.close()
            kept_path = adapters_path or model_path
            kept = f"the last good checkpoint is kept at {kept_path}" if kept_path.exists() else "no checkpoint was written"
            raise TrainingDiverged(f"loss became {loss_sum} at iter {it} (lr {lr:.2e}); stopping: {kept}")
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_ms.append((time.perf_counter() - t0) * 1000)
        history.append((it + 1, loss_sum))
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_iter / step_ms[-1] * 1000:,.0f}")
    if bar:
        bar.close()
    final = evaluate_and_save(stop)
    if r.world > 1:
        log(f"{r.world} DDP ranks hold identical weights (sha256 {ddp.check_identical(model, r)[:16]})")
    if tc.merge and r.main:  # fold the best-val adapters (not necessarily the last ones) into the base and save that
        lora.load_adapters(adapters_path, model, tc.init_from)
        lora.merge_lora(model)
        best = checkpoint.read_metadata(adapters_path)["provenance"]
        checkpoint.save_model(model_path, model, tokenizer,
                              {**json.loads(best), "lora_merged": str(adapters_path), "base_sha256": base_sha})
        log(f"merged the adapters of {adapters_path} into {model_path}")
    wall = time.perf_counter() - t_start
    ms = statistics.median(step_ms) if step_ms else float("nan")
    if tc.plot and r.main:
        plot_path = out_dir / f"{tc.name}.loss.png"
        if save_loss_plot(plot_path, history, evals):
            log(f"loss curve: {plot_path}")
    log(f"done: {stop} iters, best val {best_val:.4f}, median {ms:.1f} ms/iter "
        f"({tokens_per_iter / ms * 1000:,.0f} tokens/s), wall {wall:.1f} s")
    result_path = model_path if adapters_path is None or tc.merge else adapters_path
    return TrainResult(result_path, best_val, final["train"], final["val"], stop, ms,
                       tokens_per_iter / ms * 1000, wall, history, evals, adapters_path, n_trainable)
