"""The flag vocabulary every command line uses: numbers with the values they allow, the files a
command reads and writes, and a parser whose errors are one line.

    p = Parser(prog="python -m minillm.thing", description=...)
    p.add_argument("--k", type=integer(1), default=4)              # a whole number >= 1
    p.add_argument("--top-p", type=real(0, 1, low_open=True))      # a finite number in (0, 1]
    add_input(p, "--model", help=...)                              # a file the command reads
    add_output(p, "--json", help=...)                              # a file it writes
    args = p.parse_args(argv)                                      # exit 2 with one line, or checked args

A value outside its range is refused while parsing ("argument --k: must be a whole number >= 1,
got '0'"). Once the flags are parsed, and before the command does any work, every output is
checked against every input and against the file system (check_outputs): it may not be the same
file as an input (through links too), its folder must exist and be writable, a folder output may
not be a file, and where the command has --overwrite, an existing output needs it. One rule for
every command; tests/test_flags.py walks every command's parser and tries each rule on each flag.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import check_output

BIGGEST = 2**62  # the largest whole number any flag takes (torch seeds are 64-bit)


class Number:
    """An argparse type: a whole number (kind int) or a finite float in [low, high] (an end excluded
    when low_open / high_open). `allows(text)` says, without raising, whether a value is in range."""

    def __init__(self, kind: type, low: float, high: float, low_open: bool = False, high_open: bool = False):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.__name__ = self.describe()  # what argparse prints for a value it cannot parse

    def describe(self) -> str:
        what = "a whole number" if self.kind is int else "a finite number"
        show = str if self.kind is int else "{:g}".format
        bounds = [f"{'>' if self.low_open else '>='} {show(self.low)}"] if self.low > -math.inf else []
        if self.high < (BIGGEST if self.kind is int else math.inf):
            bounds.append(f"{'<' if self.high_open else '<='} {show(self.high)}")
        return " ".join([what, " and ".join(bounds)]) if bounds else what

    def accepts(self, value) -> bool:
        """Whether a value already read (an int; for a float kind any finite number; never a bool) is in
        range: the one range rule of the command lines and of the server's JSON fields."""
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low or (not self.low_open and value == self.low)
        below = value < self.high or (not self.high_open and value == self.high)
        return above and below

    def parse(self, text: str):
        """The value, or None when `text` is not a number of this kind in range."""
        try:
            value = int(text, 10) if self.kind is int else float(text)
        except ValueError:
            return None
        return value if self.accepts(value) else None

    def allows(self, text: str) -> bool:
        return self.parse(text) is not None

    def __call__(self, text: str):
        value = self.parse(text)
        if value is None:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


def integer(low: int = 1, high: int = BIGGEST) -> Number:
    """A whole number in [low, high] (default: >= 1)."""
    return Number(int, low, high)


def real(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Number:
    """A finite float in [low, high]; low_open / high_open exclude that end."""
    return Number(float, low, high, low_open, high_open)


class SetThreads(argparse.Action):
    """--threads N: torch computes on N CPU threads from the moment the flag is parsed."""

    def __call__(self, parser, namespace, value, option_string=None):
        torch.set_num_threads(value)
        setattr(namespace, self.dest, value)


def add_threads(p: argparse.ArgumentParser) -> None:
    """The --threads flag of a command that computes (torch's default: one thread per core)."""
    p.add_argument("--threads", type=integer(1, 1024), action=SetThreads, default=None, metavar="N",
                   help="CPU threads torch computes on (default: one per core; OMP_NUM_THREADS=N does the same)")


def add_input(p: argparse.ArgumentParser, *names: str, **kwargs) -> argparse.Action:
    """A flag (or positional) naming a file or folder the command reads: no output may be it."""
    action = p.add_argument(*names, **kwargs)
    action.role = "input"
    return action


def add_output(p: argparse.ArgumentParser, *names: str, folder: bool = False, replaces: bool = False,
               **kwargs) -> argparse.Action:
    """A flag naming what the command writes: a file, or with folder=True a folder (made if missing;
    its parent must exist). replaces=True: the folder is replaced as a whole, so no input may lie in it."""
    action = p.add_argument(*names, **kwargs)
    action.role, action.folder, action.replaces = "output", folder, replaces
    return action


def paths_of(value) -> list[str]:
    """A flag's value as a list of paths (None, one path, or a list from action="append")."""
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def check_outputs(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every output flag of `p` against every input flag and the file system (the module docstring's
    rules): an OSError whose one line names the flag and the path."""
    actions = [a for a in p._actions if getattr(a, "role", None)]
    inputs = [path for a in actions if a.role == "input" for path in paths_of(getattr(args, a.dest, None))]
    overwrite = getattr(args, "overwrite", None)
    for a in actions:
        if a.role != "output":
            continue
        flag = a.option_strings[0] if a.option_strings else a.dest
        for out in paths_of(getattr(args, a.dest, None)):
            out = Path(out)
            check_output(out, flag, folder=a.folder, inputs=tuple(inputs))
            if a.replaces and out.is_dir():
                held = [src for src in inputs if Path(src).exists() and inside(Path(src), out)]
                if held:
                    raise FileExistsError(f"{flag} {out}: holds the input {held[0]}; replacing the folder would "
                                          f"delete it: choose another {flag}")
            exists = out.is_dir() and any(out.iterdir()) if a.folder else out.exists()
            if overwrite is False and exists:
                raise FileExistsError(f"{flag} {out}: exists{' and is not empty' if a.folder else ''}; pass "
                                      "--overwrite to replace it")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and check_outputs run on the parsed flags. Subcommands
    made with add_subparsers are Parsers too and check their own flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        try:
            check_outputs(self, parsed)
        except OSError as e:
            self.error(str(e))
        return parsed, extra

    def error(self, message: str):
        """One line on stderr and exit status 2 (argparse prints the whole usage first)."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def progress_bar(total: int, desc: str, unit: str = ""):
    """A tqdm bar on stderr when stderr is a terminal; in a log, one line saying what starts instead of
    a bar's redraws."""
    quiet = not sys.stderr.isatty()
    if quiet:
        print(f"{desc}: {total} {unit}".rstrip() + "...", file=sys.stderr, flush=True)
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr, disable=quiet)


def fail(message: str, code: int = 2) -> int:
    """A command's one-line error on stderr -> its exit status."""
    print(f"error: {message}", file=sys.stderr)
    return code
