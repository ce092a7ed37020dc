"""Where greedy speculative output parts from plain greedy output, and how close the target's top two
logits are there.

Speculative decoding at temperature 0 returns the target's greedy tokens exactly when the target's
logits for a position are the same whether it reads that position in a verify call of k+1 rows or
in a one-row decode step. In float32 that held in every run of bench/speculative.py here; in bf16
(and the int4 kernel's bf16 activations) the two calls round differently, and where the top two
logits lie within a rounding step of each other the argmax can flip. For each prompt this prints
"identical", or the first differing token and the top-2 logits there from an uncached forward of the
whole sequence (a third way to compute the same logits, rounding differently again).

    python bench/spec_exactness.py --target weights/qwen2.5-coder-1.5b-bf16.safetensors \\
        --draft weights/qwen2.5-coder-0.5b-int4.safetensors --prompt-set code --prompts 5 --k 4
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
from speculative import PROMPT_SETS
from minillm.checkpoint import load_model
from minillm.methods import Method, load_partner, stream
from minillm.sampling import SamplingParams
from minillm.speed import speed_up


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompt-set", choices=list(PROMPT_SETS), default="article")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target_l = load_model(args.target)
    target, draft = speed_up(target_l.model), speed_up(load_partner(args.draft, "draft", target_l).model)
    tok, greedy, n = target_l.tokenizer, SamplingParams(temperature=0), args.max_new_tokens
    for prompt in PROMPT_SETS[args.prompt_set][:args.prompts]:
        ids = tok.encode(prompt)
        plain = list(stream(Method("greedy", greedy), target, ids, n))
        spec = list(stream(Method("speculative", greedy, k=args.k), target, ids, n, draft))
        if plain == spec:
            print(f"{prompt!r}: identical ({n} tokens)")
            continue
        i = next(i for i in range(n) if plain[i] != spec[i])
        with torch.inference_mode():
            top = target(torch.tensor([ids + plain[:i]]))[0, -1].float().topk(2)
        print(f"{prompt!r}: parts at new token {i}: plain {tok.decode([plain[i]])!r}, speculative "
              f"{tok.decode([spec[i]])!r}; uncached forward's top-2 logits {top.values.tolist()} "
              f"({[tok.decode([t]) for t in top.indices.tolist()]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
