"""Sample text from a minillm checkpoint, streaming tokens as they are decided.

    python sample.py --model weights/shakespeare-char.safetensors --prompt "ROMEO:"
    python sample.py --model M --method greedy                               # argmax (= --temperature 0)
    python sample.py --model M --top-k 50 --top-p 0.9 --seed 7 --num-samples 3
    python sample.py --model M --min-p 0.05 --repetition-penalty 1.2 --stop "\\n\\n"
    python sample.py --model M --method speculative --draft D --k 4          # exact target samples, faster
    python sample.py --model M --method speculative --draft-lookup --k 8     # no draft model: prompt lookup
    python sample.py --model M --method contrastive --amateur A --alpha 0.1 --beta 0.5
    python sample.py --model weights/smollm2-135m.safetensors --chat         # multi-turn, one line per turn

Methods: "sample" (default; temperature 0.8), "greedy" (temperature 0), "speculative" (--draft: a
smaller model with the same tokenizer proposes --k tokens, the model checks them in one forward;
the output is distributed exactly as plain sampling with the same flags; temperature 0.8 unless
given; --draft-lookup instead of --draft: prompt lookup proposes, copying what followed an earlier
match of the text's last tokens), "contrastive" (--amateur: choose tokens the model likes much more than the amateur does,
score (1+beta)·z_model - beta·z_amateur over the tokens with p >= alpha·max p; greedy unless
--temperature is given). Sampler flags apply in transformers' order: repetition, presence and
frequency penalties, no-repeat n-grams, temperature, top-k, top-p, min-p, typical-p.

Uses the KV cache (the prompt is read once, then one token per step); stops at the tokenizer's
end-of-sequence token when it has one, and at any --stop string (cut from the output); prints
speed and the method's statistics to stderr.
"""

import argparse
import os
import sys

import torch

from minillm.chat import ChatSession
from minillm.checkpoint import load_model
from minillm.cli import add_batch_invariant, add_decoding_args, check_batch_invariant, method_from_args, partner_path, unescape
from minillm.device import pick_device
from minillm.flags import Parser, add_input, add_threads, integer
from minillm.generate import StopScanner, decode_stream, make_generator
from minillm.methods import load_partner, stream
from minillm.speed import batch_invariant, compile_decode, speed_layer, warm_up

DEFAULT_NEW_TOKENS = 500
DEFAULT_MODEL = "weights/shakespeare-char.safetensors"  # what `python train.py` writes


