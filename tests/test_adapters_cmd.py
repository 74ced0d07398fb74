"""`finetune adapters list`: one row per adapter folder, from metadata only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.cli import main


def _adapter(root: Path, name: str, r: int, run: dict | None = None, eval_metrics: dict | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "base_model_name_or_path": "org/base", "task_type": "CAUSAL_LM"}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 250_000)
    if run is not None:
        (folder / "run.json").write_text(json.dumps(run))
    if eval_metrics is not None:
        evals = {k: {"base": 0.1, "adapter": v, "delta": v - 0.1, "better": "higher"} for k, v in eval_metrics.items()}
        (folder / "eval.json").write_text(json.dumps({"metrics": evals}))  # the shape `finetune eval` writes
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    _adapter(root, "b-run", 8, {"task": "causal_lm", "created": "2026-11-20T10:00:00+00:00", "metrics": {"train_loss": 1.23456}},
             {"accuracy": 0.9})
    _adapter(root, "a-run", 16, {"task": "classification", "created": "2026-11-21T11:30:00+00:00", "metrics": {"train_loss": 0.5}})
    _adapter(root, "c-bare", 4)  # trained elsewhere: no run.json
    full = root / "d-full"  # full fine-tuning (lora.enabled: false) saves a whole model folder
    full.mkdir()
    (full / "config.json").write_text("{}")
    (full / "run.json").write_text(json.dumps({"task": "causal_lm", "base_model": "org/base", "metrics": {"train_loss": 2.0}}))
    (root / ".work").mkdir()  # training scratch space is not an adapter
    (root / "notes.txt").write_text("x")
    return root


def test_json_rows(root: Path, capsys) -> None:
    assert main(["adapters", "list", "--dir", str(root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["a-run", "b-run", "c-bare", "d-full"]
    assert rows[3]["rank"] == "full" and rows[3]["base"] == "org/base"
    assert rows[0] == {"name": "a-run", "base": "org/base", "task": "classification", "rank": 16, "size": "0.25 MB",
                       "key metric": "train_loss=0.5", "created": "2026-11-21 11:30"}
    assert rows[1]["key metric"] == "accuracy=0.9"  # an eval metric wins over the training loss
    assert rows[2]["created"] == "?" and rows[2]["key metric"] == "-" and rows[2]["task"] == "causal_lm"


def test_table(root: Path, capsys) -> None:
    assert main(["adapters", "list", "--dir", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "base", "task", "rank", "size", "key", "metric", "created"]
    assert set(lines[1]) <= {"-", " "} and len(lines) == 6
    assert lines[3].split()[:4] == ["b-run", "org/base", "causal_lm", "8"]


def test_missing_folder_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["adapters", "list", "--dir", str(tmp_path / "nope")]) == 1
    assert "adapters folder not found" in capsys.readouterr().err
