"""Sample text from a minillm checkpoint, streaming tokens as they are decided.

    python sample.py --model weights/shakespeare-char.safetensors --prompt "ROMEO:"
    python sample.py --model weights/shakespeare-char.safetensors --temperature 0   # greedy
    python sample.py --model M --top-k 50 --top-p 0.9 --seed 7 --num-samples 3
    python sample.py --model weights/smollm2-135m.safetensors --chat       # multi-turn, one line per turn

Uses the KV cache (the prompt is read once, then one token per step); stops at the tokenizer's
end-of-sequence token when it has one; prints decode speed to stderr.
"""

import argparse
import sys

import torch

from minillm.chat import ChatSession
from minillm.checkpoint import load_model
from minillm.generate import GenStats, stream_text
from minillm.sampling import SamplingParams
from minillm.trainer import pick_device


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="weights/shakespeare-char.safetensors", help="checkpoint in our format")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=1337, help="same seed, same text")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--sliding-window", action=argparse.BooleanOptionalAction, default=True,
                   help="past the context, keep going by re-reading its last half (default: on; "
                        "--no-sliding-window makes running out of context an error)")
    p.add_argument("--chat", action="store_true",
                   help="chat with the checkpoint's chat template: --prompt (if given) is the first user turn, "
                        "then each line of standard input; the KV cache is reused across turns")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: as stored")
    args = p.parse_args(argv)
    try:
        params = SamplingParams(args.temperature, args.top_k, args.top_p)
        loaded = load_model(args.model, pick_device(args.device), getattr(torch, args.dtype) if args.dtype else None)
        if args.chat:
            return chat(loaded, args, params)
        for i in range(args.num_samples):
            stats = GenStats()
            sys.stdout.write(args.prompt)
            for piece in stream_text(loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens, params,
                                     seed=args.seed + i, sliding_window=args.sliding_window, stats=stats):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            print(f"[{stats.new_tokens} tokens, first after {stats.prefill_s * 1000:.0f} ms, "
                  f"{stats.tokens_per_s:.1f} tokens/s, stopped by {stats.stopped_by}]", file=sys.stderr)
            if i + 1 < args.num_samples:
                print("---------------")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def chat(loaded, args, params) -> int:
    session = ChatSession(loaded.model, loaded.tokenizer, args.system, params, args.seed, args.max_new_tokens)
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
        st = session.last_stats
        sys.stdout.write("\n")
        print(f"[{st.prompt_tokens} new prompt tokens read, {st.new_tokens} generated, {st.tokens_per_s:.1f} tokens/s, "
              f"stopped by {st.stopped_by}]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
