"""Benchmarks: one script per question, each printing one table. Run them from the repository root
as modules (`python -m bench.speed --help`); bench/README.md keeps the numbers with their commands."""

from pathlib import Path


def describe(model, path: Path, compiled: bool = False) -> str:
    """File size and weight format of a loaded checkpoint, e.g. "1230 MiB, int4 weights"."""
    q = getattr(model, "quantization", None)
    w = f"int{q['bits']} weights" if q else str(next(model.parameters()).dtype).removeprefix("torch.")
    return f"{Path(path).stat().st_size / 2**20:.0f} MiB, {w}{', compiled step' if compiled else ''}"
