"""Pruning: remove weights, whole blocks, or MLP channels from a float model (a layer over the core).

Three methods, each a function of a loaded float Transformer (`python -m minillm.prune` is the
command line, __main__.py):

(a) magnitude_prune(model, sparsity, scope): unstructured. Set to zero the `sparsity` fraction of
    smallest-|w| weights among the Linear layers inside the blocks (q, k, v, o, gate, up, down):
    over all of them at once (scope="global": one threshold, so layers end up unevenly sparse) or
    in each weight matrix separately (scope="layer": each matrix exactly that sparse). The token
    embedding (and with it a tied output head), an untied output head, gpt2's position embedding,
    every norm and every bias are left as they are. The mask is applied once and is the zeros
    themselves: the model keeps its shapes and its config, the file stays dense float of the same
    size (only a compressor makes it smaller), and dense kernels multiply by the zeros as by any
    number, so nothing runs faster. What it does give: a measure of how many weights a model can
    lose, and a starting point for sparse formats or kernels this project does not have.
(b) depth: block_similarity measures, on calibration text, how much each block changes the
    residual stream: the cosine similarity between the stream entering a block (x) and leaving it
    (x + attn + mlp), averaged over every calibration token. A block whose output points where its
    input did adds little; drop_blocks removes the `drop` most similar blocks (chosen in one pass on
    the full model, as ShortGPT's "block influence" 1 - cos does) and renumbers the rest, giving a
    model of n_layer - drop layers.
(c) width: mlp_channel_importance scores each MLP hidden channel j of each block as
        importance_j = mean over calibration tokens of |h_j|  x  ||down_proj.weight[:, j]||_2
    where h is the down projection's input (silu(gate(x)) * up(x), or gelu(up(x)) for gpt2).
    Channel j adds h_j * down_proj.weight[:, j] to the residual stream, so the product is the mean
    size of what the channel writes there: the activation alone would keep a channel that fires
    strongly into a near-zero column, the weights alone one that never fires. shrink_mlp keeps the
    same number of highest-scoring channels in every block (one mlp_hidden in the config), in
    their original order.

(b) and (c) return new, ordinary models of the same config form (fewer layers, or a smaller
mlp_hidden): checkpoint.save_model writes them and load_model / sample.py read them like any
other; they are smaller and faster. Nothing is trained here: recovery is the trainer's distillation
from the unpruned model (README "Pruning").

Calibration text (calibration_ids): by default tinyshakespeare's train part, the first 90% of its
characters (the cut minillm.eval.eval_text makes, so the val part stays unseen), tokenized with
the checkpoint's tokenizer, its first `tokens` ids cut into rows of `seq_len`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import assign_tensors, empty_model, keep_blocks
from ..data import file_sha256, read_text, resolve_text_path, train_val_cut
from ..model import Transformer

SCOPES = ("global", "layer")
CALIB_TOKENS = 4096  # default amount of calibration text, in tokens
CALIB_SEQ_LEN = 512  # default length of one calibration row
IMPORTANCE = "mean |h_j| over calibration tokens x ||down_proj.weight[:, j]||_2"


# ----------------------------------------------------------------------------- shared helpers

def check_float(model: Transformer, who: str = "the model") -> None:
    """Pruning works on float weights: a quantized model (minillm.quantize) is refused."""
    if getattr(model, "quantization", None):
        raise ValueError(f"{who} is quantized ({model.quantization}); prune a float checkpoint, then quantize")


def block_linears(model: Transformer) -> dict[str, nn.Linear]:
    """The Linear layers inside the blocks (attention and MLP projections), by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("blocks.")}


def block_linear_weights(model: Transformer) -> int:
    """How many weights the blocks' Linear layers hold (biases not counted): what pruning acts on."""
    return sum(m.weight.numel() for m in block_linears(model).values())


