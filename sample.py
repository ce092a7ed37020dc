"""Sample text from a minillm checkpoint, streaming tokens as they are decided.

    python sample.py --model weights/shakespeare-char.safetensors --prompt "ROMEO:"
    python sample.py --model M --method greedy                               # argmax (= --temperature 0)
    python sample.py --model M --top-k 50 --top-p 0.9 --seed 7 --num-samples 3
    python sample.py --model M --min-p 0.05 --repetition-penalty 1.2 --stop "\\n\\n"
    python sample.py --model M --method speculative --draft D --k 4          # exact target samples, faster
    python sample.py --model M --method contrastive --amateur A --alpha 0.1 --beta 0.5
    python sample.py --model weights/smollm2-135m.safetensors --chat         # multi-turn, one line per turn

Methods: "sample" (default; temperature 0.8), "greedy" (temperature 0), "speculative" (--draft: a
smaller model with the same tokenizer proposes --k tokens, the model checks them in one forward;
the output is distributed exactly as plain sampling with the same flags; temperature 0.8 unless
given), "contrastive" (--amateur: choose tokens the model likes much more than the amateur does,
score (1+beta)·z_model - beta·z_amateur over the tokens with p >= alpha·max p; greedy unless
--temperature is given). Sampler flags apply in transformers' order: repetition, presence and
frequency penalties, no-repeat n-grams, temperature, top-k, top-p, min-p, typical-p.

Uses the KV cache (the prompt is read once, then one token per step); stops at the tokenizer's
end-of-sequence token when it has one, and at any --stop string (cut from the output); prints
speed and the method's statistics to stderr.
"""

import argparse
import sys

import torch

from minillm.chat import ChatSession
from minillm.checkpoint import load_model
from minillm.generate import GenStats, StopScanner, decode_stream, make_generator, stream_tokens
from minillm.sampling import SamplingParams
from minillm.trainer import pick_device

