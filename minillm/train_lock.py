"""The output lock: one run at a time writes the files of a name in a folder (NAME.lock, an OS lock)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

try:
    import fcntl  # the output lock (Linux, macOS)
except ImportError:  # Windows: runs are not locked
    fcntl = None

from .train_config import ConfigError


@contextlib.contextmanager
def output_lock(path: Path):
    """Hold `path` (NAME.lock in out_dir) while this run writes NAME's files: another run of the same
    name in the same folder is refused meanwhile (ConfigError). An OS lock (flock): the OS drops it
    when the process ends, even when killed. The file is removed at the end; one left by a killed
    run is not locked, and the next run takes it."""
    fd = take_lock(path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: a run that opened this file meanwhile sees it gone (take_lock)
        os.close(fd)


def take_lock(path: Path) -> int:
    """Open and lock `path`, making its folder if need be -> the open descriptor (see output_lock)."""
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"out_dir {folder} is a file, not a folder", "out_dir")
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"cannot write in out_dir {folder}: {e.strerror}", "out_dir") from None
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"another run (pid {holder}) is writing the files of name {path.stem!r} in {folder} "
                              f"(it holds {path.name}): wait for it to end, or pick another name", "name") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # still the file at `path`: the lock is ours
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        os.close(fd)  # the run that held it removed it as we opened it: lock the new one
