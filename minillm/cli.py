"""Command-line pieces shared by sample.py and `python -m minillm.inspector`: the decoding flags are
declared here once, and turned into a methods.Method (flag combinations that cannot work are
ValueErrors that name the flags)."""

from __future__ import annotations

import argparse

from .flags import add_input, integer, real
from .methods import MAX_K, MAX_LOOKUP_NGRAM, METHODS, PARTNER, Method, with_temperature
from .sampling import SamplingParams


def unescape(s: str) -> str:
    """\\n and \\t typed on a command line become a newline and a tab."""
    return s.replace("\\n", "\n").replace("\\t", "\t")


def add_batch_invariant(p: argparse.ArgumentParser) -> None:
    """--batch-invariant ROWS: the exact mode of the speed layer (speed.batch_invariant) for the model."""
    p.add_argument("--batch-invariant", type=integer(1, MAX_K + 1), default=None, metavar="ROWS",
                   help="the model computes every matmul in blocks of ROWS rows and attention one query row at a time, "
                        "so a token's logits do not depend on how many tokens share a call: greedy speculative "
                        "output is then the model's own greedy output bit for bit, in bf16 and int4 too (give the "
                        "plain run the same ROWS; ROWS = --k + 1 verifies in one block). Its cost, where a matmul or "
                        "attention does not run on our kernels (minillm/kernels): attention one query a call, and a "
                        "one-token step that costs a ROWS-row call")


def check_batch_invariant(args: argparse.Namespace) -> None:
    """--batch-invariant is a mode of the speed layer's eager route: refused with --compile and --reference."""
    if args.batch_invariant and getattr(args, "compile", False):
        raise ValueError("--batch-invariant and --compile do not go together: a compiled one-token step rounds "
                         "differently from the eager verification")
    if args.batch_invariant and args.reference:
        raise ValueError("--batch-invariant and --reference do not go together: --batch-invariant is a mode of the "
                         "speed layer")


def add_decoding_args(p: argparse.ArgumentParser, method: str = "sample") -> None:
    """--method (default `method`), the sampler, speculative and contrastive flags, and --seed."""
    p.add_argument("--method", choices=METHODS, default=method, help=f"decoding method (default: {method})")
    p.add_argument("--seed", type=integer(0), default=1337, help="same seed, same text (default 1337)")
    s = p.add_argument_group("sampler (in the order applied; defaults are off)")
    s.add_argument("--repetition-penalty", type=real(0, low_open=True), default=1.0,
                   help="> 1 discourages tokens already in the prompt or output (CTRL; default 1 = off)")
    s.add_argument("--presence-penalty", type=real(), default=0.0, help="subtract once from seen tokens' logits (default 0)")
    s.add_argument("--frequency-penalty", type=real(), default=0.0, help="subtract per occurrence (default 0)")
    s.add_argument("--no-repeat-ngram-size", type=integer(0), default=0, help="never repeat an n-gram of this size (default 0 = off)")
    s.add_argument("--temperature", type=real(0), default=None,
                   help="0 = greedy (default: 0.8 for sample and speculative, 0 for greedy and contrastive)")
    s.add_argument("--top-k", type=integer(1), default=None, help="keep the k most likely tokens (default: off)")
    s.add_argument("--top-p", type=real(0, 1, low_open=True), default=None, help="nucleus sampling threshold in (0, 1] (default: off)")
    s.add_argument("--min-p", type=real(0, 1), default=None, help="keep tokens with p >= min_p * max p, in [0, 1] (default: off)")
    s.add_argument("--typical-p", type=real(0, 1, low_open=True), default=None, help="locally typical sampling mass in (0, 1] (default: off)")
    sp = p.add_argument_group("speculative decoding (--method speculative)")
    add_input(sp, "--draft", default=None, metavar="PATH", help="draft checkpoint (same tokenizer as --model)")
    sp.add_argument("--draft-lookup", action="store_true",
                    help="no draft model: prompt lookup proposes the tokens that followed the latest earlier "
                         "occurrence of the text's last n tokens (prompt and output; n = --lookup-ngram down to 1), "
                         "none where there is none; as exact as a draft model")
    sp.add_argument("--lookup-ngram", type=integer(1, MAX_LOOKUP_NGRAM), default=3, metavar="N",
                    help=f"--draft-lookup: the longest n-gram matched, in 1..{MAX_LOOKUP_NGRAM} (default 3)")
    sp.add_argument("--k", type=integer(1, MAX_K), default=4,
                    help=f"draft tokens proposed per target forward, in 1..{MAX_K} (default 4)")
    sp.add_argument("--adaptive-k", action="store_true",
                    help="adapt k as it goes: +2 after a step where all drafts passed, else -1 (floor 1); stays exact")
    cd = p.add_argument_group("contrastive decoding (--method contrastive)")
    add_input(cd, "--amateur", default=None, metavar="PATH", help="amateur checkpoint (same tokenizer as --model)")
    cd.add_argument("--alpha", type=real(0, 1, low_open=True), default=0.1, help="plausibility: only tokens with p >= alpha * max p (default 0.1)")
    cd.add_argument("--beta", type=real(0), default=0.5, help="strength of the contrast, O'Brien & Lewis (default 0.5)")
    cd.add_argument("--objective", choices=("obrien", "li"), default="obrien",
                    help="obrien: (1+beta) z_model - beta z_amateur; li: log p_model - log p_amateur / amateur-temperature "
                         "(default obrien)")
    cd.add_argument("--amateur-temperature", type=real(0, low_open=True), default=1.0, help="Li's tau (objective li; default 1)")
    cd.add_argument("--amateur-context", choices=("full", "last_prompt_token"), default="full",
                    help="what the amateur reads of the prompt (default full; Li et al.: last_prompt_token)")


def check_decoding_args(args) -> None:
    """Flag combinations that cannot work, as ValueErrors that name the flags."""
    if args.draft_lookup and args.method != "speculative":
        raise ValueError(f"--draft-lookup is used only by --method speculative (got --method {args.method})")
    if args.draft_lookup and args.draft:
        raise ValueError("--draft-lookup proposes without a draft model: give --draft PATH or --draft-lookup, not both")
    for name, role in PARTNER.items():
        if args.method == name and not getattr(args, role) and not (role == "draft" and args.draft_lookup):
            lookup = " or --draft-lookup" if role == "draft" else ""
            raise ValueError(f"--method {name} needs --{role} PATH (a smaller model with the same tokenizer){lookup}")
        if getattr(args, role) and args.method != name:
            raise ValueError(f"--{role} is used only by --method {name} (got --method {args.method})")
    if args.adaptive_k and args.method != "speculative":
        raise ValueError(f"--adaptive-k is used only by --method speculative (got --method {args.method})")
    if args.method == "greedy" and args.temperature not in (None, 0):
        raise ValueError(f"--method greedy means temperature 0; got --temperature {args.temperature}")


def partner_path(args) -> str | None:
    """The --draft or --amateur path the chosen method needs (None for sample / greedy and --draft-lookup)."""
    role = PARTNER.get(args.method)
    return getattr(args, role) if role else None


def method_from_args(args, sliding_window: bool = False) -> Method:
    check_decoding_args(args)
    params = SamplingParams(0.0, args.top_k, args.top_p, min_p=args.min_p, typical_p=args.typical_p,
                            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size)
    return Method(args.method, with_temperature(args.method, params, args.temperature), sliding_window, args.k,
                  args.adaptive_k, args.alpha, args.beta, args.objective, args.amateur_temperature, args.amateur_context,
                  draft_lookup=args.draft_lookup, lookup_ngram=args.lookup_ngram)