METHODS = ("sample", "greedy", "speculative", "contrastive")
DEFAULT_TEMPERATURE = {"sample": 0.8, "greedy": 0.0, "speculative": 0.8, "contrastive": 0.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="weights/shakespeare-char.safetensors", help="checkpoint in our format")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--method", choices=METHODS, default="sample", help="decoding method (default: sample)")
    p.add_argument("--seed", type=int, default=1337, help="same seed, same text")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable; \\n and \\t are understood)")
    s = p.add_argument_group("sampler (in the order applied; defaults are off)")
    s.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already in the prompt or output (CTRL; default 1 = off)")
    s.add_argument("--presence-penalty", type=float, default=0.0, help="subtract once from seen tokens' logits (default 0)")
    s.add_argument("--frequency-penalty", type=float, default=0.0, help="subtract per occurrence (default 0)")
    s.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this size (default 0 = off)")
    s.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: 0.8 for sample and speculative, 0 for greedy and contrastive)")
    s.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: off)")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (default: off)")
    s.add_argument("--min-p", type=float, default=None, help="keep tokens with p >= min_p * max p, in [0, 1] (default: off)")
    s.add_argument("--typical-p", type=float, default=None, help="locally typical sampling mass in (0, 1] (default: off)")
    sp = p.add_argument_group("speculative decoding (--method speculative)")
    sp.add_argument("--draft", default=None, metavar="PATH", help="draft checkpoint (same tokenizer as --model)")
    sp.add_argument("--k", type=int, default=4, help="draft tokens proposed per target forward (default 4)")
    sp.add_argument("--adaptive-k", action="store_true",
                    help="adapt k as it goes: +2 after a step where all drafts passed, else -1 (floor 1); stays exact")
    cd = p.add_argument_group("contrastive decoding (--method contrastive)")
    cd.add_argument("--amateur", default=None, metavar="PATH", help="amateur checkpoint (same tokenizer as --model)")
    cd.add_argument("--alpha", type=float, default=0.1, help="plausibility: only tokens with p >= alpha * max p (default 0.1)")
    cd.add_argument("--beta", type=float, default=0.5, help="strength of the contrast, O'Brien & Lewis (default 0.5)")
    cd.add_argument("--objective", choices=("obrien", "li"), default="obrien",
                    help="obrien: (1+beta) z_model - beta z_amateur; li: log p_model - log p_amateur / amateur-temperature")
    cd.add_argument("--amateur-temperature", type=float, default=1.0, help="Li's tau (objective li; default 1)")
    cd.add_argument("--amateur-context", choices=("full", "last_prompt_token"), default="full",
                    help="what the amateur reads of the prompt (default full; Li et al.: last_prompt_token)")
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
                   help="run one-token decode steps (and the draft's, amateur's) through torch.compile: the first "
                        "token waits for the compile (a minute or more on a small CPU), later ones are faster")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Flag combinations that cannot work, as ValueErrors that name the flags."""
    if args.method == "speculative" and not args.draft:
        raise ValueError("--method speculative needs --draft PATH (a smaller model with the same tokenizer)")
    if args.method == "contrastive" and not args.amateur:
        raise ValueError("--method contrastive needs --amateur PATH (a smaller model with the same tokenizer)")
    if args.adaptive_k and args.method != "speculative":
        raise ValueError(f"--adaptive-k is used only by --method speculative (got --method {args.method})")
    if args.draft and args.method != "speculative":
        raise ValueError(f"--draft is used only by --method speculative (got --method {args.method})")
    if args.amateur and args.method != "contrastive":
        raise ValueError(f"--amateur is used only by --method contrastive (got --method {args.method})")
    if args.method == "greedy" and args.temperature not in (None, 0):
        raise ValueError(f"--method greedy means temperature 0; got --temperature {args.temperature}")
    if args.chat and args.method not in ("sample", "greedy"):
        raise ValueError(f"--chat works with --method sample or greedy, not {args.method}")
    if args.chat and args.stop:
        raise ValueError("--stop is not supported with --chat (a reply ends at the end-of-turn token)")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")


def sampling_params(args) -> SamplingParams:
    t = DEFAULT_TEMPERATURE[args.method] if args.temperature is None else args.temperature
    return SamplingParams(t, args.top_k, args.top_p, min_p=args.min_p, typical_p=args.typical_p,
                          repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size)


def tokenizer_identity(tok) -> dict:
    """What decides token ids (a chat template or a name may differ between two copies of one vocabulary)."""
    return {k: v for k, v in tok.to_dict().items() if k not in ("chat_template", "name")}


def load_partner(path: str, role: str, main, device, dtype):
    other = load_model(path, device, dtype)
    if tokenizer_identity(other.tokenizer) != tokenizer_identity(main.tokenizer):
        raise ValueError(f"the {role} {path} has a different tokenizer from --model: both must map text to the "
                         f"same token ids ({role} vocab {other.tokenizer.vocab_size}, model vocab {main.tokenizer.vocab_size})")
    return other


def unescape(s: str) -> str:
    return s.replace("\\n", "\n").replace("\\t", "\t")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        params = sampling_params(args)
        stops = [unescape(s) for s in args.stop]
        StopScanner(stops)  # rejects empty stop strings before any loading
        device = pick_device(args.device)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        loaded = load_model(args.model, device, dtype)
        partner = None
        if args.method in ("speculative", "contrastive"):
            role = "draft" if args.method == "speculative" else "amateur"
            partner = load_partner(args.draft or args.amateur, role, loaded, device, dtype)
        if args.compile:
            for m in (loaded, partner):
                if m is not None:
                    m.model.compile_decode()
        if args.chat:
            return chat(loaded, args, params)
        tok = loaded.tokenizer
        prompt_ids = tok.encode(args.prompt)
        for i in range(args.num_samples):
            tokens, stats = token_stream(args, loaded, partner, prompt_ids, params, make_generator(args.seed + i, device))
            sys.stdout.write(args.prompt)
            for piece in decode_stream(tok, tokens, stops, stats):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            print_stats(args.method, stats)
            if i + 1 < args.num_samples:
                print("---------------")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def token_stream(args, loaded, partner, prompt_ids, params, generator):
    """(iterator of token ids, its stats object) for the chosen method."""
    eos = set(loaded.tokenizer.eos_ids)
    if args.method == "speculative":
        from minillm.speculative import SpecStats, speculative_stream
        stats = SpecStats()
        extra = {"adaptive_k": True} if args.adaptive_k else {}
        return speculative_stream(loaded.model, partner.model, prompt_ids, args.max_new_tokens, args.k, params,
                                  generator, eos, stats, **extra), stats
    if args.method == "contrastive":
        from minillm.contrastive import CDStats, contrastive_stream
        stats = CDStats()
        return contrastive_stream(loaded.model, partner.model, prompt_ids, args.max_new_tokens, args.alpha, args.beta,
                                  args.objective, args.amateur_temperature, args.amateur_context, params, generator,
                                  eos, stats), stats
    stats = GenStats()
    return stream_tokens(loaded.model, prompt_ids, args.max_new_tokens, params, generator, eos,
                         args.sliding_window, stats), stats


def print_stats(method: str, st) -> None:
    err = sys.stderr
    if method == "speculative":
        calls = sum(st.accept_hist)
        probs = ", ".join(f"{c / calls:.3f}" if calls else "nan" for c in st.accept_hist)
        print(f"[{st.new_tokens} tokens in {st.total_s:.2f} s, {st.tokens_per_s:.1f} tokens/s, stopped by {st.stopped_by}]", file=err)
        print(f"acceptance histogram (target calls with 0..{len(st.accept_hist) - 1} drafts accepted): {st.accept_hist}", file=err)
        print(f"acceptance probs: [{probs}]", file=err)
        proposed = f", {st.mean_k:.2f} proposed on average" if hasattr(st, "mean_k") else ""  # adaptive or clamped k
        print(f"mean accepted: {st.mean_accepted:.2f} drafts per target call (k={st.k}{proposed}; acceptance rate "
              f"{st.acceptance_rate:.3f}); {st.tokens_per_target_call:.2f} tokens per target call", file=err)
        if hasattr(st, "empirical_alpha"):
            print(f"alpha (1 - mean total variation between p_target and q_draft): {st.empirical_alpha:.3f}", file=err)
        print(f"target: {st.target_calls} calls, {st.target_s:.3f} s | draft: {st.draft_calls} calls, {st.draft_s:.3f} s",
              file=err)
    elif method == "contrastive":
        print(f"[{st.new_tokens} tokens, stopped by {st.stopped_by}] {st.summary()}", file=err)
    else:
        print(f"[{st.new_tokens} tokens, first after {st.prefill_s * 1000:.0f} ms, "
              f"{st.tokens_per_s:.1f} tokens/s, stopped by {st.stopped_by}]", file=err)


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
