"""Metrics shipped as `evaluate` modules inside the package and loaded by path: `evaluate.load("accuracy")` fetches
its script from the hub and fails offline, a path does not.

Each module is one file here; `_text.py` holds the text normalisation they share (imported absolutely, which
`evaluate` treats as an installed library).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

METRICS_DIR = Path(__file__).parent
GENERATION = ("exact_match", "token_f1", "rouge_l", "chrf")


def available() -> list[str]:
    """The names of the shipped metric modules."""
    return sorted(p.stem for p in METRICS_DIR.glob("*.py") if not p.stem.startswith("_"))


def metric_path(name: str) -> Path:
    """The module file of a shipped metric; an unknown name lists the available ones."""
    path = METRICS_DIR / f"{name}.py"
    if name.startswith("_") or not path.is_file():
        raise FinetuneError(f"unknown metric '{name}'; available: {', '.join(available())}")
    return path


@cache  # loading copies and imports the script; a loaded module computes any number of times
def load_metric(name: str) -> Any:
    """The `evaluate` module of that name, loaded from this folder (works offline)."""
    import evaluate

    return evaluate.load(str(metric_path(name)))
