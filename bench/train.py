"""Training throughput of our baby model vs the same-shape Hugging Face GPT2LMHeadModel (CPU).

Measured: one optimizer step = forward + cross-entropy + backward + clip_grad_norm 1.0 + AdamW
(lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on 2-D weights only), batch 12 x 64 tokens of
tinyshakespeare characters (vocab 65). Every model gets the same batches, in the same order.
How: after a warm-up, the models take turns in one process, `--steps` steps each per round, for
`--rounds` rounds, so machine drift hits all of them alike. Reported: median ms/step over all
timed steps, tokens/s from it, and ours/theirs = median over rounds of (their ms / our ms) in that
round, vs the hf-sdpa row (> 1: we are faster). Before timing, HF gets a copy of our weights and
the max |logit difference| is printed: the shapes (and the maths) really are the same.

    python -m bench.train                       # ours, hf-sdpa, hf-eager
    python -m bench.train --rows ours,ours-llama,hf-sdpa --rounds 3 --steps 30
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from minillm.config import preset
from minillm.data import resolve_text_path
from minillm.model import Transformer

ROWS = ("ours", "ours-manual", "ours-llama", "hf-sdpa", "hf-eager")


def make_model(row):
    if row.startswith("ours"):
        family = "llama" if row == "ours-llama" else "gpt2"
        attn = "manual" if row == "ours-manual" else "sdpa"
        return Transformer(preset("baby", family=family, vocab_size=65, dropout=0.0, attn_impl=attn))
    cfg = GPT2Config(n_layer=4, n_head=4, n_embd=128, n_positions=64, vocab_size=65,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = row.removeprefix("hf-")  # what from_pretrained(attn_implementation=...) sets
    return GPT2LMHeadModel(cfg)


def logits_of(model, x):
    return model(x) if isinstance(model, Transformer) else model(input_ids=x).logits


def copy_ours_into_hf(ours, hf):
    """HF GPT-2 keeps its linears as Conv1D, weight (in, out): transpose ours; q, k, v are fused."""
    sd = ours.state_dict()
    new = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["norm.weight"], "transformer.ln_f.bias": sd["norm.bias"]}
    for i in range(ours.config.n_layer):
        o, h = f"blocks.{i}.", f"transformer.h.{i}."
        qkv = [o + f"attn.{n}_proj" for n in "qkv"]
        new[h + "attn.c_attn.weight"] = torch.cat([sd[n + ".weight"] for n in qkv]).T
        new[h + "attn.c_attn.bias"] = torch.cat([sd[n + ".bias"] for n in qkv])
        for ours_name, hf_name in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            for s in ("weight", "bias"):
                new[h + f"{hf_name}.{s}"] = sd[o + f"{ours_name}.{s}"]
        for ours_name, hf_name in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
            new[h + hf_name + ".weight"] = sd[o + ours_name + ".weight"].T
            new[h + hf_name + ".bias"] = sd[o + ours_name + ".bias"]
    new["lm_head.weight"] = new["transformer.wte.weight"]
    hf.load_state_dict({k: v.clone() for k, v in new.items()}, strict=True)


def make_optimizer(model):
    """As minillm.trainer.make_optimizer: decay on 2-D weights only (tied matrix counted once)."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))


def train_step(model, opt, x, y):
    logits = logits_of(model, x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="ours,hf-sdpa,hf-eager", help=f"comma list from {ROWS}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per model per round")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of our step")
    ap.add_argument("--out", default="bench/out/train.png")
    args = ap.parse_args()
    rows = args.rows.split(",")
    assert all(r in ROWS for r in rows), f"--rows must come from {ROWS}"

    torch.manual_seed(0)
    text = resolve_text_path().read_text()  # tinyshakespeare: local copy, cache or download
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([stoi[c] for c in text])
    gen = torch.Generator().manual_seed(1337)
    n_batches = args.warmup + args.rounds * args.steps
    starts = torch.randint(len(ids) - 65, (n_batches, args.batch), generator=gen)
    batches = [(ids[s[:, None] + torch.arange(64)], ids[s[:, None] + torch.arange(1, 65)]) for s in starts]

    models = {r: make_model(r) for r in rows}
    opts = {r: make_optimizer(m.train()) for r, m in models.items()}
    for r, m in models.items():
        print(f"{r}: {sum(p.numel() for p in m.parameters()):,} parameters")
    if "ours" in models:
        for r in (r for r in rows if r.startswith("hf-")):
            copy_ours_into_hf(models["ours"], models[r])
            with torch.no_grad():
                diff = (logits_of(models["ours"], batches[0][0]) - logits_of(models[r], batches[0][0])).abs().max()
            print(f"ours vs {r} with the same weights: max |logit diff| {diff:.2e}")

    for r in rows:
        for x, y in batches[:args.warmup]:
            train_step(models[r], opts[r], x, y)
    times = {r: [] for r in rows}  # per round: list of step seconds
    for rnd in range(args.rounds):
        chunk = batches[args.warmup + rnd * args.steps:][:args.steps]
        k = rnd % len(rows)
        for r in rows[k:] + rows[:k]:  # rotate who goes first
            ts = []
            for x, y in chunk:
                t0 = time.perf_counter()
                train_step(models[r], opts[r], x, y)
                ts.append(time.perf_counter() - t0)
            times[r].append(ts)

    ref = "hf-sdpa" if "hf-sdpa" in rows else rows[-1]
    tok = args.batch * 64
    print(f"\n{args.rounds} rounds x {args.steps} steps per model, batch {args.batch} x 64, threads {torch.get_num_threads()}\n")
    print(f"| model | params | ms/step (median) | tokens/s | ours/theirs vs {ref} (speed) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ms = statistics.median(t for ts in times[r] for t in ts) * 1e3
        ratio = statistics.median(statistics.median(a) / statistics.median(b) for a, b in zip(times[ref], times[r]))
        params = sum(p.numel() for p in models[r].parameters())
        print(f"| {r} | {params:,} | {ms:.1f} | {tok / ms * 1e3:,.0f} | {ratio:.2f} |")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        r = rows[0]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for x, y in batches[:10]:
                train_step(models[r], opts[r], x, y)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot([[tok / statistics.median(ts) for ts in times[r]] for r in rows], tick_labels=rows)
    ax.set_ylabel("tokens/s (median of each round)"), ax.set_title("baby GPT training step, CPU"), ax.grid(alpha=0.3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(), fig.savefig(args.out, dpi=100)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
