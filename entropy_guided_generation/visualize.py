"""Pictures people look at rather than read: decoded text coloured by confidence bin (HTML and
PNG), reliability diagrams, and training-loss curves. matplotlib is imported lazily (extra
``plots``) and always with the non-interactive Agg backend."""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

PathLike = Union[str, Path]


def pyplot():
    """matplotlib's ``pyplot`` on the non-interactive Agg backend (raises ImportError naming the ``plots`` extra)."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - exercised only without the plots extra
        raise ImportError("plots need matplotlib: pip install 'entropy_guided_generation[plots]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: PathLike, suptitle: str = "") -> Path:
    """Write ``fig`` to ``path`` (PNG, 110 dpi) under an optional figure title, close it; returns the path."""
    if suptitle:
        fig.suptitle(suptitle)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def bin_colour(bin_index: int, num_bins: int) -> tuple[float, float, float]:
    """RGB in [0, 1] for a confidence bin: green (bin 0) to red (bin K-1); grey for no bin (-1).

    For the entropy signal bin 0 is the most confident; with the max_prob signal pass
    ``num_bins - 1 - bin`` so that green still means confident.
    """
    if bin_index < 0:
        return (0.85, 0.85, 0.85)
    x = bin_index / max(num_bins - 1, 1)
    return (min(1.0, 2 * x), min(1.0, 2 * (1 - x)), 0.25)


def confidence_html(pieces: Sequence[str], bins: Sequence[int], num_bins: int, title: str = "") -> str:
    """An HTML page showing each decoded piece of text on its bin's colour (hover: the bin)."""
    spans = []
    for text, b in zip(pieces, bins):
        r, g, bl = (int(255 * c) for c in bin_colour(int(b), num_bins))
        label = f"bin {int(b)}" if b >= 0 else "no confidence token"
        shown = html.escape(text).replace("\n", "&#9166;<br>")
        spans.append(f'<span title="{label}" style="background: rgb({r},{g},{bl}); padding: 1px 0">{shown}</span>')
    legend = "".join(
        f'<span style="background: rgb({",".join(str(int(255 * c)) for c in bin_colour(k, num_bins))}); padding: 2px 6px">{k}</span>'
        for k in range(num_bins)
    )
    return (
        "<!doctype html><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<body style='font-family: monospace; max-width: 60em; line-height: 1.8'>"
        f"<h3>{html.escape(title)}</h3><p>confidence bin: {legend} (grey: no confidence token)</p>"
        f"<p>{''.join(spans)}</p></body>"
    )


def confidence_png(pieces: Sequence[str], bins: Sequence[int], num_bins: int, path: PathLike, title: str = "") -> Path:
    """The same picture as :func:`confidence_html`, drawn with matplotlib as a PNG."""
    plt = pyplot()
    per_line = 48
    lines: list[list[tuple[str, int]]] = [[]]
    width = 0
    for text, b in zip(pieces, bins):
        for k, part in enumerate(text.split("\n")):
            if k > 0:
                lines.append([])
                width = 0
            if width + len(part) > per_line and lines[-1]:
                lines.append([])
                width = 0
            lines[-1].append((part if part else " ", int(b)))
            width += len(part)
    fig_h = 0.9 + 0.32 * len(lines)
    fig, ax = plt.subplots(figsize=(10, fig_h))
    ax.axis("off")
    char_w, line_h = 1.0 / (per_line + 4), 1.0 / (len(lines) + 2)
    for row, line in enumerate(lines):
        x = 0.01
        for part, b in line:
            ax.text(
                x, 1 - (row + 1.5) * line_h, part, family="monospace", fontsize=10, va="center",
                bbox=dict(facecolor=bin_colour(b, num_bins), edgecolor="none", pad=1.5),
            )
            x += char_w * len(part)
    if title:
        ax.set_title(title, fontsize=11, loc="left")
    return _save(plt, fig, path)


