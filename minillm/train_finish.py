"""The end of a training run: check the DDP ranks agree, fold LoRA adapters in (merge), say when no
evaluation beat the first, plot the loss curve, and sum the run up in a TrainResult."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint, ddp, lora
from .trainer import Run, State, count_trainable


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
    log(f"done: {tc.last_iter} iters, best val {state.best_val:.4f}, median {ms:.1f} ms/iter "
        f"({tokens_per_s:,.0f} tokens/s), wall {wall:.1f} s")
    _, final_train, final_val = state.evals[-1]
    adapters = files.adapters if tc.lora_rank else None
    return TrainResult(adapters if adapters and not tc.merge else files.model, state.best_val, final_train,
                       final_val, tc.last_iter, ms, tokens_per_s, wall, state.history, state.evals, adapters,
                       count_trainable(run.model)[0])


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
