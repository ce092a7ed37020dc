"""The tests' one way to run a command in this process: the top-level scripts (train.py, sample.py)
loaded once per session, any main(argv) run to its exit status, and what it printed."""

import importlib.util
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@cache
def script(name: str):
    """ROOT/<name>.py as a module, loaded once: the module `import <name>` gives (it is registered under
    that name), so a test that patches it patches what every other test runs."""
    path = ROOT / f"{name}.py"
    module = sys.modules.get(name)
    if module is not None and Path(getattr(module, "__file__", "")).resolve() == path:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def exit_status(main, argv) -> int:
    """A command's exit status, run in this process: main's return value, or the status it exited with
    (argparse refuses a flag with SystemExit(2); a None return is success)."""
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    return 0 if status is None else status


def run(capsys, main, *argv) -> tuple[int, str, str]:
    """main(argv) in this process -> (exit status, stdout, stderr)."""
    status = exit_status(main, [str(a) for a in argv])
    printed = capsys.readouterr()
    return status, printed.out, printed.err


def one_error_line(err: str) -> str:
    """The one line a refused command writes on stderr (no traceback, nothing else)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]
