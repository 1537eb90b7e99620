"""Pictures of an Entropix-sampled generation (matplotlib, Agg backend, PNG files).

- :func:`plot_entropy_scatter`: one point per generated token in the (entropy, varentropy) plane,
  colored by regime, with the config's thresholds drawn.
- :func:`plot_token_trace`: entropy and varentropy per token along the decoded text, each token's
  regime as a colored band.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from entropy_guided_generation.sampling.entropix import REGIMES
from entropy_guided_generation.sampling.entropix_config import EntropixConfig

REGIME_COLORS = {
    "argmax": "#1f77b4",
    "clarify": "#d62728",
    "careful": "#ff7f0e",
    "explore": "#2ca02c",
    "resample": "#9467bd",
    "adaptive": "#7f7f7f",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _row(values: torch.Tensor, regime: torch.Tensor) -> tuple[list[float], list[int]]:
    """Drop steps after the row stopped (regime -1)."""
    keep = regime >= 0
    return values[keep].float().tolist(), regime[keep].tolist()


def plot_entropy_scatter(
    entropy: torch.Tensor,
    varentropy: torch.Tensor,
    regime: torch.Tensor,
    path: Union[str, Path],
    config: Optional[EntropixConfig] = None,
    title: str = "Entropix regimes per token",
) -> Path:
    """Scatter of per-token (entropy, varentropy) with regime colors and the thresholds.

    Args:
        entropy: ``[T]`` bits (or ``[b, T]``: all rows in one plot).
        varentropy: same shape, bits^2.
        regime: same shape, codes into :data:`REGIMES` (-1: row stopped, not drawn).
        path: PNG file to write.
        config: thresholds to draw (default: :class:`EntropixConfig` defaults).

    Returns:
        ``path`` as a ``Path``.
    """
    plt = _pyplot()
    config = config or EntropixConfig()
    h, codes = _row(entropy.flatten(), regime.flatten())
    v, _ = _row(varentropy.flatten(), regime.flatten())
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for code, name in enumerate(REGIMES):
        pts = [(x, y) for x, y, c in zip(h, v, codes) if c == code]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=14, color=REGIME_COLORS[name], label=f"{name} ({len(pts)})", alpha=0.8)
    for x, name in ((config.low_ent_thresh, "low"), (config.med_ent_thresh, "med"), (config.high_ent_thresh, "high")):
        ax.axvline(x, color="black", linestyle="--", linewidth=0.8)
        ax.annotate(f"H {name}", (x, 1.0), xycoords=("data", "axes fraction"), fontsize=7, ha="left", va="top")
    for y, name in ((config.low_vent_thresh, "low"), (config.high_vent_thresh, "high")):
        ax.axhline(y, color="black", linestyle=":", linewidth=0.8)
        ax.annotate(f"V {name}", (1.0, y), xycoords=("axes fraction", "data"), fontsize=7, ha="right", va="bottom")
    ax.set_xlabel("entropy (bits)")
    ax.set_ylabel("varentropy (bits$^2$)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, plt, path)


def plot_token_trace(
    tokens: Sequence[str],
    entropy: torch.Tensor,
    varentropy: torch.Tensor,
    regime: torch.Tensor,
    path: Union[str, Path],
    title: str = "Entropix trace",
) -> Path:
    """Entropy and varentropy per generated token of one row, x-axis labelled by the tokens' text,
    each token's regime as a background band.

    Args:
        tokens: the decoded text of each generated token (length T', the row's generated length).
        entropy, varentropy, regime: ``[T]`` for that row (steps with regime -1 are dropped).
        path: PNG file to write.
    """
    plt = _pyplot()
    h, codes = _row(entropy, regime)
    v, _ = _row(varentropy, regime)
    if len(tokens) != len(h):
        raise ValueError(f"got {len(tokens)} token texts for {len(h)} generated steps; pass one text per step")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(h)), 3.8))
    for i, code in enumerate(codes):
        ax.axvspan(i - 0.5, i + 0.5, color=REGIME_COLORS[REGIMES[code]], alpha=0.18, linewidth=0)
    xs = list(range(len(h)))
    ax.plot(xs, h, marker="o", markersize=3, label="entropy (bits)", color="black")
    ax.plot(xs, v, marker="s", markersize=3, label="varentropy (bits$^2$)", color="#8c564b")
    ax.set_xticks(xs)
    ax.set_xticklabels([repr(t)[1:-1] for t in tokens], rotation=90, fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=REGIME_COLORS[n], alpha=0.4) for n in REGIMES]
    first = ax.legend(loc="upper right", fontsize=7)
    ax.add_artist(first)
    ax.legend(handles, REGIMES, loc="upper left", fontsize=6, ncol=3)
    ax.set_title(title)
    return _save(fig, plt, path)


def _save(fig, plt, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["REGIME_COLORS", "plot_entropy_scatter", "plot_token_trace"]
