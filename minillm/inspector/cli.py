"""The inspector's command line: look inside a running model on one prompt.

    python -m minillm.inspector --model weights/shakespeare-char.safetensors --prompt "ROMEO:\\nWhat light" \\
        [--out DIR] [--json FILE] [--html FILE] [--top 5] [--no-attention] [--generate N --method sample|greedy|speculative|contrastive
        and sample.py's decoding flags: --temperature --top-k --top-p --min-p ... --seed, --draft --k --adaptive-k,
        --draft-lookup --lookup-ngram, --amateur --alpha --beta --objective --amateur-temperature --amateur-context]

Prints the prefill view (top predictions and surprisal per position, perplexity), the logit lens and
the attention heads' scores; with --generate N, a trace of N tokens decoded by --method (the same
tokens sample.py prints for the same flags and seed). --out writes the PNGs, --json everything,
--html the inspector's page with this run inline (one file that opens offline and steps through it).
The decoding flags and their defaults are sample.py's (minillm.cli): temperature 0.8 for sample and
speculative, 0 for greedy and contrastive; seed 1337. The draft / amateur must use the same tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..checkpoint import load_model
from ..cli import add_decoding_args, method_from_args, partner_path, unescape
from ..device import pick_device
from ..flags import Parser, add_input, add_output, add_threads, integer, progress_bar
from ..methods import Method, load_partner
from .analysis import Report, inspect_prompt
from .json_report import write_json
from .page import write_html
from .plots import png_jobs, write_pngs
from .tables import heads_table, lens_table, prefill_table, trace_text, trace_title
from .traces import record_trace
from .views import views_from_report


def make_parser() -> Parser:
    ap = Parser(prog="python -m minillm.inspector", description=__doc__)
    add_input(ap, "--model", required=True, help="checkpoint in our .safetensors format")
    ap.add_argument("--prompt", required=True, help="prompt text (\\n and \\t escapes are understood)")
    add_output(ap, "--out", folder=True,
               help="folder for the PNGs (logit lens, attention per layer, overview, head scores); made if missing")
    add_output(ap, "--json", help="write everything machine-readable to this file")
    add_output(ap, "--html", help="write the inspector's page with this run inline: one self-contained HTML file "
                                  "(opens offline; steps through the --generate trace)")
    ap.add_argument("--layers", default=None, metavar="all|L,L",
                    help="with --out, also one attention grid PNG per chosen layer: 'all' or e.g. 0,5,29 "
                         "(default: none; attn_overview.png shows every head of every layer)")
    ap.add_argument("--top", type=integer(1), default=5, help="predictions / alternatives shown per position (default 5)")
    ap.add_argument("--max-rows", type=integer(1), default=64,
                    help="longest table printed before rows are elided (default 64)")
    ap.add_argument("--lens-cols", type=integer(1), default=12, help="positions shown in the logit-lens table (default 12)")
    ap.add_argument("--no-attention", action="store_true", help="skip attention capture")
    ap.add_argument("--generate", type=integer(0), default=0, metavar="N", help="also trace N tokens decoded by --method")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default cpu)")
    add_decoding_args(ap)
    add_threads(ap)
    return ap


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Method]:
    ap = make_parser()
    args = ap.parse_args(argv)
    try:
        method = method_from_args(args)
    except ValueError as e:  # a flag combination that cannot work: a usage error
        ap.error(str(e))
    if args.layers and not args.out:
        ap.error("--layers chooses attention PNGs: it needs --out DIR")
    return args, method


def print_prompt_view(rep: Report, args) -> None:
    i = rep.info
    print(f"{args.model}: {i['family']}, {i['n_layer']} layers × {i['n_head']} heads, vocab {i['vocab_size']}, "
          f"context {i['block_size']}; prompt = {i['prompt_tokens']} tokens (the model ran its own attention, "
          f"attn_impl {i['attn_impl_model']!r}, untouched; the maps are recomputed on the written-out path)\n")
    print(prefill_table(rep, args.max_rows, args.top), end="\n\n")
    print(lens_table(rep, args.lens_cols), end="\n\n")
    print(heads_table(rep, args.max_rows), end="\n\n")


def trace_into(rep: Report, args, method: Method, loaded, partner) -> None:
    """Decode args.generate tokens by `method` with the trace hook; print the trace, keep it in rep."""
    record_trace(rep, method, loaded, args.generate, partner, args.seed, args.top)
    print(trace_title(method, partner_path(args), args.seed))
    print(trace_text(method.name, rep.trace, args.top))
    print(rep.trace_stats.summary(), end="\n\n")


def chosen_layers(spec: str | None, n_layer: int) -> list[int]:
    """--layers: none (None), "all", or comma-separated layer numbers, each in [0, n_layer)."""
    if not spec:
        return []
    if spec == "all":
        return list(range(n_layer))
    try:
        layers = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"--layers must be 'all' or comma-separated layer numbers, got {spec!r}") from None
    bad = [x for x in layers if not 0 <= x < n_layer]
    if bad:
        raise ValueError(f"--layers {bad[0]}: the model has layers 0 to {n_layer - 1}")
    return layers


def write_outputs(rep: Report, args, layers: list[int], method: Method) -> None:
    if args.out:
        with progress_bar(len(png_jobs(rep, args.out, layers)), f"PNGs to {args.out}") as bar:
            paths = write_pngs(rep, args.out, layers, progress=lambda p: bar.update(1))
        more = ", …" if len(paths) > 3 else ""
        print(f"wrote {len(paths)} PNGs to {os.path.join(args.out, '')} ({', '.join(p.name for p in paths[:3])}{more})")
    if args.json:
        print(f"wrote {write_json(rep, args.json)}")
    if args.html:
        print(f"wrote {write_html(views_from_report(rep, method, args.seed), args.html)}")


def main(argv: list[str] | None = None) -> Report:
    """Run the command; the Report is returned for tests and notebooks. Bad flags exit (argparse);
    a bad prompt or checkpoint is a ValueError / FileNotFoundError; an output path that cannot be
    written is refused while parsing (minillm.flags), before any work."""
    args, method = parse_args(argv)
    device = pick_device(args.device)
    loaded = load_model(args.model, device=device)
    layers = chosen_layers(args.layers, loaded.config.n_layer)  # a bad --layers is refused before any work
    tracing = args.generate > 0
    partner = load_partner(partner_path(args), method.partner, loaded, device) if tracing and method.partner else None
    prompt = unescape(args.prompt)
    rep = inspect_prompt(loaded.model, loaded.tokenizer, prompt, top=args.top, attention=not args.no_attention)
    rep.info["model_path"] = str(args.model)
    rep.info["prompt"] = prompt
    print_prompt_view(rep, args)
    if tracing:
        trace_into(rep, args, method, loaded, partner)
    write_outputs(rep, args, layers, method)
    return rep


def run(argv: list[str] | None = None) -> None:
    """`python -m minillm.inspector`: a bad prompt, checkpoint or output path is one line and exit
    status 2 (argparse's for bad flags), not a traceback."""
    try:
        main(argv)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
