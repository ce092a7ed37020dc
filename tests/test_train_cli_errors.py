"""train.py given what a user may type wrong (issue 14): every invalid value is refused up front with
exit 2 and one line on stderr that names the flag, no traceback, and no file created or changed;
Ctrl-C exits 130 with one line that says which checkpoint is the last good one.

Most cases run train.py's main() in this process (fast); two run the real command line in a
subprocess: a refused value, and a real SIGINT in the middle of training."""

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm import train_lock, trainer
from minillm.checkpoint import load_model
from cli_runner import ROOT, exit_status, one_error_line, script

train_cli = script("train")
TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "2",
        "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "1", "--warmup-iters", "1",
        "--no-plot", "--no-progress", "--name", "t"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory, shakespeare_text):
    """small.txt to train on; shuffled.txt: the same lines in another order (same characters, other
    sha256); short.txt: 20 characters (a val split of 2)."""
    folder = tmp_path_factory.mktemp("texts")
    text = shakespeare_text[:20_000]
    lines = text.splitlines(keepends=True)
    random.Random(0).shuffle(lines)
    for name, content in [("small.txt", text), ("shuffled.txt", "".join(lines)), ("short.txt", text[:20])]:
        (folder / name).write_text(content)
    return folder


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, texts):
    """A run named t that stopped at iter 2 of 4 (its model and training state), to resume."""
    out = tmp_path_factory.mktemp("stopped")
    assert train_cli.main([*TINY, "--data", str(texts / "small.txt"), "--out-dir", str(out), "--stop-after", "2"]) == 0
    return out


