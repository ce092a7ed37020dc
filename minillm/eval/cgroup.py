"""A control group for one sandboxed program: a memory limit on all its processes together, a limit
on how many there are, and a way to kill every one of them, wherever they moved in the process tree.

    group = Cgroup.make(memory_mb=1024, max_processes=16)   # None where the machine offers none
    command = group.enter(command)                          # the program's command, joining it first
    group.kill_all(); group.remove()

Made where this process can write a cgroup file system: cgroup v2 (one tree, `memory` and `pids`
controllers enabled in its root) or cgroup v1 (one tree per controller, `memory` and `pids`). In
practice that means running as root outside a container that hides them; elsewhere make() returns
None and the sandbox falls back to per-process limits (sandbox.py says which holds).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def _trees() -> dict[str, Path] | None:
    """controller -> the folder to make groups in, for `memory` and `pids`; None when either is missing."""
    v2 = ROOT / "cgroup.controllers"
    if v2.exists() and {"memory", "pids"} <= set(v2.read_text().split()) and _writable(ROOT):
        return {"memory": ROOT, "pids": ROOT}
    trees = {c: ROOT / c for c in ("memory", "pids")}
    return trees if all(_writable(t) and (t / "cgroup.procs").exists() for t in trees.values()) else None


def _remove_stale(trees: dict[str, Path]) -> None:
    """Groups left by an evaluation that was killed (its pid is gone): removed once empty."""
    for tree in set(trees.values()):
        for folder in tree.glob("minillm-sandbox-*-*"):
            pid = folder.name.split("-")[2]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                Cgroup([folder]).remove()


class Cgroup:
    def __init__(self, folders: list[Path]):
        self.folders = folders  # one per tree (v1: memory and pids) or one (v2)

    @classmethod
    def make(cls, memory_mb: int, max_processes: int) -> "Cgroup | None":
        trees = _trees()
        if trees is None:
            return None
        _remove_stale(trees)
        name = f"minillm-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
        folders = sorted({t / name for t in trees.values()})
        group = cls(folders)
        try:
            for f in folders:
                f.mkdir()
            group._limit(memory_mb << 20, max_processes)
        except OSError:
            group.remove()
            return None
        return group

    def _limit(self, memory: int, processes: int) -> None:
        needed = {"memory.max": memory, "pids.max": processes, "memory.limit_in_bytes": memory}  # v2, v1
        no_swap = {"memory.swap.max": 0, "memory.memsw.limit_in_bytes": memory}  # where swap is accounted
        for f in self.folders:
            for name, value in {**needed, **no_swap}.items():
                if (f / name).exists():
                    with contextlib.suppress(*(() if name in needed else (OSError,))):
                        (f / name).write_text(str(value))
        written = [f / n for f in self.folders for n in ("memory.max", "memory.limit_in_bytes", "pids.max")]
        if sum(p.exists() for p in written) < 2:
            raise OSError("the group lacks its memory or pids limit files")

    def enter(self, command: list[str]) -> list[str]:
        """`command` run by a shell that first moves itself into the group (its children inherit it)."""
        joins = " && ".join(f'echo $$ > "{f}/cgroup.procs"' for f in self.folders)
        return ["/bin/sh", "-c", f'{joins} && exec "$@"', "sh", *command]

    def pids(self) -> list[int]:
        out = set()
        for f in self.folders:
            with contextlib.suppress(OSError):
                out.update(int(p) for p in (f / "cgroup.procs").read_text().split())
        return sorted(out)

    def kill_all(self) -> None:
        """SIGKILL every process in the group until none is left (a fork may race a kill; 2 s at most)."""
        deadline = time.monotonic() + 2.0
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def remove(self) -> None:
        self.kill_all()
        for f in self.folders:
            for _ in range(100):  # rmdir fails while the last killed process is being torn down
                try:
                    f.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