def reliability_diagram(
    confidences: Sequence[float], correct: Sequence[bool], path: PathLike, title: str = "", num_bins: int = 10
) -> Path:
    """Accuracy per equal-width confidence bin against the diagonal, with per-bin counts."""
    plt = pyplot()
    edges = [k / num_bins for k in range(num_bins + 1)]
    acc, mid, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        members = [c for p, c in zip(confidences, correct) if (lo < p <= hi) or (lo == 0 and p == 0)]
        counts.append(len(members))
        mid.append((lo + hi) / 2)
        acc.append(sum(members) / len(members) if members else math.nan)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.bar(mid, [0 if math.isnan(a) else a for a in acc], width=1 / num_bins, edgecolor="black", alpha=0.7, label="accuracy")
    for m, a, n in zip(mid, acc, counts):
        if n:
            ax.text(m, (0 if math.isnan(a) else a) + 0.02, str(n), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("sequence confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "reliability")
    ax.legend(loc="upper left", fontsize=8)
    return _save(plt, fig, path)


def loss_curves(curves: Mapping[str, Sequence[float]], path: PathLike, title: str = "training loss", log_y: bool = False) -> Path:
    """One line per run (e.g. per mode): loss against optimizer step (``log_y``: a log loss axis)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), list(values), label=name, lw=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (content tokens)")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def learning_curves(points: Mapping[str, Sequence[Mapping[str, float]]], path: PathLike, title: str = "") -> Path:
    """Per mode, held-out accuracy and held-out content loss against the training budget.

    Args:
        points: mode -> ``[{"steps", "accuracy", "content_loss"}, ...]`` (one finetune per budget).
    """
    plt = pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, rows in points.items():
        rows = sorted(rows, key=lambda r: r["steps"])
        steps = [r["steps"] for r in rows]
        acc_ax.plot(steps, [r["accuracy"] for r in rows], marker="o", label=mode)
        loss_ax.plot(steps, [r["content_loss"] for r in rows], marker="o", label=mode)
    for ax, label in ((acc_ax, "held-out accuracy"), (loss_ax, "held-out content loss (nats/token)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("finetuning steps (one run per budget)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    loss_ax.set_yscale("log")
    acc_ax.set_ylim(0, 1)
    acc_ax.legend()
    return _save(plt, fig, path, suptitle=title)


def ablation_bars(accuracy: Mapping[str, Mapping[str, float]], path: PathLike, title: str = "") -> Path:
    """Grouped bars: per mode, held-out accuracy of each variant (e.g. each decode: real bins and
    each ablation; or each setting of a comparison).

    Args:
        accuracy: mode -> {variant name -> accuracy}, e.g. ``{"answer": {"real": 0.5, "shuffled": 0.4}}``.
    """
    plt = pyplot()
    modes = list(accuracy)
    names = list(dict.fromkeys(name for m in modes for name in accuracy[m]))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(modes), 3.8))
    for k, name in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(modes))]
        ax.bar(xs, [accuracy[m].get(name, math.nan) for m in modes], width=width, label=name)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title or "decoding with the confidence tokens replaced")
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def digit_bins(histograms: Mapping[str, Mapping[str, Sequence[int]]], path: PathLike, title: str = "") -> Path:
    """Per mode, the share of right and of wrong result digits in each confidence bin (the bin of
    the distribution that produced the digit).

    Args:
        histograms: mode -> {"right": counts per bin, "wrong": counts per bin}.
    """
    plt = pyplot()
    modes = [m for m in histograms if any(histograms[m].get(k) for k in ("right", "wrong"))]
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(3.6 * max(len(modes), 1), 3.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for name, colour in (("right", "tab:green"), ("wrong", "tab:red")):
            counts = list(histograms[mode].get(name) or [])
            total = sum(counts)
            if total:
                ax.bar([k + (0.2 if name == "wrong" else -0.2) for k in range(len(counts))], [c / total for c in counts],
                       width=0.4, color=colour, label=f"{name} digits (n={total})")
        ax.set_title(f"mode {mode}")
        ax.set_xlabel("confidence bin")
        ax.set_ylabel("share of digits")
        ax.legend(fontsize=7)
    return _save(plt, fig, path, suptitle=title)


__all__ = [
    "ablation_bars",
    "bin_colour",
    "confidence_html",
    "confidence_png",
    "digit_bins",
    "learning_curves",
    "loss_curves",
    "reliability_diagram",
]
