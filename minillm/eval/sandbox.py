"""Run an untrusted Python program (model-written code) as contained as this machine allows.

    isolation()                    what this machine gives: namespaces or not, which user, which Python
    run_program(source, limits)    one program, one fresh process tree -> Outcome (passed/failed/timeout/error)

Each program runs in its own process, started afresh, never in ours:
  * `python -I` (isolated mode: no PYTHON* variables, no user site-packages, no script folder on the
    path) with an environment of only PATH, HOME, TMPDIR and LANG (no proxies, tokens or keys of ours),
    standard input /dev/null, a wall-clock timeout after which every process it started is killed;
  * resource limits (setrlimit, inside the sandbox before exec): address space (memory_mb), processes
    of its user (max_processes), size of any file it writes (max_file_mb), CPU seconds, no core files;
  * where a cgroup can be made (cgroup.py: as root, as a rule): one memory limit (memory_mb, swap
    included) and one process limit (max_processes) on all its processes together, and a kill of every
    one of them at the end, wherever they moved (setsid, double forks); without one, memory_mb holds
    per process, so a program may use up to max_processes x memory_mb;
  * where `unshare --user --map-root-user --net --ipc --mount --pid --kill-child --mount-proc` works
    (Linux with unprivileged user namespaces; checked once): a new network namespace (only a loopback
    that is down: no network, not even this machine's localhost services), a new IPC namespace (System
    V shared memory, semaphores and queues of its own, gone with it), a new pid namespace whose first
    process dies with unshare (--kill-child), and with it every process the program left behind (it
    sees no other process), a mount namespace in which every file system is read-only and /tmp,
    /var/tmp, /dev/shm and /run are new, empty, size-limited tmpfs (the working folder is that /tmp;
    it vanishes with the program); see sandbox_launcher.py for how the read-only mounts are locked;
  * when we run as root: the program runs as nobody (uid/gid 65534), so that it is not root of the
    machine (root could write device files, which a read-only mount does not stop, or reach
    root-only Unix sockets); the Python it runs then must be one nobody can read (pick_python).

What is NOT isolated: the program can read every file its user can read (it cannot send them
anywhere: no network, and we keep only a tail of its output); it shares the kernel and CPU with
us; without namespaces (isolation().namespaces False) there is no network isolation at all (proxy
variables point at a dead address, which stops only programs that honour them), no file-system
isolation (it runs in a fresh temporary folder, but can write wherever its user can) and, without a
cgroup either, processes that leave its process group are found only by their working folder.

The promise: a guard against accidents (endless loops, huge allocations, fork bombs, stray writes)
and against escapes (network, other processes, files outside its tmpfs), not against a program
written to fake its result. A program runs in the same process as its tests, so it can always
rewrite them; run_program's `secret` (on file descriptor 3, read once, in no file or argument the
program can read) keeps a program that merely searches its own text from forging the pass signal.
For a determined attacker, use a VM or a container.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..flags import integer, real
from .cgroup import Cgroup

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
UNSHARE = ["--user", "--map-root-user", "--net", "--ipc", "--mount", "--pid", "--kill-child", "--mount-proc"]
NOBODY = 65534
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens there
SETUP_FAILED = 125  # sandbox_launcher.SETUP_FAILED
OUTPUT_TAIL = 2000  # characters of the program's output kept


# what each limit allows (the command's flags take the same types); below 64 MiB Python cannot start
TIMEOUT_S, MEMORY_MB = real(0, 86400, low_open=True), integer(64, 1 << 20)
RANGES = {"timeout_s": TIMEOUT_S, "memory_mb": MEMORY_MB, "max_processes": integer(1, 4096),
          "max_file_mb": integer(1, 1 << 20)}


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, per program (> 0)
    memory_mb: int = 1024  # the program's memory: a cgroup's limit on all its processes, else RLIMIT_AS each
    max_processes: int = 16  # processes (and threads) at once: the cgroup's pids.max, and RLIMIT_NPROC
    max_file_mb: int = 16  # largest file it may write (RLIMIT_FSIZE); also each tmpfs' size

    def __post_init__(self):
        for name, allowed in RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not allowed.allows(str(value)):
                raise ValueError(f"Limits.{name} must be {allowed.describe()}, got {value!r}")


@dataclass(frozen=True)
class Isolation:
    namespaces: bool  # network, IPC, mount (read-only file systems, private /tmp) and pid namespaces
    user: str  # who the program runs as
    python: str  # the interpreter that runs it
    why_not: str = ""  # without namespaces: what failed
    cgroup: bool = False  # one memory and process limit on the whole program (cgroup.py)

    def describe(self) -> str:
        if self.namespaces:
            where = ("no network (own network namespace), own IPC namespace, file systems read-only except a "
                     "private tmpfs /tmp, own pid namespace (nothing outlives it)")
        else:
            where = (f"NO network or file-system isolation ({self.why_not or 'namespaces unavailable'}): proxies "
                     f"point at a dead address, a fresh temporary folder")
        memory = ("memory and process count limited for the program as a whole (cgroup)" if self.cgroup else
                  "memory limited per process (no cgroup: up to processes x memory in all)")
        return f"{where}; {memory}; runs as {self.user}; {self.python} -I; rlimits on file size and CPU"


def _world_runnable(path: str) -> bool:
    """Whether a user other than the owner (nobody) can run this file: it and every folder above it."""
    p = Path(os.path.realpath(path))
    if not p.is_file() or not p.stat().st_mode & 0o005 == 0o005:
        return False
    return all(d.stat().st_mode & 0o001 for d in p.parents)


def pick_python(as_root: bool) -> str:
    """The interpreter for programs: our base Python (no virtual environment's packages); when we are
    root, the first of it, python3 on PATH and /usr/bin/python3 that nobody can run."""
    candidates = [getattr(sys, "_base_executable", "") or sys.executable, shutil.which("python3") or "",
                  "/usr/bin/python3"]
    if not as_root:
        return candidates[0]
    for c in candidates:
        if c and _world_runnable(c):
            return c
    raise RuntimeError(f"running as root, the sandbox runs programs as nobody, but none of {candidates} can be "
                       f"run by nobody (a folder above it is not world-readable); run as another user")


@functools.lru_cache(maxsize=None)
def isolation() -> Isolation:
    """What this machine gives, probed once per process by running an empty program in the full sandbox;
    if that fails (no unshare, user namespaces disabled, mounts that cannot be made read-only), programs
    run without namespaces and describe() says why."""
    as_root = os.geteuid() == 0
    python = pick_python(as_root)
    user = f"nobody (uid {NOBODY})" if as_root else f"uid {os.geteuid()} (us)"
    group = Cgroup.make(64, 4)
    if group is not None:
        group.remove()
    cgroup = group is not None and (not as_root or shutil.which("setpriv") is not None)
    full = Isolation(True, user, python, cgroup=cgroup)
    if not shutil.which("unshare"):
        return Isolation(False, user, python, "no unshare command", cgroup)
    try:
        probe = _run(full, "pass\n", Limits(timeout_s=30))
    except OSError as e:
        return Isolation(False, user, python, f"unshare failed: {e}", cgroup)
    if not probe.passed:
        return Isolation(False, user, python, f"unshare failed: {probe.output.strip()[-300:] or probe.status}", cgroup)
    return full


@dataclass
class Outcome:
    status: str  # "passed" (exit 0), "failed" (any other exit), "timeout", "error" (the sandbox failed)
    returncode: int | None
    seconds: float
    output: str  # the last OUTPUT_TAIL characters of stdout + stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _command(iso: Isolation, limits: Limits, group: Cgroup | None, as_root: bool) -> list[str]:
    """unshare (with namespaces) around the launcher; with a cgroup, a shell that joins it first and,
    as root, setpriv to become nobody after joining (Popen's user= would drop root before the join)."""
    cpu = int(limits.timeout_s) + 1  # a backstop: the wall-clock timeout comes first
    launch = [iso.python, "-I", "-c", LAUNCHER.read_text(encoding="utf-8"), str(int(iso.namespaces)),
              str(limits.memory_mb), str(limits.max_processes), str(limits.max_file_mb), str(cpu)]
    command = (["unshare", *UNSHARE, "--"] if iso.namespaces else []) + launch
    if group is None:
        return command
    if as_root:
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *command]
    return group.enter(command)


def _environment(home: str) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env[name] = DEAD_PROXY
    return env


def run_program(source: str, limits: Limits = Limits(), secret: str = "") -> Outcome:
    """Run `source` as a program in the sandbox; passed = it exited with status 0 within the timeout.
    `secret` (one line) can be read once by the program from file descriptor 3 (never in its files)."""
    if "\n" in secret:
        raise ValueError("secret must be one line")
    return _run(isolation(), source, limits, secret)


def _run(iso: Isolation, source: str, limits: Limits, secret: str = "") -> Outcome:
    as_root = os.geteuid() == 0
    group = Cgroup.make(limits.memory_mb, limits.max_processes) if iso.cgroup else None
    folder = tempfile.mkdtemp(prefix="minillm-sandbox-")
    try:
        # its output goes to a file (capped by RLIMIT_FSIZE), not a pipe we would have to hold in memory
        with tempfile.TemporaryFile() as out:
            if as_root:
                os.chown(folder, NOBODY, NOBODY)
            work = "/tmp" if iso.namespaces else folder
            user = dict(user=NOBODY, group=NOBODY, extra_groups=[]) if as_root and group is None else {}
            t0 = time.perf_counter()
            proc = subprocess.Popen(_command(iso, limits, group, as_root), cwd=folder, env=_environment(work),
                                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, **user)
            # without namespaces or a cgroup, a process that left the group is found by its working folder
            strays = None if iso.namespaces or group is not None else folder
            status = _wait(proc, f"{secret}\n{source}".encode("utf-8"), limits.timeout_s, group, strays)
            seconds = time.perf_counter() - t0
            size = out.seek(0, os.SEEK_END)
            out.seek(max(0, size - 4 * OUTPUT_TAIL))
            text = out.read().decode("utf-8", "replace")[-OUTPUT_TAIL:]
    finally:
        if group is not None:
            group.remove()
        _remove(folder)
    return Outcome(status, proc.returncode, seconds, text)


def _wait(proc: subprocess.Popen, stdin: bytes, timeout_s: float, group: Cgroup | None, strays: str | None) -> str:
    """Feed the program, wait for it (at most timeout_s), then kill every process it left -> its status.
    strays: the working folder to look for leftover processes in (only when nothing else holds them)."""
    try:
        proc.communicate(stdin, timeout=timeout_s)
        status = "passed" if proc.returncode == 0 else "error" if proc.returncode == SETUP_FAILED else "failed"
    except subprocess.TimeoutExpired:
        status = "timeout"
    except BrokenPipeError:  # it ended before reading its program: the launcher failed
        proc.wait()
        status = "error"
    _kill_group(proc.pid)  # unshare and what stayed in its process group; --kill-child takes the pid namespace
    proc.wait()
    if group is not None:
        group.kill_all()  # everything that left the group (setsid), without namespaces too
    if strays is not None:
        _kill_working_in(strays)
    return status


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _kill_working_in(folder: str) -> None:
    """SIGKILL every process we may signal whose working folder is in `folder`: without namespaces or a
    cgroup, the only trace of one that left its process group."""
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            cwd = os.readlink(entry / "cwd")
            if (cwd == folder or cwd.startswith(folder + os.sep)) and int(entry.name) != os.getpid():
                os.kill(int(entry.name), signal.SIGKILL)


def _remove(folder: str) -> None:
    """Remove the program's folder; never raises (a process still writing there is killed first and
    removal is retried; what cannot be removed is left, not an error of the evaluation)."""
    for _ in range(5):
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.exists(folder):
            return
        _kill_working_in(folder)
        time.sleep(0.05)
