"""eval.png: base vs adapter as grouped bars; scores in [0, 1] on one panel, losses on another (their scales differ)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOSSES = ("loss", "general_loss")


def bar_chart(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    metrics = {n: m for n, m in report["metrics"].items() if "delta" in m}
    scores = [n for n, m in metrics.items() if m["better"] == "higher"]
    losses = [n for n in LOSSES if n in metrics]
    panels = [(names, title) for names, title in ((scores, "scores (higher is better)"), (losses, "loss (lower is better)")) if names]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 1.3 * sum(len(p[0]) for p in panels), 4), squeeze=False)
    for ax, (names, title) in zip(axes[0], panels, strict=True):
        _panel(ax, names, metrics, title)
    fig.suptitle(f"{Path(report['adapter']).name}: base vs adapter ({report['data']['evaluated']} examples)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _panel(ax: Any, names: list[str], metrics: dict[str, Any], title: str) -> None:
    xs = range(len(names))
    for offset, side, color in ((-0.2, "base", "#9aa5b1"), (0.2, "adapter", "#2f6fde")):
        values = [metrics[n][side] for n in names]
        bars = ax.bar([x + offset for x in xs], values, width=0.4, label=side, color=color)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    if names and names[0] not in LOSSES:
        ax.set_ylim(0, 1.08)  # scores live in [0, 1]: a fixed axis keeps small gains small
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
