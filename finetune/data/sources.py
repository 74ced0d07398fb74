"""Read rows (dicts) lazily from local files, globs, folders or hub datasets, with errors that name file and line.

Everything here is a generator, so streaming keeps memory flat; the non-streaming path simply materialises it.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config.data import ColumnsConfig, DataConfig, SourceConfig
from finetune.errors import DataError

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt")
Row = tuple[dict[str, Any], str]  # the row and where it came from ("file:line"), for error messages


@dataclass
class BadRows:
    """Counts rows skipped under on_bad_rows=skip; raises under on_bad_rows=error."""

    policy: str = "error"
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def report(self, message: str) -> None:
        if self.policy == "error":
            raise DataError(f"{message}. Fix the row, or set data.on_bad_rows: skip to skip and count such rows.")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)


def normalise_sources(value: str | list[SourceConfig] | None, cfg: DataConfig) -> list[SourceConfig]:
    """`train: file` is shorthand for one source; per-source format/columns default to the data section's."""
    if value is None:
        return []
    items = [SourceConfig(path=value)] if isinstance(value, str) else list(value)
    return [s.model_copy(update={"format": s.format if s.format != "auto" else cfg.format,
                                 "columns": s.columns or cfg.columns}) for s in items]


def source_name(src: SourceConfig) -> str:
    """How messages name a source: its path, or `hub[subset:split]`."""
    return src.path if src.path is not None else f"{src.hub}[{src.subset or ''}:{src.split}]"


def source_columns(src: SourceConfig) -> ColumnsConfig:
    """The columns of a source that went through normalise_sources (which always fills them in)."""
    assert src.columns is not None
    return src.columns


def expand_files(path: str) -> list[Path]:
    """A file, a glob, or a folder (all supported files below it, sorted so the order is stable)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
    elif any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise DataError(f"data: no data files found at '{path}' (looked in {p.resolve()}); supported: {', '.join(SUFFIXES)}")
    bad = [f for f in files if f.suffix not in SUFFIXES]
    if bad:
        raise DataError(f"data: {bad[0]} has an unsupported extension; supported: {', '.join(SUFFIXES)}")
    return files


def iter_source(src: SourceConfig, bad: BadRows, streaming: bool) -> Iterator[Row]:
    """(row, where it came from) of every row of a source: its local files in sorted order, or a hub dataset.
    Malformed rows go to `bad` (which raises or counts them); DataError when no file is found or one is unreadable."""
    if src.hub is not None:
        yield from _iter_hub(src, streaming)
        return
    assert src.path is not None
    for f in expand_files(src.path):
        yield from READERS[f.suffix](f, bad)


def source_fingerprint(src: SourceConfig) -> str:
    """Content hash of the files (or the hub dataset's own fingerprint), for the preprocessing cache."""
    h = hashlib.sha256(json.dumps(src.model_dump(), sort_keys=True).encode())
    if src.path is not None:
        for f in expand_files(src.path):
            h.update(str(f).encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    else:
        h.update(str(getattr(_load_hub(src, streaming=False), "_fingerprint", "")).encode())
    return h.hexdigest()


def _lines(p: Path, bad: BadRows, blank_bad: bool = False) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file; a line that is not UTF-8 is a bad row, not a crash (reported,
    then skipped, or given as an empty line when `blank_bad`, so a CSV reader keeps counting lines right)."""
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM at the start is no content
            except UnicodeDecodeError as exc:
                bad.report(f"{p}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                           "save the file as UTF-8")
                if blank_bad:
                    yield lineno, "\n"
                continue
            yield lineno, text


def _read_jsonl(p: Path, bad: BadRows) -> Iterator[Row]:
    for lineno, line in _lines(p, bad):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.report(f"{p}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(row, dict):
            bad.report(f"{p}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            continue
        yield row, f"{p}:{lineno}"


def _read_json(p: Path, bad: BadRows) -> Iterator[Row]:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if raw.lstrip().startswith(b"{") and b"\n" in raw.strip():  # JSON lines saved as .json: skip the bad line
            yield from _read_jsonl(p, bad)
            return
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the file as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{") and exc.lineno > 1:  # JSON lines saved as .json
            yield from _read_jsonl(p, bad)
            return
        raise DataError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data, 1):
        if isinstance(row, dict):
            yield row, f"{p}: item {i}"
        else:
            bad.report(f"{p}: item {i} is a {type(row).__name__}, expected an object")


def _read_csv(p: Path, bad: BadRows) -> Iterator[Row]:
    lines = (text for _, text in _lines(p, bad, blank_bad=True))
    reader = csv.DictReader(lines, delimiter="\t" if p.suffix == ".tsv" else ",")
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{p}:{reader.line_num}: not readable as CSV ({exc})") from None
        columns = len(reader.fieldnames or [])
        if None in row:  # more cells than header columns
            bad.report(f"{p}:{reader.line_num}: {columns + len(row[None])} cells for {columns} columns")
            continue
        if None in row.values():  # fewer cells: DictReader fills the missing ones with None
            cells = sum(v is not None for v in row.values())
            bad.report(f"{p}:{reader.line_num}: {cells} cell{'s' if cells != 1 else ''} for {columns} columns "
                       f"({', '.join(reader.fieldnames or [])})")
            continue
        yield dict(row), f"{p}:{reader.line_num}"


def _read_parquet(p: Path, bad: BadRows) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=1024)
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield row, f"{p}: row {n}"
    except (pa.ArrowException, OSError) as exc:
        after = f" after row {n}" if n else ""
        bad.report(f"{p}: cannot read the parquet file{after} (corrupt or not parquet: {exc})")


def _read_txt(p: Path, bad: BadRows) -> Iterator[Row]:
    """One row per block of text separated by blank lines (a paragraph or a document)."""
    block: list[str] = []
    start = 1
    for lineno, line in _lines(p, bad):
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            yield {"text": "".join(block).rstrip("\n")}, f"{p}:{start}"
            block = []
    if block:
        yield {"text": "".join(block).rstrip("\n")}, f"{p}:{start}"


READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv,
           ".parquet": _read_parquet, ".txt": _read_txt}


def _load_hub(src: SourceConfig, streaming: bool) -> Any:
    import datasets

    try:
        return datasets.load_dataset(src.hub, src.subset, split=src.split, streaming=streaming)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError...)
        raise DataError(
            f"data: could not load hub dataset '{src.hub}' (subset={src.subset}, split={src.split}): {exc}. Offline, "
            "only datasets already in the local cache load (HF_DATASETS_OFFLINE=1)."
        ) from None


def _iter_hub(src: SourceConfig, streaming: bool) -> Iterator[Row]:
    name = source_name(src)
    for i, row in enumerate(_load_hub(src, streaming), 1):
        yield dict(row), f"{name} row {i}"
