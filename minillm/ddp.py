"""Data-parallel training across processes with PyTorch's DistributedDataParallel (DDP).

    torchrun --standalone --nproc_per_node=2 train.py ...     # 2 processes; gloo on CPU, nccl on CUDA

torchrun starts N copies of train.py and tells each its RANK, LOCAL_RANK and WORLD_SIZE in the
environment; without those variables training is single-process and nothing here is used.

How the work is split, so that N processes train exactly like one process with N times the batch:
  * every rank holds the same model (same seed; DDP also copies rank 0's weights at start);
  * every rank draws the same global batch (batch_size * world_size rows, one shared generator state)
    and keeps its own slice of rows, so no two ranks see the same rows and no row is lost;
  * DDP averages the gradients over ranks during backward, which equals the gradient of the loss
    averaged over the global batch; every rank then takes the same optimizer step;
  * evaluation splits its batches the same way and averages the ranks' means, so every rank gets the
    single-process loss and keeps the same best-val bookkeeping; only rank 0 writes files and prints.
Dropout masks come from a per-rank seed, as they must for the rows to be independent; so with
dropout > 0 a DDP run is not bit-equal to one process (with dropout 0 it is, up to the order of the
float sums), and a resumed DDP run reseeds those streams. At the end `check_identical` compares a
sha256 of every rank's weights: a rank that drifted is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .device import pick_device


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def rows(self) -> slice:
        """This rank's rows of a global batch made of `world` equal slices."""
        return slice(None) if self.world == 1 else slice(self.rank, None, self.world)


def setup(device_name: str) -> tuple[Rank, str]:
    """Join the process group torchrun describes (if any) -> (this rank, the device name to train on)."""
    pick_device(device_name)  # a device this machine lacks is refused before any process group is joined
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Rank(), device_name
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    elif device_name not in ("auto", "cpu"):
        raise ValueError(f"device {device_name!r}: distributed training runs on cpu (gloo) or cuda (nccl)")
    else:
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Rank(rank, world, local), device_name


def wrap(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """The model as a DDP module: its backward averages the gradients over all ranks."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)  # the only buffers are RoPE tables: equal, never trained


def sync_gradients(model: torch.nn.Module, sync: bool):
    """The context one backward runs in. Accumulating micro-batches (sync False) skip DDP's all-reduce;
    the last micro-batch of a step (sync True) averages the summed gradients once. Without DDP: nothing."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def mean_over_ranks(value: float, r: Rank, device) -> float:
    """The average of a Python float over all ranks (every rank gets it)."""
    if r.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / r.world


def weights_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_identical(model: torch.nn.Module, r: Rank) -> str:
    """sha256 of this rank's weights, after checking every rank has the same one (RuntimeError if not)."""
    digest = weights_sha256(model)
    if r.world > 1:
        digests = [None] * r.world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP ranks hold different weights after training: {digests}")
    return digest


@contextlib.contextmanager
def process_group(r: Rank):
    """The span of a run in the process group that `setup` joined: however the run ends, every rank
    leaves it through `teardown` (after a clean run, in step with the others)."""
    clean = False
    try:
        yield r
        clean = True
    finally:
        teardown(r, clean)


def teardown(r: Rank, clean: bool = True) -> None:
    """Leave the process group, on every rank. After a clean run a barrier first waits until every rank
    is done with its collectives (after a failure there is none: a failed rank may never come to it).
    A process that ran under torchrun should then end with `exit_process` (see there)."""
    if r.world > 1 and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End the process with exit status `code`; under torchrun (WORLD_SIZE > 1) without interpreter
    finalization: stdout and stderr are flushed, then os._exit.

    Why: gloo runs collectives on worker threads, and a worker drops its reference to a finished
    collective only after the caller's wait() has returned; dropping it releases the collective's
    tensors, which takes the GIL. destroy_process_group does not stop those threads, and the group
    cannot be freed early (torch 2.13's DDP keeps references to it). So on a busy CPU a worker can
    come to that release only once the interpreter is finalizing, and there CPython (3.11 here)
    ends any thread that asks for the GIL with pthread_exit. Its unwinding crosses the work's noexcept
    destructor, std::terminate aborts the process ("terminate called without an active exception",
    SIGABRT), and torchrun reports a run that finished and saved everything as failed. os._exit ends
    all threads at once, with nothing left to run; every file a run writes is complete and closed
    before it returns (checkpoint.atomic_write), and the output lock is the OS's."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
