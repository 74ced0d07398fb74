"""Every YAML shipped under configs/ parses (recursively): job configs strictly, accelerate configs as YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ALL = sorted((ROOT / "configs").rglob("*.yaml"))
JOBS = [p for p in ALL if "accelerate" not in p.parts]
ACCELERATE = [p for p in ALL if "accelerate" in p.parts]


def test_there_are_shipped_configs() -> None:
    assert JOBS, "configs/ holds no job config"


@pytest.mark.parametrize("path", JOBS, ids=[str(p.relative_to(ROOT)) for p in JOBS])
def test_job_config_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # shipped configs use paths relative to the repo root
    load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "finetune" in first, "first line must be a comment with the command that runs it"


@pytest.mark.parametrize("path", ACCELERATE, ids=[str(p.relative_to(ROOT)) for p in ACCELERATE])
def test_accelerate_config_parses(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and "distributed_type" in data
