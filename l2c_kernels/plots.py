"""Pictures people would rather look at than numbers: schedule heatmaps and sample comparisons."""
from __future__ import annotations

from pathlib import Path

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# one colour per decision, so the computed cells can be read off the picture (scores are not drawn)
DECISIONS = (("computed", "#08306b"), ("reused", "#c6dbef"), ("forecast", "#fd8d3c"), ("block reused", "#969696"))


def decision_grid(schedule):
    """``[steps, blocks, branches]`` array of indices into :data:`DECISIONS`: 0 computed, 1 reused (last
    output), 2 reused with a forecast (``schedule.forecast`` is not ``"none"``), 3 whole block reused."""
    import numpy as np

    reuse = 2 if schedule.forecast != "none" else 1
    grid = np.empty((schedule.num_steps, schedule.num_blocks, len(schedule.branches)), dtype=np.int64)
    for s, row in enumerate(schedule.plan):
        for b, e in enumerate(row):
            grid[s, b, :] = 3 if e == "B" else [0 if c == "C" else reuse for c in e]
    return grid


def schedule_heatmap(schedule, path, title: str | None = None) -> Path:
    """One panel per branch: steps (x) by blocks (y), each cell coloured by the schedule's decision
    (computed / reused / forecast / whole block reused, see :data:`DECISIONS`) with a legend."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    grid = decision_grid(schedule)
    cmap = ListedColormap([c for _, c in DECISIONS])
    nbr = len(schedule.branches)
    fig, axes = plt.subplots(1, nbr, figsize=(3.2 * nbr + 1, 0.22 * schedule.num_blocks + 2.2), squeeze=False)
    for i, br in enumerate(schedule.branches):
        ax = axes[0, i]
        ax.imshow(grid[:, :, i].T, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(DECISIONS) - 0.5,
                  interpolation="nearest")
        ax.set_title(f"{br}: {100 * (grid[:, :, i] != 0).mean():.0f}% not computed")
        ax.set_xlabel("sampling step")
        if i == 0:
            ax.set_ylabel("block")
    present = sorted(set(grid.ravel().tolist()) | {0, 1 if schedule.forecast == "none" else 2})
    fig.legend(handles=[Patch(facecolor=DECISIONS[k][1], edgecolor="black", label=DECISIONS[k][0]) for k in present],
               loc="lower center", ncol=len(present), fontsize=8, frameon=False)
    s = schedule.summary()
    fig.suptitle(title or f"{s['method']} schedule: {100 * s['flops_removed_fraction']:.0f}% of branch FLOPs removed"
                 + (f", reused outputs forecast ({schedule.forecast})" if schedule.forecast != "none" else ""),
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def side_by_side(rows: dict, path, scale: int = 4) -> Path:
    """A PNG with one labelled row of images per entry of ``rows`` ({label: images [n,1,H,W] in [-1,1]})."""
    plt = _plt()

    n = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(4, 0.6 * n), 1.0 * len(rows) + 0.4), squeeze=False)
    for ax, (label, imgs) in zip(axes[:, 0], rows.items()):
        imgs = imgs.detach().float().clamp(-1, 1).cpu()
        strip = torch.cat([torch.nn.functional.pad(im[0], (1, 1, 1, 1), value=1.0) for im in imgs], dim=1)
        ax.imshow(strip.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(label, fontsize=9, loc="left")
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speed_quality(points: list[dict], path, title: str = "speed vs quality", highlight: str | None = None,
                  targets: tuple[float, ...] = ()) -> Path:
    """Scatter/line plot of measured speedup (x) against PSNR (y), one series per ``points[i]['family']``.

    Every family gets its own colour and marker; ``highlight`` (a family name) is drawn bold on top, and
    ``targets`` (speedups) as dotted vertical lines.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    fams: dict = {}
    for p in points:
        fams.setdefault(p["family"], []).append(p)
    colors = plt.get_cmap("tab20").colors
    markers = "os^vD<>pPhX*"
    for k, (fam, pts) in enumerate(fams.items()):
        pts = sorted(pts, key=lambda p: p["speedup"])
        bold = fam == highlight
        ax.plot([p["speedup"] for p in pts], [min(p["psnr"], 60) for p in pts], label=fam,
                color="black" if bold else colors[(2 * k) % 20 + (k // 10) % 2],
                marker="*" if bold else markers[k % len(markers)], markersize=11 if bold else 5,
                linewidth=2.2 if bold else 1.0, zorder=3 if bold else 2)
    for t in targets:
        ax.axvline(t, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("measured speedup over full compute")
    ax.set_ylabel("PSNR vs full compute (dB, capped at 60)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
