"""Where metrics go: metrics.jsonl always, TensorBoard / MLflow through accelerate's trackers, loss.png at the end.
Only the main process writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


def tracker_setup(trackers: list[str], work: Path) -> None:
    """MLflow defaults to ./mlruns of the cwd; keep its local file store inside the run's work folder instead."""
    if "mlflow" in trackers and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        # mlflow 3 refuses its file store unless opted in; a local folder is what an offline user can keep.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((work / "mlruns").resolve().as_uri())


class MetricsLog:
    """Append-only metrics of one run. On resume the rows past the checkpoint's step are dropped first: the
    interrupted process logged them, and the resumed one logs them again."""

    def __init__(self, accelerator: Any, work: Path, run_name: str, config: dict[str, Any], trackers: list[str],
                 unit: str = "tokens"):
        self.acc, self.main = accelerator, accelerator.is_main_process
        self.path = work / METRICS
        self.trackers = trackers
        # The loop counts targets as "tokens"; a classifier's targets are examples, and its rows say so
        # (tokens_per_s stays: the input tokens the model read, for either kind).
        self.names = {"tokens": unit, "targets_per_s": f"{unit}_per_s"} if unit != "tokens" else {}
        if trackers:
            accelerator.init_trackers(run_name, config=_flat(config))

    def start(self, resumed_step: int | None) -> None:
        if not self.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = [r for r in read_metrics(self.path) if resumed_step is not None and r["step"] <= resumed_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        row = {self.names.get(k, k): v for k, v in row.items()}
        if self.trackers:
            self.acc.log({k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}, step=row["step"])
        if self.main:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.trackers:
            self.acc.end_training()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file in order; [] when it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(metrics: Path, png: Path) -> Path | None:
    """Train loss per step and eval loss per evaluation, one figure; None when there is nothing to plot."""
    rows = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per target token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Trackers take flat scalar hyperparameters: {'train': {'seed': 1}} -> {'train.seed': 1}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        elif isinstance(value, int | float | str | bool) or value is None:
            out[name] = value if value is not None else "null"
        else:
            out[name] = str(value)
    return out
