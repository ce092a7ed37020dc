"""The inspector's PNGs: logit-lens heatmap, one attention grid per layer, all heads at a glance, and
the per-head scores. matplotlib is imported only when a picture is drawn (an optional dependency)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from .analysis import Report


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path, dpi: int) -> None:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_logit_lens(rep: Report, path: Path, max_cols: int = 40) -> None:
    """Heatmap layers × positions: colour = probability the layer gives the model's final prediction;
    text = the layer's top token (when few enough positions)."""
    plt = _plt()
    L, T = rep.lens, len(rep.ids)
    cols = list(range(max(0, T - max_cols), T))
    data = torch.tensor(L["final_p"])[:, cols].numpy()
    n_rows = len(L["layers"])
    fig, ax = plt.subplots(figsize=(max(6, 0.75 * len(cols) + 2), max(3, 0.32 * n_rows + 1.8)))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.set_yticks(range(n_rows), L["layers"], fontsize=7)
    ax.set_xticks(range(len(cols)), [rep.tokens[t][:8] for t in cols], rotation=90, fontsize=7)
    ax.set_xlabel("input token (position)")
    ax.set_ylabel("residual stream after layer")
    if len(cols) <= 40 and n_rows <= 64:
        for j, t in enumerate(cols):
            for l in range(n_rows):
                ax.text(j, l, L["top_token"][l][t][:6], ha="center", va="center", fontsize=5,
                        color="white" if data[l, j] < 0.5 else "black")
    shown = "" if len(cols) == T else f" (last {len(cols)} of {T} positions)"
    ax.set_title(f"logit lens: p(final prediction) per layer; text = layer's top token{shown}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    _save(plt, fig, path, 130)


def plot_attention_layer(rep: Report, layer: int, path: Path, label_max: int = 32) -> None:
    plt = _plt()
    a = rep.attention[layer].numpy()
    nh, T = a.shape[0], a.shape[1]
    ncol = min(nh, 4 if nh <= 8 else 5)
    nrow = math.ceil(nh / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.2 * nrow), squeeze=False)
    for h in range(nrow * ncol):
        ax = axes[h // ncol][h % ncol]
        if h >= nh:
            ax.axis("off")
            continue
        ax.imshow(a[h], cmap="Blues", vmin=0, vmax=1)
        hs = rep.heads[layer * nh + h]
        ax.set_title(f"L{layer} H{h}  H={hs['entropy_bits']:.2f}b prev={hs['prev_token']:.2f} "
                     f"first={hs['first_token']:.2f}", fontsize=6)
        if T <= label_max:  # token labels on the left column and the bottom row only (text is slow to draw)
            bottom = h + ncol >= nh
            ax.set_xticks(range(T), rep.tokens if bottom else [], rotation=90, fontsize=5)
            ax.set_yticks(range(T), rep.tokens if h % ncol == 0 else [], fontsize=5)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"layer {layer} attention (rows: query position, columns: key position)", fontsize=9)
    fig.tight_layout()
    _save(plt, fig, path, 110)


def plot_attention_overview(rep: Report, path: Path) -> None:
    plt = _plt()
    L, nh = len(rep.attention), rep.attention[0].shape[0]  # layers, heads
    fig, axes = plt.subplots(L, nh, figsize=(0.9 * nh + 0.6, 0.9 * L + 0.6), squeeze=False)
    for l in range(L):
        for h in range(nh):
            ax = axes[l][h]
            ax.imshow(rep.attention[l][h].numpy(), cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if h == 0:
                ax.set_ylabel(f"L{l}", fontsize=6)
            if l == 0:
                ax.set_title(f"H{h}", fontsize=6)
    fig.suptitle("attention, all layers (rows) × heads (columns)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # leave room for the title
    _save(plt, fig, path, 100)


def plot_head_scores(rep: Report, path: Path) -> None:
    plt = _plt()
    L, nh = len(rep.attention), rep.attention[0].shape[0]  # layers, heads
    fig, axes = plt.subplots(1, 3, figsize=(3 + 0.35 * nh * 3, max(3, 0.25 * L + 1.5)), squeeze=False)
    for ax, (key, title) in zip(axes[0], (("entropy_bits", "mean entropy (bits)"), ("prev_token", "previous-token score"),
                                          ("first_token", "first-token score"))):
        m = torch.tensor([h[key] for h in rep.heads]).view(L, nh).numpy()
        im = ax.imshow(m, cmap="magma" if key == "entropy_bits" else "viridis", aspect="auto", origin="lower",
                       vmin=0, vmax=None if key == "entropy_bits" else 1)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    _save(plt, fig, path, 110)


def png_jobs(rep: Report, out: str | Path, layers: list[int] = ()) -> list[tuple[Path, Callable]]:
    """(path, draw) for each picture of `rep` in directory `out`: the logit lens, and when attention was
    captured the overview of every head, the head scores and one grid per layer in `layers`."""
    out = Path(out)
    jobs = [(out / "logit_lens.png", lambda p: plot_logit_lens(rep, p))]
    if rep.attention:
        jobs += [(out / "attn_overview.png", lambda p: plot_attention_overview(rep, p)),
                 (out / "head_scores.png", lambda p: plot_head_scores(rep, p))]
        jobs += [(out / f"attn_layer{l:02d}.png", lambda p, l=l: plot_attention_layer(rep, l, p)) for l in layers]
    return jobs


def write_pngs(rep: Report, out: str | Path, layers: list[int] = (), progress: Callable | None = None) -> list[Path]:
    """Draw png_jobs' pictures into directory `out` (made if missing) -> their paths; progress(path) after each."""
    Path(out).mkdir(exist_ok=True)
    jobs = png_jobs(rep, out, layers)
    for path, draw in jobs:
        draw(path)
        if progress is not None:
            progress(path)
    return [path for path, _ in jobs]
