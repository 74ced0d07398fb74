"""Eval rows -> examples, read and normalised by the training data stage itself (same readers, formats, columns,
system prompt), so eval sees the rows as training saw them.

prompt/completion and instruction rows: the completion is the reference. chat rows: the last assistant message is
the reference and the messages before it the prompt. preference rows: the chosen answer is the reference. classification rows: text and label. text rows: loss only.
This is the one module of the eval stage that knows the data stage's API."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.config.data import DataConfig
from finetune.data.formats import detect_format, normalise
from finetune.data.sources import BadRows, iter_source, normalise_sources, source_fingerprint
from finetune.errors import DataError

if TYPE_CHECKING:
    from finetune.config.data import DataConfig, Sources

Record = dict[str, Any]


@dataclass
class Example:
    """One eval row: its canonical record, where it came from, and its reference (the expected answer text or class
    index; None for text rows, which are scored by loss only)."""

    record: Record  # the data stage's canonical record: kind text | pair | chat | cls
    where: str  # file:line, for error messages
    reference: str | int | None  # completion text, class index, or None (text rows: loss only)


@dataclass
class EvalSet:
    """The rows one eval run scores: their sources, format ("mixed" when several), the examples kept (max_samples),
    the row count before that cap, and a hash of the sources' contents."""

    paths: list[str]
    format: str
    examples: list[Example]
    rows_total: int
    file_sha256: str

    @property
    def fingerprint(self) -> str:
        """Hash of the examples actually evaluated (after --max-samples): equal fingerprints, equal prompts."""
        blob = json.dumps([e.record for e in self.examples], sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def generative(self) -> bool:
        """True when every example has a reference answer to generate (pair, chat or preference records)."""
        return all(e.record["kind"] in ("pair", "chat", "preference") for e in self.examples)


def data_config(job_data: DataConfig | None, path: str) -> DataConfig:
    """The job's data settings (columns, system prompt, max_seq_len...), or defaults for an adapter without a job."""

    return job_data if job_data is not None else DataConfig(train=path)


def load_eval_set(value: Sources, cfg: DataConfig, labels: list[str] | None, max_samples: int | None = None) -> EvalSet:
    """Every row of `value` (a file, glob, folder, or the job's list of sources), up to max_samples in all."""

    sources = normalise_sources(value, cfg)
    examples: list[Example] = []
    formats: list[str] = []
    total = 0
    for src in sources:
        rows = list(iter_source(src, BadRows("error"), streaming=False))
        if not rows:
            raise DataError(f"{src.path or src.hub}: holds no rows to evaluate")
        total += len(rows)
        fmt = _format(src, rows[0])
        formats.append(fmt)
        for row, where in rows[: None if max_samples is None else max(0, max_samples - len(examples))]:
            examples.append(_example(row, fmt, src, cfg, labels, where))
    digest = hashlib.sha256("".join(source_fingerprint(s) for s in sources).encode()).hexdigest()
    fmt = formats[0] if len(set(formats)) == 1 else "mixed"
    return EvalSet([str(s.path or s.hub) for s in sources], fmt, examples, total, digest)


def _format(src: Any, first: tuple[dict[str, Any], str]) -> str:
    if src.format == "auto":
        return detect_format(first[0], where=first[1], cols=src.columns)
    cols = src.columns
    if src.format != "preference" and first[0].get(cols.chosen) is not None and first[0].get(cols.rejected) is not None:
        return "preference"  # pairs scoring an adapter trained on another format (e.g. the SFT stage before DPO)
    return str(src.format)


def _example(row: dict[str, Any], fmt: str, src: Any, cfg: DataConfig, labels: list[str] | None, where: str) -> Example:
    record = normalise(row, fmt, cols=src.columns, where=where, system=cfg.system_prompt)  # MissingField names file, line and field
    if record["kind"] == "pair":
        return Example(record, where, record["completion"])
    if record["kind"] == "chat":
        return _chat_example(record, where)
    if record["kind"] == "preference":  # generation is scored against the chosen answer
        chosen = record["chosen"]
        return Example(record, where, chosen["completion"] if chosen["kind"] == "pair" else chosen["messages"][-1]["content"])
    if record["kind"] == "cls":
        return Example(record, where, label_index(record["label"], labels, where))
    return Example(record, where, None)


def _chat_example(record: Record, where: str) -> Example:
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    if last == 0:
        raise DataError(f"{where}: the assistant message has no prompt before it")
    reference = messages[last].get("content")
    if not isinstance(reference, str):
        raise DataError(f"{where}: the last assistant message has no text 'content' to compare outputs with")
    return Example({"kind": "chat", "messages": messages[: last + 1]}, where, reference)


def label_index(label: Any, labels: list[str] | None, where: str) -> int:
    """The class index of `label` (a class name, or an index in range); DataError naming `where` and the classes."""
    names = labels or []
    if isinstance(label, str) and label in names:
        return names.index(label)
    if isinstance(label, int) and not isinstance(label, bool) and (not names or 0 <= label < len(names)):
        return label
    raise DataError(f"{where}: label {label!r} is not one of the adapter's classes {names}; use a class name or its index")
