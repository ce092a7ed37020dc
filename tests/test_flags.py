"""Every command's flags, tried from its parser (minillm.flags): no test is written per flag.

For each command and subcommand this walks the argparse actions and tries
  * each numeric flag with 0, -1, nan, inf and 1e18: a value outside the flag's declared range must end
    with exit status 2 and one line on stderr naming the flag (a value inside it is the flag's to take);
  * each output flag onto each input of the command (the file itself, and a link to it), into a missing
    folder, and onto an existing output without --overwrite where the command has that flag: exit 2,
    one line naming the output flag;
and in every case no file is created or changed (every file under the test's folder hashed before and
after). A numeric flag declared with a bare int or float, or a command the list below misses, fails.
"""

import argparse
import ast
import hashlib
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from minillm.flags import Number
from conftest import exit_status

ROOT = Path(__file__).resolve().parents[1]
# command -> (module, its entry: main(argv) returning or exiting with the status)
COMMANDS = {
    "train.py": (ROOT / "train.py", "main"),
    "sample.py": (ROOT / "sample.py", "main"),
    "minillm.convert": ("minillm.convert.__main__", "main"),
    "minillm.quantize": ("minillm.quantize.__main__", "main"),
    "minillm.export": ("minillm.export", "main"),
    "minillm.lora": ("minillm.lora", "main"),
    "minillm.prune": ("minillm.prune.__main__", "main"),
    "minillm.eval": ("minillm.eval.__main__", "main"),
    "minillm.inspector": ("minillm.inspector.cli", "run"),
    "minillm.serve": ("minillm.serve.__main__", "main"),
}
BAD_NUMBERS = ("0", "-1", "nan", "inf", "1e18")


def load(where):
    if isinstance(where, Path):
        spec = importlib.util.spec_from_file_location(f"cmd_{where.stem}", where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(where)


NOT_COMMANDS = {ROOT / "minillm/eval/sandbox_launcher.py"}  # run only by sandbox.py, with numbers it checked (Limits)


def has_main_guard(path: Path) -> bool:
    """A top-level `if __name__ == "__main__":`."""
    return any(isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)
               for node in ast.parse(path.read_text()).body)


def test_every_command_is_listed():
    """A file run as a command (a __main__.py, or one with a __main__ guard) is in COMMANDS, so its flags are tried."""
    found = {p for p in (ROOT / "minillm").rglob("*.py") if p.name == "__main__.py" or has_main_guard(p)}
    found |= {p for p in ROOT.glob("*.py") if has_main_guard(p)}
    found -= NOT_COMMANDS
    listed = {w if isinstance(w, Path) else ROOT / (w.replace(".", "/") + ".py") for w, _ in COMMANDS.values()}
    listed |= {p.with_name("__main__.py") for p in listed}
    missing = {p for p in found if p not in listed and p.parent / "cli.py" not in listed}
    assert not missing, f"commands whose flags this test does not try: {sorted(map(str, missing))}"


def parsers(parser, prefix=()):
    """(subcommand words, parser) for the command and every subcommand."""
    yield list(prefix), parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from parsers(sub, (*prefix, name))


def cases():
    out = []
    for command, (where, entry) in COMMANDS.items():
        module = load(where)
        for words, parser in parsers(module.make_parser()):
            out.append(pytest.param(module, entry, words, parser, id=" ".join([command, *words])))
    return out


CASES = cases()


def option(a) -> str:
    return a.option_strings[-1] if a.option_strings else a.dest


def baseline(parser, folder: Path) -> dict:
    """A value for every required flag and positional: inputs are files in `folder`, outputs new paths."""
    values = {}
    for a in parser._actions:
        if not (a.required or not a.option_strings) or isinstance(a, (argparse._SubParsersAction, argparse._HelpAction)):
            continue
        role = getattr(a, "role", None)
        if role == "input":
            path = folder / f"input-{a.dest}.bin"
            path.write_bytes(f"contents of {a.dest}".encode())
            values[a] = str(path)
        elif role == "output":
            values[a] = str(folder / f"out-{a.dest}")
        elif a.choices:
            values[a] = str(list(a.choices)[0])
        elif isinstance(a.type, Number):
            values[a] = next(v for v in ("1", "0.5", "2") if a.type.allows(v))
        else:
            values[a] = "x"
    return values


def argv_of(words, values: dict) -> list[str]:
    out = list(words)
    for a, v in values.items():
        if a.option_strings:
            out += [a.option_strings[0], *([v] if v is not None else [])]
    out += [v for a, v in values.items() if not a.option_strings]
    return out


