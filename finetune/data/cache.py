"""The preprocessing cache: tokenized examples stored under a fingerprint of data + data config + tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from finetune import files
from finetune.config.data import DataConfig
from finetune.data.table import ExampleTable
from finetune.errors import FinetuneError

KIND = "data-cache"
ENCODING_VERSION = "3"  # bump when the encoding of examples changes, so old caches are not reused


def fingerprint(cfg: DataConfig, tok: Any, task: str, source_hashes: list[str]) -> str:
    """The cache key (16 hex digits): encoding version, task, the data config (less the cache location and
    padding_free, which leave the examples as they are), the sources' hashes and the tokenizer's."""
    h = hashlib.sha256(ENCODING_VERSION.encode())
    h.update(task.encode())
    h.update(json.dumps(cfg.model_dump(exclude={"cache", "cache_dir", "padding_free"}), sort_keys=True, default=str).encode())
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
    """data.cache_dir, else the data/ folder of finetune's cache root."""
    return Path(cfg.cache_dir) if cfg.cache_dir else files.cache_root() / "data"


def load(cfg: DataConfig, fp: str) -> dict[str, Any] | None:
    """The cached {train, validation, stats, labels} under `fp`; None when missing or damaged (then it is rebuilt)."""
    folder = cache_root(cfg) / fp
    try:
        meta = json.loads((folder / "meta.json").read_text())
        train = ExampleTable.load(folder / "train.npz")
        val = ExampleTable.load(folder / "validation.npz") if (folder / "validation.npz").exists() else None
    except (OSError, ValueError, KeyError):
        return None  # missing or damaged: rebuild
    return {**meta, "train": train, "validation": val}


def save(cfg: DataConfig, fp: str, train: ExampleTable, val: ExampleTable | None, meta: dict[str, Any]) -> None:
    """Written whole or not at all (finetune.files.atomic_dir), so a crash never leaves a half cache that would be
    trusted. A cache that cannot be written (read-only disk) is not fatal: the next run tokenizes again."""
    try:
        with files.atomic_dir(cache_root(cfg) / fp, KIND, overwrite=True) as tmp:
            train.save(tmp / "train.npz")
            if val is not None:
                val.save(tmp / "validation.npz")
            files.write_json(tmp / "meta.json", meta)
    except (OSError, FinetuneError):
        pass
