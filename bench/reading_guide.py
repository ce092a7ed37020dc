"""What README's reading guide costs a reader, counted honestly: for each idea, the lines of every
definition inside minillm/ that its entry functions reach.

    python -m bench.reading_guide                         # this tree
    python -m bench.reading_guide --before OLD            # beside another checkout's (e.g. of 648e515)
    python -m bench.reading_guide --detail                # every definition counted

The rule. Start from an idea's entry definitions; a definition reached is counted once, whole
(`def`/`class` line to last line), its docstring lines reported apart. From a function, a name
reaches the function, class or module-level constant it names in minillm: a name of the same module,
an imported name, `module.name` for an imported minillm module, `self.name` / `cls.name` in the
class and its minillm bases, `Class.name`, and `obj.name` where `name` is a method of a class already
reached. A class reached counts its own lines outside its methods (fields, decorators); each method
counts when something reaches it. What belongs to another idea of the guide (the model for the
decode loop, the checkpoint format for the trainer) is not counted again: a call into those files
is listed, not followed.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass, field
from pathlib import Path

# idea -> (entry definitions "file::Qual.name", files that are other ideas: listed, not followed)
PROCESSORS = ["sampling.py::SamplingParams", "sampling.py::process_logits", "sampling.py::apply_history_processors"]
GUIDE = {
    "a forward pass": (["model.py::Transformer.forward", "model.py::Transformer.__init__", "config.py::ModelConfig"],
                       ["kv_cache.py"]),
    "the KV cache": (["kv_cache.py::KVCache", "kv_cache.py::KVCache.update", "kv_cache.py::KVCache.crop",
                      "kv_cache.py::KVCache.for_run"], ["model.py"]),
    "a training step": (["trainer.py::train_loop"], ["train_config.py", "train_resume.py", "model.py", "checkpoint.py",
                                                      "data.py", "ddp.py", "config.py"]),
    "a run's configuration": (["train_config.py::TrainConfig"], ["config.py", "checkpoint.py"]),
    "the training state and resume": (["train_resume.py::save_state", "train_resume.py::resume"],
                                      ["checkpoint.py", "config.py", "model.py", "train_config.py"]),
    "the logit processors": (PROCESSORS, []),
    "a decode loop": (["generate.py::stream_tokens"], ["model.py", "kv_cache.py", "tokenizer.py", *PROCESSORS]),
    "speculative": (["speculative.py::speculative_stream"], ["model.py", "kv_cache.py", "generate.py", "sampling.py"]),
    "contrastive": (["contrastive.py::contrastive_stream"], ["model.py", "kv_cache.py", "generate.py", "sampling.py"]),
    "loading a real checkpoint": (["convert/gguf.py::load_gguf", "convert/writer.py::write_checkpoint",
                                   "checkpoint.py::load_model"],
                                  ["model.py", "config.py", "tokenizer.py", "quantized.py", "convert/quantized.py"]),
}
# An entry of the second list is a file (nothing in it is followed) or one definition "file::Qual".


@dataclass
class Module:
    path: str  # relative to minillm/
    tree: ast.Module
    defs: dict[str, ast.AST] = field(default_factory=dict)  # "name" / "Class.method" -> node
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # local -> (module path, name or None)


def load(root: Path) -> dict[str, Module]:
    """Every module of minillm/ under root, with its top-level definitions, methods and imports."""
    pkg = root / "minillm"
    mods = {}
    for file in sorted(pkg.rglob("*.py")):
        rel = str(file.relative_to(pkg))
        m = Module(rel, ast.parse(file.read_text()))
        for node in m.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                m.defs[node.name] = node
                if isinstance(node, ast.ClassDef):
                    for sub in node.body:
                        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            m.defs[f"{node.name}.{sub.name}"] = sub
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(t, ast.Name):
                        m.defs[t.id] = node
        mods[rel] = m
    for m in mods.values():
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = Path(m.path).parent
                for _ in range(node.level - 1):
                    base = base.parent
                target = str(base / node.module.replace(".", "/")) if node.module else str(base)
                for a in node.names:
                    sub = f"{target}/{a.name}".lstrip("./")
                    if f"{sub}.py" in mods or f"{sub}/__init__.py" in mods:  # a module: from . import data
                        m.imports[a.asname or a.name] = (f"{sub}.py" if f"{sub}.py" in mods else f"{sub}/__init__.py", None)
                    else:
                        file = f"{target}.py".lstrip("./") if f"{target}.py".lstrip("./") in mods else f"{target}/__init__.py".lstrip("./")
                        m.imports[a.asname or a.name] = (file, a.name)
    return mods


def resolve(mods: dict[str, Module], file: str, name: str, depth: int = 0) -> tuple[str, str] | None:
    """(file, qualname) that `name` means in `file`, following re-exports; None outside minillm."""
    m = mods.get(file)
    if m is None or depth > 5:
        return None
    if name in m.defs:
        return file, name
    if name in m.imports:
        target, real = m.imports[name]
        return resolve(mods, target, real, depth + 1) if real else None
    return None


def own_lines(node: ast.AST) -> tuple[int, int]:
    """(code lines, docstring lines) of a definition; a class without its methods."""
    total = node.end_lineno - (node.decorator_list[0].lineno if getattr(node, "decorator_list", None) else node.lineno) + 1
    if isinstance(node, ast.ClassDef):
        total -= sum(s.end_lineno - (s.decorator_list[0].lineno if s.decorator_list else s.lineno) + 1
                     for s in node.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)))
    doc = 0
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = body[0].end_lineno - body[0].lineno + 1
    return total - doc, doc


def references(mods, file: str, qual: str, reached_classes: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The definitions one definition's body names (see the module docstring for the rule)."""
    node, m = mods[file].defs[qual], mods[file]
    cls = qual.split(".")[0] if "." in qual else (qual if isinstance(node, ast.ClassDef) else None)
    out = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            hit = resolve(mods, file, sub.id)
            if hit:
                out.add(hit)
        elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
            base = sub.value.id
            if base in ("self", "cls") and cls:
                out |= {h for h in (method(mods, file, cls, sub.attr),) if h}
            elif base in m.imports and m.imports[base][1] is None:  # module.name
                hit = resolve(mods, m.imports[base][0], sub.attr)
                if hit:
                    out.add(hit)
            else:
                target = resolve(mods, file, base)
                if target and isinstance(mods[target[0]].defs[target[1]], ast.ClassDef):
                    out |= {h for h in (method(mods, target[0], target[1], sub.attr),) if h}
                else:
                    out |= {h for c in reached_classes for h in (method(mods, c[0], c[1], sub.attr),) if h}
        elif isinstance(sub, ast.Attribute):
            out |= {h for c in reached_classes for h in (method(mods, c[0], c[1], sub.attr),) if h}
    out.discard((file, qual))
    return out