def snapshot(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def refused(module, entry, argv, flag, folder, capsys):
    """Run the command: exit 2, one line on stderr naming `flag`, nothing under `folder` created or changed."""
    before = snapshot(folder)
    status = exit_status(getattr(module, entry), argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, f"{argv}: exit {status}, stderr {err!r}"
    assert len(err.splitlines()) == 1 and re.search(rf"{re.escape(flag)}\b", err), f"{argv}: {err!r}"
    assert snapshot(folder) == before, f"{argv}: files created or changed"
    return err


@pytest.mark.parametrize("module,entry,words,parser", CASES)
def test_numeric_flags_refuse_what_they_cannot_take(module, entry, words, parser, tmp_path, capsys):
    numeric = [a for a in parser._actions if a.type in (int, float) and not a.choices]
    assert not numeric, f"declare these with minillm.flags.integer / real: {[option(a) for a in numeric]}"
    values = baseline(parser, tmp_path)
    tried = 0
    for a in parser._actions:
        if not isinstance(a.type, Number) or a.choices:
            continue
        for bad in BAD_NUMBERS:
            if a.type.allows(bad):
                continue
            argv = argv_of(words, {**values, a: bad})
            refused(module, entry, argv, option(a), tmp_path, capsys)
            tried += 1
    assert tried or not any(isinstance(a.type, Number) for a in parser._actions)


@pytest.mark.parametrize("module,entry,words,parser", CASES)
def test_outputs_never_land_on_inputs_or_nowhere(module, entry, words, parser, tmp_path, capsys):
    values = baseline(parser, tmp_path)
    outputs = [a for a in parser._actions if getattr(a, "role", None) == "output"]
    inputs = [a for a in parser._actions if getattr(a, "role", None) == "input"]
    overwrite = next((a for a in parser._actions if a.dest == "overwrite"), None)
    for out in outputs:
        flag = option(out)
        for src in inputs:
            path = Path(values.get(src) or tmp_path / f"input-{src.dest}.bin")
            path.write_bytes(b"an input")
            link = tmp_path / f"link-{src.dest}"
            if not link.exists():
                link.symlink_to(path)
            for target in (path, link):
                argv = argv_of(words, {**values, src: str(path), out: str(target)})
                refused(module, entry, argv, flag, tmp_path, capsys)
            if out.replaces and overwrite is not None:  # replacing the folder that holds the input
                argv = argv_of(words, {**values, src: str(path), out: str(tmp_path), overwrite: None})
                refused(module, entry, argv, flag, tmp_path, capsys)
        missing = tmp_path / "no-such-folder" / "out"
        refused(module, entry, argv_of(words, {**values, out: str(missing)}), flag, tmp_path, capsys)
        if overwrite is not None:
            existing = tmp_path / "existing"
            existing.mkdir(exist_ok=True)
            (existing / "kept.txt").write_text("kept")
            refused(module, entry, argv_of(words, {**values, out: str(existing if out.folder else existing / "kept.txt")}),
                    flag, tmp_path, capsys)


OUTPUT_NAMES = {"out", "json", "out_dir", "html", "output"}
INPUT_NAMES = {"model", "data", "tasks", "calib", "draft", "amateur", "init_from", "distill_from", "input", "ckpt",
               "base", "adapters", "src"}


@pytest.mark.parametrize("module,entry,words,parser", CASES)
def test_path_flags_are_declared_as_inputs_or_outputs(module, entry, words, parser):
    """The tests above find outputs and inputs by their declaration (add_output / add_input): a path flag
    declared with a plain add_argument would escape them, so the usual names must be declared."""
    wrong = [option(a) for a in parser._actions
             if (a.dest in OUTPUT_NAMES and getattr(a, "role", None) != "output")
             or (a.dest in INPUT_NAMES and getattr(a, "role", None) != "input")]
    assert not wrong, f"declare with minillm.flags.add_input / add_output: {wrong}"


# ----------------------------------------------------------------------------- help from the truth

def default_words(value) -> set[str]:
    """How a help text may spell a default value."""
    if value is True:
        return {"on"}
    if value == "\n":
        return {"a newline"}
    if isinstance(value, float):
        return {f"{value:g}", str(value)}
    return {str(value)}


def states_default(text: str, value) -> bool:
    """'default: V', 'default V' or 'V (default)' in the help text."""
    return any(re.search(rf"default:?\s*{re.escape(w)}(?![\w.])", text) or f"{w} (default)" in text
               for w in default_words(value))


@pytest.mark.parametrize("module,entry,words,parser", CASES)
def test_every_help_states_the_real_default_and_every_choice(module, entry, words, parser):
    wrong = []
    for a in parser._actions:
        if a.help in (None, argparse.SUPPRESS) or isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        value = a.default
        if value not in (None, False, [], argparse.SUPPRESS) and not states_default(a.help, value):
            wrong.append(f"{option(a)}: default {value!r}, help {a.help!r}")
        if a.choices and a.metavar is not None and not all(str(c) in a.help for c in a.choices):
            wrong.append(f"{option(a)}: choices {list(a.choices)} not all in help {a.help!r}")
    assert not wrong, "\n".join(wrong)


def readme_commands() -> list[tuple[str, list[str]]]:
    """(command, its words) for every command line in README's code blocks (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|\|", line.split("#")[0] if not line.lstrip().startswith("#") else ""):
                words = part.split()
                if len(words) > 1 and words[0] == "python":
                    command = words[1] if words[1] != "-m" else words[2].replace("minillm.", "minillm.")
                    out.append((command, words))
    return out


def test_every_flag_readme_uses_exists():
    parsers_of = {cmd: list(parsers(load(where).make_parser())) for cmd, (where, _) in COMMANDS.items()}
    missing = []
    for command, words in readme_commands():
        key = Path(command).name if command.endswith(".py") else command
        if key not in parsers_of:
            continue  # bench/ scripts and pip
        known = {s for _, p in parsers_of[key] for a in p._actions for s in a.option_strings}
        missing += [f"{' '.join(words)}: {w}" for w in words if w.startswith("--") and w.split("=")[0] not in known]
    assert not missing, "\n".join(missing)
    assert len(readme_commands()) > 30