def snapshot(folder: Path) -> dict:
    """Every file under folder -> (size, mtime_ns): what 'no file created or changed' compares."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def out(tmp_path, stopped_run):
    """A copy of the stopped run's folder for this test."""
    folder = tmp_path / "out"
    shutil.copytree(stopped_run, folder)
    return folder


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
CASES = [  # (flags, what the one line says); data is small.txt unless the flags give --data
    (["--eval-interval", "0"], "argument --eval-interval: must be a whole number >= 1, got '0'"),
    (["--eval-iters", "0"], "argument --eval-iters: must be a whole number >= 1, got '0'"),
    (["--grad-accum", "0"], "argument --grad-accum: must be a whole number >= 1, got '0'"),
    (["--max-iters", "-5"], "argument --max-iters: must be a whole number >= 0, got '-5'"),
    (["--batch-size", "0"], "argument --batch-size: must be a whole number >= 1, got '0'"),
    (["--batch-size", "-2"], "argument --batch-size: must be a whole number >= 1, got '-2'"),
    (["--stop-after", "-1"], "argument --stop-after: must be a whole number >= 0, got '-1'"),
    (["--warmup-iters", "-1"], "argument --warmup-iters: must be a whole number >= 0, got '-1'"),
    (["--seed", "-1"], "argument --seed: must be a whole number >= 0, got '-1'"),
    (["--n-layer", "0"], "argument --n-layer: must be a whole number >= 1, got '0'"),
    (["--n-head", "3"], "--n-embd (16) must be divisible by --n-head (3)"),
    (["--seq-len", "0"], "argument --seq-len: must be a whole number >= 1, got '0'"),
    (["--lora-rank", "-1"], "argument --lora-rank: must be a whole number >= 0, got '-1'"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got '0'"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
    (["--min-lr", "-1"], "argument --min-lr: must be a finite number >= 0, got '-1'"),
    (["--weight-decay", "inf"], "argument --weight-decay: must be a finite number >= 0, got 'inf'"),
    (["--grad-clip", "-1"], "argument --grad-clip: must be a finite number >= 0, got '-1'"),
    (["--beta2", "1"], "argument --beta2: must be a finite number >= 0 and < 1, got '1'"),
    (["--dropout", "1.5"], "argument --dropout: must be a finite number >= 0 and < 1, got '1.5'"),
    (["--distill-temperature", "0"], "argument --distill-temperature: must be a finite number > 0, got '0'"),
    (["--distill-alpha", "2"], "argument --distill-alpha: must be a finite number >= 0 and <= 1, got '2'"),
    (["--name", "a/b"], "--name must be a plain file stem, with no folder part (its files go in --out-dir), got 'a/b'"),
    (["--name", ".."], "--name must be a plain file stem"),
    (["--name", "../t"], "--name must be a plain file stem"),
    (["--name", ""], "--name must be a plain file stem"),
    (["--device", "foo"], "device 'foo' is not a device name: use auto or one of cpu"),
    pytest.param(["--device", "cuda"], "device 'cuda' is not available on this machine", marks=NO_CUDA),
    (["--data", "{texts}/missing.txt"], "dataset file not found: {texts}/missing.txt"),
    (["--data", "{texts}/short.txt"], "the val split of {texts}/short.txt (the last 2 of its 20 tokens) is too short "
                                      "for one sequence of --seq-len 16"),
    (["--out-dir", "{out}/t.safetensors"], "--out-dir {out}/t.safetensors: is a file, not a folder"),
    (["--out-dir", "{out}/t.safetensors/sub"], "--out-dir {out}/t.safetensors/sub: {out}/t.safetensors is a file, not a folder"),
    (["--resume", "--data", "{texts}/shuffled.txt"], "it was trained on {texts}/small.txt (sha256"),
    (["--resume", "--data", "{texts}/shuffled.txt"], "--resume needs the same --data. To start fresh, leave out "
                                                     "--resume (the run's files are then replaced) or pick another --name"),
    (["--resume", "--max-iters", "1"], "it is at iter 2 and --max-iters 1 does not go past it; pass a --max-iters above 2"),
    (["--resume", "--max-iters", "2"], "it is at iter 2 and --max-iters 2 does not go past it"),
    (["--resume", "--stop-after", "1"], "it is at iter 2 and --stop-after 1 does not go past it"),
    (["--resume", "--name", "other"], "nothing to resume: no training state at {out}/other.train.safetensors"),
]


@pytest.mark.parametrize("flags, message", CASES, ids=[" ".join((c.values if hasattr(c, "marks") else c)[0])
                                                       for c in CASES])
def test_invalid_value_is_one_line_and_touches_nothing(flags, message, out, texts, capsys):
    fill = {"out": out, "texts": texts}
    flags = [f.format(**fill) for f in flags]
    argv = [*TINY, "--data", str(texts / "small.txt"), "--out-dir", str(out), *flags]  # later flags win
    before = snapshot(out)
    assert exit_status(train_cli.main, argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: ") and message.format(**fill) in line, line
    assert snapshot(out) == before


def test_read_only_out_dir(out, texts, capsys, monkeypatch):
    """A folder the run may not write in. Root writes in a mode-0555 folder all the same, so there the
    refusal the OS would give (EROFS, a read-only file system) is simulated at os.open."""
    folder = out / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real_open = os.open

        def read_only(path, flags, *args, **kwargs):
            if str(path).startswith(str(folder)) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", read_only)
    before = snapshot(out)
    try:
        assert train_cli.main([*TINY, "--data", str(texts / "small.txt"), "--out-dir", str(folder)]) == 2
    finally:
        folder.chmod(0o755)
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write in --out-dir {folder}: "), line
    assert snapshot(out) == before


def test_same_name_running_is_refused(out, texts, capsys):
    """A second run writing the same files while the first holds the lock (flock: a second open of the
    lock file conflicts even within one process)."""
    with train_lock.output_lock(out / "t.lock"):
        before = snapshot(out)
        assert train_cli.main([*TINY, "--data", str(texts / "small.txt"), "--out-dir", str(out), "--resume"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"another run (pid {os.getpid()}) is writing the files of --name 't' in {out}" in line, line
        assert snapshot(out) == before
    assert not (out / "t.lock").exists()  # released and removed with the run that held it
    assert train_cli.main([*TINY, "--data", str(texts / "small.txt"), "--out-dir", str(out), "--resume"]) == 0


def test_resume_with_another_shape_names_the_flags(out, texts, capsys):
    """Was a dump of both configs (the config was compared after the state was loaded)."""
    before = snapshot(out)
    argv = [*TINY, "--n-embd", "32", "--data", str(texts / "small.txt"), "--out-dir", str(out), "--resume"]
    assert train_cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "it was trained with --n-embd 16" in line and "this run asks for --n-embd 32" in line, line
    assert snapshot(out) == before


def test_init_from_the_runs_own_output_is_refused(out, texts, capsys):
    """--init-from weights/t.safetensors --name t would overwrite the model it starts from."""
    before = snapshot(out)
    argv = ["--init-from", str(out / "t.safetensors"), "--name", "t", "--out-dir", str(out), "--seq-len", "8",
            "--max-iters", "2", "--data", str(texts / "small.txt"), "--no-plot", "--no-progress"]
    assert train_cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--init-from" in line and "own output" in line, line
    assert snapshot(out) == before


def test_lock_left_by_a_killed_run_is_taken(out, texts):
    (out / "t.lock").write_text("12345\n")  # what a kill -9 leaves: the file, with no lock on it
    assert train_cli.main([*TINY, "--data", str(texts / "small.txt"), "--out-dir", str(out), "--resume"]) == 0
    assert not (out / "t.lock").exists()


def test_ctrl_c_says_which_checkpoint_is_good_and_resume_goes_on(out, texts, capsys, monkeypatch):
    """Ctrl-C in the 4th step (iter 3, after the eval and saves at iter 2): exit 130, one line naming
    the checkpoint and the training state, which a resume continues from."""
    real, calls = trainer.forward_backward, []

    def interrupted_in_the_4th_step(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(trainer, "forward_backward", interrupted_in_the_4th_step)
    fresh = out / "fresh"
    assert train_cli.main([*TINY, "--data", str(texts / "small.txt"), "--out-dir", str(fresh), "--max-iters", "6"]) == 130
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"interrupted at iter 3: the last good checkpoint is kept at {fresh}/t.safetensors (val "), line
    assert line.endswith(f"; --resume continues from iter 2 ({fresh}/t.train.safetensors)"), line
    assert sorted(p.name for p in fresh.iterdir()) == ["t.safetensors", "t.train.safetensors"]  # no lock, no temp file
    assert load_model(fresh / "t.safetensors").provenance["step"] in (0, 2)
    monkeypatch.setattr(trainer, "forward_backward", real)
    assert train_cli.main([*TINY, "--data", str(texts / "small.txt"), "--out-dir", str(fresh), "--max-iters", "6",
                           "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out


def cli(args, **kwargs):
    """train.py in a subprocess. Its SIGINT is reset to the default first: a suite started as a
    background job of a non-interactive shell inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt (the Ctrl-C test would train on until its timeout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-u", str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def test_command_line_refusal_and_sigint(tmp_path, texts):
    """The real command line: a refused value, then a real SIGINT during training."""
    refused = cli([*TINY, "--data", str(texts / "small.txt"), "--out-dir", str(tmp_path), "--batch-size", "-2"])
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and one_error_line(err).startswith("error: argument --batch-size: must be a whole number >= 1, got '-2'")
    assert list(tmp_path.iterdir()) == []
    run = cli([*TINY, "--data", str(texts / "small.txt"), "--out-dir", str(tmp_path), "--max-iters", "100000",
               "--eval-interval", "1"])
    for line in run.stdout:  # a training state is written at every eval; interrupt after the first two
        if line.startswith("iter 1:"):
            run.send_signal(signal.SIGINT)
            break
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    line = one_error_line(err)
    assert line.startswith("interrupted at iter ") and f"the last good checkpoint is kept at {tmp_path}/t.safetensors" \
        in line and "; --resume continues from iter " in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors", "t.train.safetensors"]
