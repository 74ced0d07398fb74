"""Build the tokenized train/validation sets the training loop consumes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.config.data import DataConfig
from finetune.data.collate import PadCollator
from finetune.data.formats import IGNORE, detect_format, encode_row
from finetune.data.sources import read_rows
from finetune.errors import DataError
from finetune.prompting import uses_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class DataBundle:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]] | None
    collator: PadCollator
    fingerprint: str
    format: str
    chat: bool  # whether prompts go through the chat template (inference must do the same)
    stats: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None  # class names, for classification


def build_data(cfg: DataConfig, tok: PreTrainedTokenizerBase, task: str = "causal_lm") -> DataBundle:
    rows = read_rows(cfg.train)
    if not rows:
        raise DataError(f"data.train: {cfg.train} holds no rows")
    fmt = cfg.format if cfg.format != "auto" else detect_format(rows[0], f"{cfg.train}: row 1")
    chat = fmt == "chat" or uses_chat_template(tok, cfg.use_chat_template)
    if chat and not getattr(tok, "chat_template", None):
        raise DataError("the data needs a chat template but the tokenizer has none: set model.chat_template (e.g. chatml)")
    stats: dict[str, Any] = {"format": fmt, "chat_template": chat}
    train = _encode_all(tok, rows, fmt, chat, cfg, cfg.train, stats)
    val = None
    if cfg.validation:
        val = _encode_all(tok, read_rows(cfg.validation), fmt, chat, cfg, cfg.validation, {})
    _check_eos_trained(tok, train[0], cfg.train)
    return DataBundle(train, val, PadCollator(tok.pad_token_id), fingerprint(cfg, tok), fmt, chat, stats)


def _encode_all(tok: Any, rows: list[dict[str, Any]], fmt: str, chat: bool, cfg: DataConfig, path: str, stats: dict[str, Any]) -> list[dict[str, Any]]:
    out, truncated = [], 0
    for i, row in enumerate(rows, 1):
        ex = encode_row(tok, row, fmt, chat, f"{path}: row {i}")
        if len(ex["input_ids"]) > cfg.max_seq_len:
            truncated += 1
            ex = {k: v[: cfg.max_seq_len] for k, v in ex.items()}
        if any(label != IGNORE for label in ex["labels"][1:]):
            out.append(ex)
    if not out:
        raise DataError(f"{path}: no example has any token to train on after formatting and truncation")
    stats.update(rows=len(rows), examples=len(out), truncated=truncated, tokens=sum(len(e["input_ids"]) for e in out))
    return out


def _check_eos_trained(tok: Any, example: dict[str, Any], path: str) -> None:
    if tok.eos_token_id not in example["labels"]:
        raise DataError(
            f"{path}: the EOS token ({tok.eos_token!r}) is not among the trained tokens of the first example, so the "
            "model would never learn to stop. The chat template must end assistant turns with EOS, or raise "
            "data.max_seq_len if the example was truncated."
        )


def fingerprint(cfg: DataConfig, tok: Any) -> str:
    """Hash of the data files, the data config and the tokenizer: equal fingerprints mean equal token streams."""
    h = hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode())
    for path in filter(None, [cfg.train, cfg.validation]):
        h.update(Path(path).read_bytes())
    h.update(json.dumps({"vocab": len(tok), "template": getattr(tok, "chat_template", None), "name": tok.name_or_path}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
