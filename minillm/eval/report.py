"""Results as a table (for people) and as JSON (for programs): one row per model / run.

    table(rows, columns)   fixed-width text; a column is (key, header, format), e.g. ("ppl", "ppl", "{:.3f}")
    write_json(obj, path)  indented JSON, written atomically; NaN and infinities become null
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..checkpoint import atomic_write


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value) if fmt else str(value)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Text columns left-aligned, numbers right-aligned; a missing value or NaN prints as '-'."""
    cells = [[_cell(r.get(key), fmt) for key, _, fmt in columns] for r in rows]
    heads = [head for _, head, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    numeric = [all(isinstance(r.get(key), (int, float)) or r.get(key) is None for r in rows)
               for key, _, _ in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()
    return "\n".join([line(heads), line(["-" * w for w in widths])] + [line(c) for c in cells])


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(obj, path: str | Path) -> Path:
    text = json.dumps(_finite(obj), indent=2, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
