"""Run an untrusted Python program (model-written code) as contained as this machine allows.

    isolation()                    what this machine gives: namespaces or not, which user, which Python
    run_program(source, limits)    one program, one fresh process tree -> Outcome (passed/failed/timeout/error)

Each program runs in its own process, started afresh, never in ours:
  * `python -I` (isolated mode: no PYTHON* variables, no user site-packages, no script folder on the
    path) with an environment of only PATH, HOME, TMPDIR and LANG (no proxies, tokens or keys of ours),
    standard input /dev/null, a wall-clock timeout after which its whole process group is killed;
  * resource limits (setrlimit, inside the sandbox before exec): address space (memory_mb), processes
    of its user (max_processes), size of any file it writes (max_file_mb), CPU seconds, no core files;
  * where `unshare --user --map-root-user --net --mount --pid --fork --mount-proc` works (Linux with
    unprivileged user namespaces; checked once): a new network namespace (only a loopback that is down:
    no network, not even this machine's localhost services), a new pid namespace (when its first
    process ends, every process it left behind is killed; it sees no other process), a mount
    namespace in which every file system is read-only and /tmp, /var/tmp, /dev/shm and /run are new,
    empty, size-limited tmpfs (the working folder is that /tmp; it vanishes with the program); see
    sandbox_launcher.py for how the read-only mounts are locked;
  * when we run as root: the program runs as nobody (uid/gid 65534), so that it is not root of the
    machine (root could write device files, which a read-only mount does not stop, or reach
    root-only Unix sockets); the Python it runs then must be one nobody can read (pick_python).

What is NOT isolated: the program can read every file its user can read (it cannot send them
anywhere: no network, and we keep only a tail of its output); it shares the kernel and CPU with
us; without namespaces (isolation().namespaces False) there is no network isolation at all (proxy
variables point at a dead address, which stops only programs that honour them), no file-system
isolation (it runs in a fresh temporary folder, but can write wherever its user can) and no
clean-up of processes that leave their process group. This is a sandbox for honest mistakes and
mild mischief, not for a determined attacker: use a VM or a container for that.
"""

from __future__ import annotations

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

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
UNSHARE = ["--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--mount-proc"]
NOBODY = 65534
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens there
SETUP_FAILED = 125  # sandbox_launcher.SETUP_FAILED
OUTPUT_TAIL = 2000  # characters of the program's output kept


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, per program
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    max_processes: int = 64  # RLIMIT_NPROC (see isolation(): not enforced for root)
    max_file_mb: int = 16  # largest file it may write (RLIMIT_FSIZE); also each tmpfs' size


@dataclass(frozen=True)
class Isolation:
    namespaces: bool  # network, mount (read-only file systems, private /tmp) and pid namespaces
    user: str  # who the program runs as
    python: str  # the interpreter that runs it
    why_not: str = ""  # without namespaces: what failed

    def describe(self) -> str:
        if self.namespaces:
            where = ("no network (own network namespace), file systems read-only except a private tmpfs /tmp, "
                     "own pid namespace")
        else:
            where = (f"NO network or file-system isolation ({self.why_not or 'namespaces unavailable'}): proxies "
                     f"point at a dead address, a fresh temporary folder")
        return f"{where}; runs as {self.user}; {self.python} -I; rlimits on memory, processes, file size, CPU"


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
    full = Isolation(True, user, python)
    if not shutil.which("unshare"):
        return Isolation(False, user, python, "no unshare command")
    try:
        probe = _run(full, "pass\n", Limits(timeout_s=30))
    except OSError as e:
        return Isolation(False, user, python, f"unshare failed: {e}")
    if not probe.passed:
        return Isolation(False, user, python, f"unshare failed: {probe.output.strip()[-300:] or probe.status}")
    return full


def _as_nobody(as_root: bool) -> dict:
    return dict(user=NOBODY, group=NOBODY, extra_groups=[]) if as_root else {}


@dataclass
class Outcome:
    status: str  # "passed" (exit 0), "failed" (any other exit), "timeout", "error" (the sandbox failed)
    returncode: int | None
    seconds: float
    output: str  # the last OUTPUT_TAIL characters of stdout + stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _command(iso: Isolation, limits: Limits) -> list[str]:
    cpu = int(limits.timeout_s) + 1  # a backstop: the wall-clock timeout comes first
    launch = [iso.python, "-I", "-c", LAUNCHER.read_text(encoding="utf-8"), str(int(iso.namespaces)),
              str(limits.memory_mb), str(limits.max_processes), str(limits.max_file_mb), str(cpu)]
    return (["unshare", *UNSHARE, "--"] if iso.namespaces else []) + launch


def _environment(home: str) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env[name] = DEAD_PROXY
    return env


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` as a program in the sandbox; passed = it exited with status 0 within the timeout."""
    return _run(isolation(), source, limits)


def _run(iso: Isolation, source: str, limits: Limits) -> Outcome:
    as_root = os.geteuid() == 0
    # its output goes to a file (capped by RLIMIT_FSIZE), not a pipe we would have to hold in memory
    with tempfile.TemporaryDirectory(prefix="minillm-sandbox-") as folder, tempfile.TemporaryFile() as out:
        if as_root:
            os.chown(folder, NOBODY, NOBODY)
        work = "/tmp" if iso.namespaces else folder
        t0 = time.perf_counter()
        proc = subprocess.Popen(_command(iso, limits), cwd=folder, env=_environment(work), stdin=subprocess.PIPE,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **_as_nobody(as_root))
        try:
            proc.communicate(source.encode("utf-8"), timeout=limits.timeout_s)
            status = "passed" if proc.returncode == 0 else "error" if proc.returncode == SETUP_FAILED else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            status = "timeout"
        finally:
            _kill_group(proc.pid)  # whatever it left running in its process group
        seconds = time.perf_counter() - t0
        size = out.seek(0, os.SEEK_END)
        out.seek(max(0, size - 4 * OUTPUT_TAIL))
        text = out.read().decode("utf-8", "replace")[-OUTPUT_TAIL:]
    return Outcome(status, proc.returncode, seconds, text)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
