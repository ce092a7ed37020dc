"""Data-parallel training: 2 CPU processes under torchrun (gloo) train exactly like 1 process with the
global batch, and their weights stay bit-identical; a rank ends without interpreter finalization."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minillm import data, ddp
from minillm.ddp import Rank

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--device", "cpu", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
         "--max-iters", "8", "--eval-interval", "4", "--eval-iters", "2", "--warmup-iters", "2", "--dropout", "0",
         "--grad-accum", "2", "--no-plot", "--no-progress"]
EVAL = re.compile(r"iter (\d+): train ([\d.]+), val ([\d.]+)")


def run(cmd, tmp_path, name, batch):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*cmd, str(ROOT / "train.py"), *FLAGS, "--batch-size", str(batch), "--out-dir", str(tmp_path),
                          "--name", name], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout, load_file(tmp_path / f"{name}.safetensors")


def test_rank_rows_partition_the_global_batch():
    ids = np.arange(10_000, dtype=np.uint16)
    whole = data.get_batch(ids, 16, 6, torch.Generator().manual_seed(0))[0]
    parts = [data.get_batch(ids, 16, 6, torch.Generator().manual_seed(0), rows=Rank(r, 3).rows)[0] for r in range(3)]
    assert all(p.shape == (2, 16) for p in parts)
    rebuilt = torch.stack(parts, 1).reshape(6, 16)  # rank r holds rows r, r+3, ...
    assert torch.equal(rebuilt, whole)


def test_two_process_ddp_matches_one_process_with_the_global_batch(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp_log, ddp_w = run(torchrun, tmp_path, "ddp", batch=4)  # 2 ranks x 4 rows x 2 micro-batches
    one_log, one_w = run([sys.executable], tmp_path, "one", batch=8)  # 1 process x 8 rows x 2 micro-batches
    # every rank ended with the same weights (the run itself raises otherwise and prints this line)
    assert re.search(r"2 DDP ranks hold identical weights \(sha256 [0-9a-f]{16}\)", ddp_log), ddp_log
    assert "x 2 DDP ranks (batch 4 per rank)" in ddp_log
    # the same losses at every eval and the same final weights, up to the order of float sums
    ddp_evals, one_evals = EVAL.findall(ddp_log), EVAL.findall(one_log)
    assert [e[0] for e in ddp_evals] == ["0", "4", "8"] and [e[0] for e in one_evals] == ["0", "4", "8"]
    for (_, t1, v1), (_, t2, v2) in zip(ddp_evals, one_evals):
        assert abs(float(t1) - float(t2)) <= 2e-4 and abs(float(v1) - float(v2)) <= 2e-4, (ddp_evals, one_evals)
    assert ddp_w.keys() == one_w.keys()
    worst = max((ddp_w[k] - one_w[k]).abs().max().item() for k in ddp_w)
    assert worst < 1e-5, worst
    assert float(one_evals[-1][2]) < float(one_evals[0][2]) - 0.05  # it trained: the match is not of two idle runs


def test_a_torchrun_rank_ends_without_finalization(monkeypatch, capsys):
    """exit_process under torchrun flushes what was printed and ends with os._exit: gloo's worker
    threads can then never meet interpreter finalization (see ddp.exit_process for the abort that
    did). A single process ends with sys.exit as usual."""
    class Exited(BaseException):
        pass

    def fake_exit(code):
        ended.append((code, capsys.readouterr().out))  # what was flushed by then
        raise Exited
    ended = []
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    print("last line", end="")
    with pytest.raises(Exited):
        ddp.exit_process(3)
    assert ended == [(3, "last line")]
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as e:
        ddp.exit_process(0)
    assert e.value.code == 0 and len(ended) == 1
