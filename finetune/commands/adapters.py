"""`finetune adapters list [--dir adapters]`: one row per adapter folder, read from its metadata (no torch)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.files import is_hidden, recover

HELP = "List the adapters under adapters/ (name, base, task, rank, size, key metric, created)."
COLUMNS = ("name", "base", "task", "rank", "size", "key metric", "created")
# Preferred metric to show, first found wins: held-out quality before training loss.
KEY_METRICS = ("accuracy", "f1", "exact_match", "eval_loss", "val_loss", "validation_loss", "train_loss")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list"], help="What to do (list).")
    parser.add_argument("--dir", default="adapters", help="Folder holding adapter folders (default: adapters).")
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON instead of a table.")


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise FinetuneError(f"adapters folder not found: {root.resolve()} (train one with `finetune train JOB.yaml`, or pass --dir)")
    recover_all(root)
    rows = [adapter_row(p) for p in sorted(root.iterdir()) if not is_hidden(p) and _is_output(p)]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no adapters in {root.resolve()}")
    else:
        print(format_table(rows))
    return 0


def recover_all(root: Path) -> None:
    """Put back adapters whose overwrite a crash interrupted (finetune.files.recover), before listing."""
    for old in root.glob(".*.old-*"):
        recover(root / old.name[1:].rsplit(".old-", 1)[0])


def _is_output(folder: Path) -> bool:
    """An adapter folder, or a whole model saved by full fine-tuning (lora.enabled: false) with its run.json."""
    return (folder / "adapter_config.json").is_file() or ((folder / "config.json").is_file() and (folder / "run.json").is_file())


def adapter_row(folder: Path) -> dict[str, Any]:
    """One row of `finetune adapters list`: name, base (long paths shortened), task, LoRA rank ("full" for full
    fine-tuning), size on disk, key metric and when it was created."""
    cfg = _read_json(folder / "adapter_config.json")
    run = _read_json(folder / "run.json")
    full = not cfg  # full fine-tuning: no adapter config, the whole model is in the folder
    task = run.get("task") or ("classification" if cfg.get("task_type") == "SEQ_CLS" else "causal_lm")
    base = str(cfg.get("base_model_name_or_path") or run.get("base_model") or "?")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"name": folder.name, "base": _short(base), "task": task, "rank": "full" if full else cfg.get("r"),
            "size": f"{size / 1e6:.2f} MB", "key metric": key_metric(folder, run),
            "created": str(run.get("created") or "?").replace("T", " ")[:16]}


def key_metric(folder: Path, run: dict[str, Any]) -> str:
    """The first of KEY_METRICS found as a number, as `name=value` (eval.json's adapter-side values before run.json's
    metrics); "-" when none."""
    metrics = dict(run.get("metrics") or {})
    evals = _read_json(folder / "eval.json").get("metrics")  # `finetune eval`: name -> {base, adapter, delta}
    if isinstance(evals, dict):
        metrics.update({k: v.get("adapter") for k, v in evals.items() if isinstance(v, dict)})
    for name in KEY_METRICS:
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{name}={value:.4g}"
    return "-"


def format_table(rows: list[dict[str, Any]]) -> str:
    """`rows` as a plain-text table: COLUMNS as header, a dashed rule, each column as wide as its widest cell."""
    cells = [list(COLUMNS)] + [[str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short(base: str, width: int = 40) -> str:
    """Hub ids stay whole; a long local path keeps its tail, where the model name is."""
    return base if len(base) <= width else "..." + base[-(width - 3):]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
