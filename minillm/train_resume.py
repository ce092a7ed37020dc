"""The training state and resume: every eval writes NAME.train.safetensors (weights, optimizer
moments, counters, every random stream); a resume continues from it exactly, only with the same
model and data, and only forward. (`run` and `state` are trainer.Run and trainer.State.)"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .config import ModelConfig
from .model import Transformer
from .train_config import ConfigError, TrainConfig


def save_state(run, state, it: int) -> None:
    """Write the training state at iteration `it` (rank 0 only)."""
    counters = {"iter": it, "best_val": state.best_val, "evals": state.evals, "config": run.model.config.to_dict(),
                "data": run.provenance["data"], "data_sha256": run.provenance["data_sha256"]}
    checkpoint.save_train_state(run.files.state, run.optimizer, counters, rng_states(state, run.batches.device),
                                run.model, trainable_only=run.trainable.trainable_only)


def rng_states(state, device: torch.device) -> dict[str, torch.Tensor]:
    """Every random stream the loop draws from: batches, dropout (CPU), dropout (CUDA)."""
    rng = {"batch": state.batch_gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def resume(path: Path, tc: TrainConfig, provenance: dict, model: Transformer, optimizer: torch.optim.Optimizer,
           state, device: torch.device) -> None:
    """Continue where the training-state file left off: the latest weights, optimizer moments, counters
    and every random stream, so that the run goes on exactly as if it had never stopped."""
    check_resumable(path, tc, checkpoint.train_state_info(path), provenance, model.config)  # before any tensor is read
    saved, rng = checkpoint.load_train_state(path, optimizer, model)
    state.iter = state.resumed_at = state.saved_at = saved["iter"]
    state.best_val, state.evals = saved["best_val"], [tuple(e) for e in saved["evals"]]
    state.batch_gen.set_state(rng["batch"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])


def check_resumable(path: Path, tc: TrainConfig, saved: dict, provenance: dict, cfg: ModelConfig) -> None:
    """A resume goes on with the same model and data, and forward: it never rewinds over later weights."""
    if saved["config"] != cfg.to_dict():
        ours = cfg.to_dict()
        diff = [k for k in ours if saved["config"].get(k) != ours[k]]
        was = ", ".join(f"{k} {saved['config'].get(k)}" for k in diff)
        raise ConfigError(f"cannot continue {path}: it was trained with {was}; this run asks for "
                          f"{', '.join(f'{k} {ours[k]}' for k in diff)}. Pass the same shape, or leave out resume "
                          "to start fresh", *diff, "resume")
    if saved.get("data_sha256", provenance["data_sha256"]) != provenance["data_sha256"]:  # older states: not recorded
        raise ConfigError(f"cannot continue {path}: it was trained on {saved.get('data')} (sha256 "
                          f"{saved['data_sha256'][:12]}), not on {provenance['data']} (sha256 {provenance['data_sha256'][:12]}); "
                          "resume needs the same data. To start fresh, leave out resume (the run's files are "
                          "then replaced) or pick another name", "data", "resume", "name")
    if tc.last_iter <= saved["iter"]:
        field = "stop_after" if tc.stop_after is not None and tc.stop_after < tc.max_iters else "max_iters"
        raise ConfigError(f"cannot continue {path}: it is at iter {saved['iter']} and {field} {getattr(tc, field)} "
                          f"does not go past it; pass a {field} above {saved['iter']} to continue", field)