def rebuild(model: Transformer, cfg, tensors: dict[str, torch.Tensor]) -> Transformer:
    """A new Transformer of config `cfg` holding copies of `tensors` (its full state dict), on the old
    model's device, in eval mode (checkpoint.assign_tensors builds it, as a load does)."""
    new = assign_tensors(empty_model(cfg), {k: v.detach().clone() for k, v in tensors.items()})
    return new.to(model.tok_emb.weight.device).eval()


# ----------------------------------------------------------------------------- calibration text

@dataclass
class Calibration:
    ids: torch.Tensor  # (rows, seq_len) token ids
    source: dict  # what provenance records: file, sha256, split, tokens, seq_len


def calibration_ids(tokenizer, path: str | Path | None = None, tokens: int = CALIB_TOKENS,
                    seq_len: int = CALIB_SEQ_LEN) -> Calibration:
    """The first `tokens` ids of the train part (first 90% of the characters) of `path` (default:
    tinyshakespeare), as rows of seq_len; `tokens` is rounded down to whole rows. Only as much text
    as needed is encoded."""
    check_calib(tokens, seq_len)
    path = resolve_text_path(path)
    text = read_text(path)
    train = text[:train_val_cut(len(text))]  # the train part, as the trainer and minillm.eval cut it
    take, ids = 2 * tokens, []
    while True:  # a prefix of the text, doubled until it holds enough tokens
        ids = tokenizer.encode(train[:take])
        if take >= len(train):
            break
        ids = ids[:-1]  # the prefix may end inside a word: its last token may be a piece of one
        if len(ids) >= tokens:
            break
        take *= 2
    rows = min(tokens, len(ids)) // seq_len
    if rows == 0:
        raise ValueError(f"calibration text {path}: its train part holds {len(ids)} tokens, fewer than one row of "
                         f"calib_seq_len {seq_len}")
    used = torch.tensor(ids[:rows * seq_len], dtype=torch.long).view(rows, seq_len)
    source = {"file": str(path), "sha256": file_sha256(path), "split": "train (first 90% of the characters)",
              "tokens": rows * seq_len, "seq_len": seq_len}
    return Calibration(used, source)


def check_calib(tokens: int, seq_len: int | None) -> None:
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 2:
        raise ValueError(f"calib_tokens must be a whole number >= 2, got {tokens!r}")
    if seq_len is not None and (not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2):
        raise ValueError(f"calib_seq_len must be a whole number >= 2, got {seq_len!r}")
    if seq_len is not None and seq_len > tokens:  # was cut to calib_tokens without a word
        raise ValueError(f"calib_seq_len {seq_len} is longer than calib_tokens {tokens}: one row needs that many tokens")


def run_calibration(model: Transformer, calib: Calibration, batch_size: int = 4) -> None:
    """Run the calibration rows through the model (for the hooks that watch it). No output head
    beyond the last position: last_only skips the vocab-wide logits nobody reads."""
    if calib.ids.shape[1] > model.config.block_size:
        raise ValueError(f"calib_seq_len {calib.ids.shape[1]} exceeds the model's block_size "
                         f"({model.config.block_size})")
    device = model.tok_emb.weight.device
    with torch.inference_mode():
        for i in range(0, len(calib.ids), batch_size):
            model(calib.ids[i:i + batch_size].to(device), last_only=True)


# ----------------------------------------------------------------------------- (a) magnitude