def make_parser() -> Parser:
    p = Parser(description=__doc__)
    add_input(p, "--model", default=DEFAULT_MODEL, help=f"checkpoint in our format (default: {DEFAULT_MODEL}, "
              "made by python train.py; a GGUF or Hugging Face model: python -m minillm.convert first)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=integer(0), default=None,
                   help="tokens to generate (default 500; speculative and contrastive: at most what fits the context)")
    p.add_argument("--num-samples", type=integer(1), default=1, help="texts to generate, seeds --seed, --seed + 1, ... (default 1)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable; \\n and \\t are understood)")
    add_decoding_args(p)
    p.add_argument("--sliding-window", action=argparse.BooleanOptionalAction, default=True,
                   help="sample/greedy only: past the context, keep going by re-reading its last half (default: on; "
                        "--no-sliding-window makes running out of context an error)")
    p.add_argument("--chat", action="store_true",
                   help="chat with the checkpoint's chat template: --prompt (if given) is the first user turn, "
                        "then each line of standard input; the KV cache is reused across turns")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: as stored")
    p.add_argument("--compile", action="store_true",
                   help="run one-token decode steps (and the draft's, amateur's) through torch.compile, compiled "
                        "before the prompt is read (20-70 s for SmolLM2 on 2 CPU cores); pays only for long runs: "
                        "see README, 'One call a step, and when --compile pays'. Without it too, a LLaMA-family "
                        "model on our kernels (CPUs with AVX-512 VNNI; int4, bf16 or float32 layers) runs its steps "
                        "as one C++ call through every block (speed.OneCallStep): --compile compiles nothing for it")
    p.add_argument("--reference", action="store_true",
                   help="run model.py as written, without the speed layer (minillm/speed.py; same numbers)")
    add_batch_invariant(p)
    add_threads(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def check_args(args) -> None:
    """Flags of this command that cannot work together, as ValueErrors that name the flags."""
    if args.chat and args.method not in ("sample", "greedy"):
        raise ValueError(f"--chat works with --method sample or greedy, not {args.method}")
    if args.chat and args.stop:
        raise ValueError("--stop is not supported with --chat (a reply ends at the end-of-turn token)")
    check_batch_invariant(args)
    if args.model == DEFAULT_MODEL and not os.path.exists(DEFAULT_MODEL):
        raise FileNotFoundError(f"checkpoint not found: {DEFAULT_MODEL} (the default --model): make it with "
                                "`python train.py` (a few minutes on a CPU), or pass --model PATH")


def load(args, method, device):
    """The model and, for speculative / contrastive, its partner, with the speed layer unless --reference."""
    dtype = getattr(torch, args.dtype) if args.dtype else None
    loaded = load_model(args.model, device, dtype)
    partner = load_partner(partner_path(args), method.partner, loaded, device, dtype) if method.partner else None
    for path, m in ((args.model, loaded), (partner_path(args), partner)):
        if m is None:
            continue
        if not args.reference:
            speed_layer(m.model, graph=args.compile)
        elif args.compile:
            compile_decode(m.model)
        if args.compile:
            print(f"compiling the one-token step of {path} (torch.compile)...", end="", file=sys.stderr, flush=True)
            print(f" {warm_up(m.model):.1f} s", file=sys.stderr)
    if args.batch_invariant:  # the target's (check_args refuses it with --compile and --reference)
        batch_invariant(loaded.model, args.batch_invariant)
    return loaded, partner


def default_max_new_tokens(args, method, prompt_ids, loaded, partner) -> int:
    """500, or for a method without a sliding window as many as fit the smaller context after the prompt."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    if method.name in ("sample", "greedy") and method.sliding_window:
        return DEFAULT_NEW_TOKENS
    context = min(m.config.block_size for m in (loaded, partner) if m is not None)
    return max(0, min(DEFAULT_NEW_TOKENS, context - len(prompt_ids) + 1))


def generate_samples(args, method, loaded, partner, device) -> None:
    tok = loaded.tokenizer
    stops = [unescape(s) for s in args.stop]
    prompt_ids = tok.encode(args.prompt)
    n = default_max_new_tokens(args, method, prompt_ids, loaded, partner)
    for i in range(args.num_samples):
        stats = method.new_stats()
        tokens = stream(method, loaded.model, prompt_ids, n, partner and partner.model,
                        make_generator(args.seed + i, device), set(tok.eos_ids), stats)
        pieces = decode_stream(tok, tokens, stops, stats)
        first = next(pieces, "")  # a setting the decoder refuses is an error before the prompt is echoed
        sys.stdout.write(args.prompt + first)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        print(stats.summary(), file=sys.stderr)
        if i + 1 < args.num_samples:
            print("---------------")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        method = method_from_args(args, args.sliding_window)
        StopScanner([unescape(s) for s in args.stop])  # rejects empty stop strings before any loading
        device = pick_device(args.device)
        loaded, partner = load(args, method, device)
        if args.chat:
            return chat(loaded, args, method.params)
        generate_samples(args, method, loaded, partner, device)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141
    return 0


def chat(loaded, args, params) -> int:
    session = ChatSession(loaded.model, loaded.tokenizer, args.system, params, args.seed,
                          args.max_new_tokens if args.max_new_tokens is not None else DEFAULT_NEW_TOKENS)
    first = [args.prompt] if args.prompt != "\n" else []
    interactive = sys.stdin.isatty()
    lines = iter(first)
    while True:
        user = next(lines, None)
        if user is None:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            user = sys.stdin.readline()
            if not user:
                return 0
            user = user.rstrip("\n")
            if not user.strip():
                continue
        if not interactive:
            print(f"> {user}")
        for piece in session.reply(user):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        print(session.last_stats.summary(), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
