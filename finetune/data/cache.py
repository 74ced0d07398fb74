"""The preprocessing cache: tokenized examples stored under a fingerprint of data + data config + tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from finetune.config.data import DataConfig
from finetune.data.table import ExampleTable

ENCODING_VERSION = "3"  # bump when the encoding of examples changes, so old caches are not reused


def fingerprint(cfg: DataConfig, tok: Any, task: str, source_hashes: list[str]) -> str:
    h = hashlib.sha256(ENCODING_VERSION.encode())
    h.update(task.encode())
    h.update(json.dumps(cfg.model_dump(exclude={"cache", "cache_dir"}), sort_keys=True, default=str).encode())
    for s in source_hashes:
        h.update(s.encode())
    h.update(tokenizer_hash(tok).encode())
    return h.hexdigest()[:16]


def tokenizer_hash(tok: Any) -> str:
    """Vocabulary, merges, normaliser and special tokens (the backend JSON), plus the chat template."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True).encode())
    h.update(str(getattr(tok, "chat_template", None)).encode())
    h.update(json.dumps(tok.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    if os.environ.get("FINETUNE_CACHE"):
        return Path(os.environ["FINETUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "finetune" / "data"


def load(cfg: DataConfig, fp: str) -> dict[str, Any] | None:
    folder = cache_root(cfg) / fp
    try:
        meta = json.loads((folder / "meta.json").read_text())
        train = ExampleTable.load(folder / "train.npz")
        val = ExampleTable.load(folder / "validation.npz") if (folder / "validation.npz").exists() else None
    except (OSError, ValueError, KeyError):
        return None  # missing or damaged: rebuild
    return {**meta, "train": train, "validation": val}


def save(cfg: DataConfig, fp: str, train: ExampleTable, val: ExampleTable | None, meta: dict[str, Any]) -> None:
    """Written to a temporary folder and renamed, so a crash never leaves a half cache that would be trusted."""
    root = cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{fp}-"))
    try:
        train.save(tmp / "train.npz")
        if val is not None:
            val.save(tmp / "validation.npz")
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True, indent=1))
        os.replace(tmp, root / fp)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race, or the disk is read-only: not fatal