def check_sparsity(sparsity: float) -> None:
    ok = isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and math.isfinite(sparsity)
    if not (ok and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


def smallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask, True at exactly k of the smallest entries of `scores` (ties: the lower indices)."""
    flat = scores.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        threshold = flat.kthvalue(k).values  # the k-th smallest
        mask = flat < threshold
        ties = (flat == threshold).nonzero().flatten()
        mask[ties[:k - int(mask.sum())]] = True
    return mask.view_as(scores)


@torch.no_grad()
def magnitude_prune(model: Transformer, sparsity: float, scope: str = "global") -> dict:
    """Zero the round(sparsity * n) smallest-|w| weights of the blocks' Linear layers, in place:
    over all n of them (global) or in each matrix (layer). Returns what provenance records."""
    check_float(model)
    check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    weights = {name: lin.weight for name, lin in block_linears(model).items()}
    if scope == "layer":
        for w in weights.values():
            w[smallest_mask(w.abs(), round(sparsity * w.numel()))] = 0.0
    else:
        scores = torch.cat([w.abs().flatten().float() for w in weights.values()])  # (n,)
        mask = smallest_mask(scores, round(sparsity * scores.numel()))
        start = 0
        for w in weights.values():
            w.view(-1)[mask[start:start + w.numel()]] = 0.0
            start += w.numel()
    zeros = {name: int((w == 0).sum()) for name, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    return {"method": "magnitude", "scope": scope, "sparsity": sparsity, "zero_weights": sum(zeros.values()),
            "of_weights": total, "pruned": "the blocks' Linear weights (q, k, v, o, gate, up, down)",
            "not_pruned": "embeddings, output head, norms, biases",
            "per_matrix_sparsity": {name: round(z / weights[name].numel(), 6) for name, z in zeros.items()}}


# ----------------------------------------------------------------------------- (b) depth

@torch.no_grad()
def block_similarity(model: Transformer, calib: Calibration) -> list[float]:
    """For each block, the cosine similarity of the residual stream before and after it, averaged
    over every calibration token (computed in float32, summed in float64)."""
    sums = torch.zeros(model.config.n_layer, dtype=torch.float64)

    def watch(i):
        def hook(module, args, out):  # Block.forward(x, rope, mask, cache, start_pos) -> x'
            sums[i] += F.cosine_similarity(args[0].float(), out.float(), dim=-1).sum().double().cpu()
        return hook

    handles = [block.register_forward_hook(watch(i)) for i, block in enumerate(model.blocks)]
    try:
        run_calibration(model, calib)
    finally:
        for h in handles:
            h.remove()
    return (sums / calib.ids.numel()).tolist()


def check_drop(n_layer: int | None, drop: int) -> None:
    """0 <= drop < n_layer (a model keeps at least one block); n_layer None: only drop >= 0."""
    whole = isinstance(drop, int) and not isinstance(drop, bool)
    if not whole or drop < 0:
        raise ValueError(f"drop must be a whole number >= 0, got {drop!r}")
    if n_layer is not None and drop >= n_layer:
        raise ValueError(f"drop must be at most {n_layer - 1}: the model has {n_layer} blocks and must keep at "
                         f"least one, got {drop}")


def most_similar(similarity: list[float], drop: int) -> list[int]:
    """The `drop` blocks of highest similarity (ties: the lower index), in increasing order."""
    order = sorted(range(len(similarity)), key=lambda i: (-similarity[i], i))
    return sorted(order[:drop])


def drop_blocks(model: Transformer, blocks: list[int]) -> Transformer:
    """A new model without the given blocks: n_layer reduced, the rest renumbered 0.. in order
    (their KV-cache slots with them); everything outside the blocks as it was."""
    check_float(model)
    n = model.config.n_layer
    if len(set(blocks)) != len(blocks) or any(not 0 <= i < n for i in blocks):
        raise ValueError(f"blocks must be distinct indices in 0..{n - 1}, got {blocks}")
    check_drop(n, len(blocks))
    return keep_blocks(model, [i for i in range(n) if i not in blocks])


def prune_depth(model: Transformer, calib: Calibration, drop: int) -> tuple[Transformer, dict]:
    """(b): measure every block, drop the `drop` most similar ones -> (new model, provenance record)."""
    check_float(model)
    check_drop(model.config.n_layer, drop)
    similarity = block_similarity(model, calib)
    dropped = most_similar(similarity, drop)
    report = {"method": "depth", "dropped_blocks": dropped, "n_layer": [model.config.n_layer, model.config.n_layer - drop],
              "score": "cosine similarity of the residual stream before/after each block, mean over tokens",
              "block_similarity": [round(s, 6) for s in similarity], "calibration": calib.source}
    return drop_blocks(model, dropped), report


# ----------------------------------------------------------------------------- (c) MLP width

@torch.no_grad()
def mlp_channel_importance(model: Transformer, calib: Calibration) -> list[torch.Tensor]:
    """Per block, (mlp_hidden,) float64: mean |h_j| over calibration tokens x ||down_proj.weight[:, j]||."""
    H = model.config.mlp_hidden
    sums = [torch.zeros(H, dtype=torch.float64) for _ in model.blocks]

    def watch(i):
        def hook(module, args):  # down_proj's input h: (B, T, H)
            sums[i] += args[0].float().abs().flatten(0, -2).sum(0).double().cpu()
        return hook

    handles = [block.mlp.down_proj.register_forward_pre_hook(watch(i)) for i, block in enumerate(model.blocks)]
    try:
        run_calibration(model, calib)
    finally:
        for h in handles:
            h.remove()
    column_norms = [block.mlp.down_proj.weight.float().norm(dim=0).double().cpu() for block in model.blocks]
    return [s / calib.ids.numel() * c for s, c in zip(sums, column_norms)]


def check_mlp_hidden(current: int | None, mlp_hidden: int) -> None:
    """1 <= mlp_hidden <= the model's current width; current None: only mlp_hidden >= 1."""
    whole = isinstance(mlp_hidden, int) and not isinstance(mlp_hidden, bool)
    if not whole or mlp_hidden < 1:
        raise ValueError(f"mlp_hidden must be a whole number >= 1, got {mlp_hidden!r}")
    if current is not None and mlp_hidden > current:
        raise ValueError(f"mlp_hidden must be at most the model's {current} (pruning only removes channels), "
                         f"got {mlp_hidden}")


def top_channels(importance: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Per block, the indices of its k most important channels (ties: the lower index), increasing."""
    return [torch.sort(-imp, stable=True).indices[:k].sort().values for imp in importance]


def shrink_mlp(model: Transformer, keep: list[torch.Tensor]) -> Transformer:
    """A new model whose block i keeps MLP hidden channels keep[i] (the same count in every block):
    rows of up/gate (and their biases) and columns of down; mlp_hidden becomes that count."""
    check_float(model)
    k = len(keep[0]) if keep else 0
    if len(keep) != model.config.n_layer or any(len(ix) != k for ix in keep):
        raise ValueError(f"keep must give the same number of channels for each of the {model.config.n_layer} blocks")
    check_mlp_hidden(model.config.mlp_hidden, k)
    tensors = model.state_dict()
    for i, ix in enumerate(keep):
        p = f"blocks.{i}.mlp."
        for name in [n for n in tensors if n.startswith(p) and not n.startswith(p + "down_proj.")]:
            tensors[name] = tensors[name][ix.to(tensors[name].device)]  # up/gate weight rows and biases
        down = tensors[p + "down_proj.weight"]
        tensors[p + "down_proj.weight"] = down[:, ix.to(down.device)]
    return rebuild(model, dataclasses.replace(model.config, mlp_hidden=k), tensors)


def prune_width(model: Transformer, calib: Calibration, mlp_hidden: int) -> tuple[Transformer, dict]:
    """(c): score every MLP channel, keep the mlp_hidden best in each block -> (new model, provenance record)."""
    check_float(model)
    check_mlp_hidden(model.config.mlp_hidden, mlp_hidden)
    importance = mlp_channel_importance(model, calib)
    keep = top_channels(importance, mlp_hidden)
    report = {"method": "width", "mlp_hidden": [model.config.mlp_hidden, mlp_hidden],
              "channels_removed_per_block": model.config.mlp_hidden - mlp_hidden, "importance": IMPORTANCE,
              "calibration": calib.source}
    return shrink_mlp(model, keep), report
