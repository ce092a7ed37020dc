"""The minillm functions the inspector's page cites, and their source read from the installed modules.

Each panel of the page names the function that computed what it shows (CITED), so a reader can go
from a picture to the line of code behind it. `source_of(name)` reads that function's source with
inspect.getsource; only the names in CITED are served (the allow-list), so a server never reads an
arbitrary object or file on request.
"""

from __future__ import annotations

import importlib
import inspect
import textwrap
from pathlib import Path

# panel -> the qualified names of the functions behind it, the one that computed it first
CITED: dict[str, tuple[str, ...]] = {
    "prefill": ("minillm.inspector.analysis.prefill_view", "minillm.inspector.analysis.inspect_prompt"),
    "lens": ("minillm.inspector.analysis.logit_lens", "minillm.inspector.analysis.lens_logits"),
    "attention": ("minillm.inspector.capture.attention_probs", "minillm.inspector.capture.Capture"),
    "heads": ("minillm.inspector.analysis.head_scores",),
    "sample": ("minillm.sampling.choose", "minillm.sampling.process_logits", "minillm.generate.stream_tokens"),
    "greedy": ("minillm.sampling.choose", "minillm.sampling.process_logits", "minillm.generate.stream_tokens"),
    "speculative": ("minillm.speculative.SpeculativeDecoder.step", "minillm.speculative.residual",
                    "minillm.speculative.ModelDraft.propose", "minillm.speculative.SpeculativeDecoder._verify",
                    "minillm.speculative.PromptLookup.propose", "minillm.speculative.lookup"),
    "contrastive": ("minillm.contrastive.contrastive_scores", "minillm.contrastive.plausible_head",
                    "minillm.contrastive.contrastive_stream"),
    "trace": ("minillm.inspector.traces.trace_decoding", "minillm.methods.stream"),
}
ALLOWED = frozenset(name for names in CITED.values() for name in names)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the minillm package


def resolve(name: str):
    """A dotted name -> the object: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module in {name!r}")


def source_of(name: str) -> dict:
    """{"name", "file" (relative to the package's folder), "line", "source"} of a cited function;
    KeyError for a name outside the allow-list."""
    if name not in ALLOWED:
        raise KeyError(f"{name!r} is not a function the page cites (one of {len(ALLOWED)} names)")
    obj = inspect.unwrap(resolve(name))
    lines, first = inspect.getsourcelines(obj)
    path = Path(inspect.getsourcefile(obj)).resolve()
    shown = path.relative_to(PACKAGE_ROOT) if path.is_relative_to(PACKAGE_ROOT) else Path(path.name)
    return {"name": name, "file": shown.as_posix(), "line": first, "source": textwrap.dedent("".join(lines))}


def all_sources(names=None) -> dict[str, dict]:
    """source_of for every name (default: the whole allow-list), for the static page to embed."""
    return {n: source_of(n) for n in sorted(names or ALLOWED)}
