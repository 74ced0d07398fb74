"""eval.png: base vs adapter as grouped bars; scores in [0, 1] on one panel, losses on another (their scales differ),
and lm-evaluation-harness scores in [0, 1] on a third, with their standard errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.evaluation.harness import rows as harness_rows

LOSSES = ("loss", "general_loss")


def bar_chart(report: dict[str, Any], path: Path) -> Path:
    """Draw eval.png of `report` at `path` and return it: base vs adapter bars, one panel each for scores in [0, 1],
    losses, and harness scores with their standard errors."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    metrics = {n: m for n, m in report["metrics"].items() if "delta" in m}
    metrics.update(_harness_scores(report.get("harness")))
    scores = [n for n, m in metrics.items() if m["better"] == "higher" and not n.startswith("harness ")]
    losses = [n for n in LOSSES if n in metrics]
    harness = [n for n in metrics if n.startswith("harness ")]
    panels = [(names, title) for names, title in ((scores, "scores (higher is better)"), (losses, "loss (lower is better)"),
                                                  (harness, "lm-evaluation-harness (± stderr)")) if names]
    if not panels:
        panels = [([], "no scalar metric")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 1.3 * sum(len(p[0]) for p in panels), 4), squeeze=False)
    for ax, (names, title) in zip(axes[0], panels, strict=True):
        _panel(ax, names, metrics, title)
    fig.suptitle(f"{Path(report['adapter']).name}: base vs {_side_name(report)}{_evaluated(report)}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _side_name(report: dict[str, Any]) -> str:
    return "fine-tuned" if report.get("kind") == "fully fine-tuned model" else "adapter"


def _evaluated(report: dict[str, Any]) -> str:
    return f" ({report['data']['evaluated']} examples)" if report.get("data") else ""


def _harness_scores(section: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Harness metrics that live in [0, 1] (accuracy, exact match...); perplexities stay in the tables."""
    if not section:
        return {}
    return {f"harness {task}\n{metric}": m for task, metric, m in harness_rows(section)
            if 0 <= m["base"] <= 1 and 0 <= m["adapter"] <= 1 and m["better"] == "higher"}


def _panel(ax: Any, names: list[str], metrics: dict[str, Any], title: str) -> None:
    xs = range(len(names))
    for offset, side, color in ((-0.2, "base", "#9aa5b1"), (0.2, "adapter", "#2f6fde")):
        values = [metrics[n][side] for n in names]
        errors = [metrics[n].get(f"{side}_stderr") or 0.0 for n in names]
        bars = ax.bar([x + offset for x in xs], values, width=0.4, label=side, color=color,
                      yerr=errors if any(errors) else None, capsize=3)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(list(xs), [n.removeprefix("harness ") for n in names], rotation=20, ha="right")
    if names and names[0] not in LOSSES:
        ax.set_ylim(0, 1.08)  # scores live in [0, 1]: a fixed axis keeps small gains small
    ax.set_title(title, fontsize=10)
    if names:
        ax.legend(fontsize=8)