def method(mods, file: str, cls: str, name: str) -> tuple[str, str] | None:
    """Class.name in cls or its minillm bases."""
    m = mods[file]
    if f"{cls}.{name}" in m.defs:
        return file, f"{cls}.{name}"
    node = m.defs.get(cls)
    for b in getattr(node, "bases", []):
        hit = resolve(mods, file, b.id) if isinstance(b, ast.Name) else None
        if hit and isinstance(mods[hit[0]].defs[hit[1]], ast.ClassDef):
            found = method(mods, hit[0], hit[1], name)
            if found:
                return found
    return None


def reach(mods, entries: list[str], others: list[str]) -> tuple[dict[tuple[str, str], tuple[int, int]], set[str]]:
    """Every definition the entries reach -> (code, docstring) lines; and the other ideas' files touched."""
    todo = [(f, q) for f, q in (e.split("::") for e in entries) if f in mods and q in mods[f].defs]  # an older tree may lack some
    seen, touched, classes = {}, set(), set()
    while todo:  # until nothing new: a class reached late makes earlier `obj.name` calls resolvable
        while todo:
            item = todo.pop()
            if item in seen:
                continue
            node = mods[item[0]].defs[item[1]]
            seen[item] = own_lines(node)
            if isinstance(node, ast.ClassDef):
                classes.add(item)
                todo += [(item[0], f"{item[1]}.{n}") for n in ("__init__", "__post_init__")
                         if f"{item[1]}.{n}" in mods[item[0]].defs]
        for item in list(seen):
            for ref in references(mods, *item, classes):
                other = next((o for o in (ref[0], f"{ref[0]}::{ref[1]}", f"{ref[0]}::{ref[1].split('.')[0]}")
                              if o in others), None)
                if other:
                    touched.add(other)
                elif ref not in seen:
                    todo.append(ref)
    return seen, touched


def table(root: Path, detail: bool = False) -> list[tuple[str, int, int, list[str], set[str]]]:
    mods = load(root)
    rows = []
    for idea, (entries, others) in GUIDE.items():
        seen, touched = reach(mods, entries, others)
        if detail:
            print(f"{idea}: " + ", ".join(f"{f}::{q} {c}" for (f, q), (c, _) in sorted(seen.items(), key=lambda kv: -kv[1][0])))
        files = sorted({f for f, _ in seen})
        rows.append((idea, sum(c for c, _ in seen.values()), sum(d for _, d in seen.values()), files, touched))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="a checkout of minillm")
    ap.add_argument("--before", metavar="ROOT", help="an older checkout: print its counts beside these")
    ap.add_argument("--detail", action="store_true", help="list every definition counted, longest first")
    args = ap.parse_args(argv)
    rows = table(Path(args.root), args.detail)
    before = {r[0]: r for r in table(Path(args.before))} if args.before else {}
    head = "| idea | " + ("before: code (docstrings) | " if before else "") + "code (docstrings) | files it opens | calls into |"
    print(head + "\n" + "|---" * head.count(" | ") + "|---|")
    for idea, code, doc, files, touched in rows:
        was = (f"{before[idea][1]} ({before[idea][2]}) | " if before[idea][1] else "- | ") if before else ""
        print(f"| {idea} | {was}**{code}** ({doc}) | {', '.join(files)} | {', '.join(sorted(touched)) or '-'} |")


if __name__ == "__main__":
    main()
