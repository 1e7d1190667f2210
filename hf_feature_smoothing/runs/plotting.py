"""Plots of certificates: certified cosine (FCSB) vs ε, certified accuracy vs radius."""

import os
from pathlib import Path

import numpy as np

from ..statistics.bounds import fcsb
from ..utils.atomic import atomic_path


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def _save(fig, path: str | os.PathLike) -> None:
    """Save atomically ([`~utils.atomic.atomic_path`]): a kill never leaves half a plot."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)


def plot_certified_cosine(rows: list[dict], path: str | os.PathLike, max_epsilon: float | None = None) -> None:
    """FCSB(ε) per image (thin lines) and the median over images (thick), computed from each row's S_low and σ;
    an abstaining image counts as 0 (no certificate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigma = rows[0]["sigma"]
    grid = np.linspace(0, max_epsilon or 2 * sigma, 101)
    curves = np.array([[0.0 if r["abstain"] else max(0.0, fcsb(r["score_lower"], e, r["sigma"])) for e in grid]
                       for r in rows])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for curve in curves:
        ax.plot(grid, curve, color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(grid, np.median(curves, axis=0), color="tab:blue", lw=2.5, label="median over images")
    ax.set(xlabel="ε (ℓ2, pixel [0,1] units)", ylabel="certified cosine (FCSB)", ylim=(0, 1),
           title=f"σ={sigma}, n={rows[0]['n']}, α={rows[0]['alpha']}, {len(rows)} images")
    ax.legend()
    _save(fig, path)


def plot_certified_accuracy(rows: list[dict], path: str | os.PathLike) -> None:
    """Fraction of images whose prediction is certified correct within radius r, vs r (labelled rows only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radii = np.array([r["radius"] if r.get("correct") else -1.0 for r in rows])
    grid = np.linspace(0, max(radii.max(), 1e-3) * 1.1, 101)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.step(grid, [(radii >= g).mean() for g in grid], where="post")
    ax.set(xlabel="radius (ℓ2, pixel [0,1] units)", ylabel="certified accuracy", ylim=(0, 1),
           title=f"σ={rows[0]['sigma']}, n={rows[0]['n']}, α={rows[0]['alpha']}, {len(rows)} images")
    _save(fig, path)


def plot_attack(records: list[dict], path: str | os.PathLike) -> None:
    """Mean attacked feature cosine vs ε per variant (solid), with the mean certified FCSB of smoothed variants
    (dashed): a certificate holds when the solid line of a smoothed variant stays above its dashed one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..attacks.evaluation import summarize

    summary = summarize([{**row, "variant": r["variant"]} for r in records for row in r["rows"]])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, variant in enumerate(dict.fromkeys(s["variant"] for s in summary)):
        points = sorted((s["epsilon"], s["attacked_cosine"], s["certified_cosine"]) for s in summary
                        if s["variant"] == variant)
        color = f"C{i}"
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color, label=f"{variant} attacked")
        if points[0][2] is not None:
            ax.plot([p[0] for p in points], [p[2] for p in points], "--", color=color, label=f"{variant} FCSB")
    first = records[0]["rows"][0]
    ax.set(xlabel=f"ε ({first['norm']}, pixel [0,1] units)", ylabel="feature cosine", ylim=(-0.05, 1.05),
           title=f"{first['algorithm'].upper()}, {first['steps']} steps, {len(records)} (image, variant) pairs")
    ax.legend(fontsize=7)
    _save(fig, path)
