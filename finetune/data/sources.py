"""Read local data files into rows (dicts), with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.errors import DataError


def read_rows(path: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p.resolve()}")
    if p.suffix == ".json":
        return _read_json(p)
    return list(_read_jsonl(p))


def _read_jsonl(p: Path) -> Iterator[dict[str, Any]]:
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}). Fix or remove that line.") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            yield row


def _read_json(p: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{p}: expected a JSON list of objects")
    return data
