"""The inside of the sandbox. sandbox.py runs this file's text with `python -I -c` (so the user it runs
as need not be able to read our package); never imported; standard library only.

    python -I -c "$(cat sandbox_launcher.py)" NAMESPACES MEMORY_MB MAX_PROCESSES MAX_FILE_MB CPU_S  < program.py

reads a secret line and then the program from standard input, then, with NAMESPACES = 1 (started by `unshare --user
--map-root-user --net --mount --pid --fork --mount-proc`, so it is "root" of a fresh user namespace
that owns a fresh mount, network and pid namespace):

  1. makes every mount it inherited read-only (in this mount namespace only);
  2. mounts new, empty, size-limited tmpfs over /tmp, /var/tmp, /dev/shm and /run, hiding what the
     machine keeps there (its temp files, and Unix sockets such as a session bus or an ssh agent);
  3. enters one more, nested user namespace in which it maps no user: the mounts it now sees are
     locked (a mount made read-only by a more privileged namespace cannot be made writable again) and
     after exec the program has no capability anywhere, so it cannot undo 1 or 2;
then, with or without namespaces: writes the program to program.py in the working folder (the new
/tmp; without namespaces, a fresh folder made by sandbox.py and passed as the current directory),
sets the resource limits, points standard input at /dev/null, puts the secret line in a pipe whose
read end is file descriptor 3 (the program may read it once; it is in no file and no argument) and
execs `python -I program.py`.

Exit status 125 with a line on stderr: the sandbox could not be set up (the program did not run).
"""

import ctypes
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_NOATIME, MS_NODIRATIME, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 16384, 1 << 18, 1 << 21
CLONE_NEWUSER = 0x10000000
# per-mount flags a remount must repeat (the kernel refuses to drop flags it locked)
KEEP = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
        "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm", "/run")
SETUP_FAILED = 125

libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target: str, fstype, flags: int, data=None) -> None:
    enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    check(libc.mount(enc(source), target.encode(), enc(fstype), flags, enc(data)), f"mount {target}")


def mount_points() -> list[tuple[str, list[str]]]:
    """(mount point, its per-mount options) for every mount this namespace sees, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()  # id, parent, dev, root, mount point, options, ...
            point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
            out.append((point, fields[5].split(",")))
    return out


def lock_down(scratch_mb: int) -> None:
    """Steps 1-3 of the docstring."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do here propagates back to the machine
    for point, options in mount_points():
        if "ro" in options:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for o in options:
            flags |= KEEP.get(o, 0)
        mount(None, point, None, flags)
    for point in SCRATCH:
        if os.path.isdir(point):
            mount("tmpfs", point, "tmpfs", MS_NOSUID | MS_NODEV, f"size={scratch_mb}m,mode=1777")
    check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")


def set_limits(memory_mb: int, max_processes: int, max_file_mb: int, cpu_s: int) -> None:
    for which, value in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_NPROC, max_processes),
                         (resource.RLIMIT_FSIZE, max_file_mb << 20), (resource.RLIMIT_CPU, cpu_s),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))


def secret_on_fd3(secret: bytes) -> None:
    r, w = os.pipe()
    os.write(w, secret)  # one line: far below a pipe's buffer
    os.close(w)
    if r != 3:
        os.dup2(r, 3)
        os.close(r)
    os.set_inheritable(3, True)


def main() -> None:
    namespaces, memory_mb, max_processes, max_file_mb, cpu_s = map(int, sys.argv[1:6])
    secret, _, program = sys.stdin.buffer.read().partition(b"\n")
    try:
        if namespaces:
            lock_down(max(max_file_mb, 16))
            os.chdir("/tmp")
        with open("program.py", "wb") as f:
            f.write(program)
        set_limits(memory_mb, max_processes, max_file_mb, cpu_s)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        secret_on_fd3(secret)
    except OSError as e:
        print(f"sandbox setup failed: {e}", file=sys.stderr)
        sys.exit(SETUP_FAILED)
    os.execv(sys.executable, [sys.executable, "-I", "program.py"])


if __name__ == "__main__":
    main()
