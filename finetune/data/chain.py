"""The per-source chain that both builds share, the eager one (finetune.data.build) and the streaming one
(finetune.data.stream): rows -> canonical records -> tokenized examples with loss masks."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

from finetune.config.data import DataConfig, SourceConfig
from finetune.data.encode import Counts, Encoder
from finetune.data.formats import MissingField, Record, normalise
from finetune.data.sources import BadRows, iter_source, source_columns

BATCH = 1000  # records per tokenizer call


def records(src: SourceConfig, cfg: DataConfig, bad: BadRows, streaming: bool) -> Iterator[tuple[Record, str]]:
    """Canonical records of one source with their file:line; a row missing a field is reported to `bad`."""
    for row, where in iter_source(src, bad, streaming):
        try:
            yield normalise(row, src.format, source_columns(src), where, cfg.system_prompt), where
        except MissingField as exc:
            bad.report(str(exc))


def encoded(pairs: Iterator[tuple[Record, str]], encoder: Encoder, counts: Counts) -> Iterator[dict[str, Any]]:
    """Tokenize in batches of BATCH records (one tokenizer call each), lazily."""
    while batch := list(islice(pairs, BATCH)):
        yield from encoder.encode([r for r, _ in batch], [w for _, w in batch], counts)


def needs_end_of_turn(plan: Any) -> bool:
    """Answers must end with a trained EOS; raw text chunks and classification have no answers."""
    return all(s.format in ("chat", "prompt_completion", "instruction", "preference") for s in plan.train)
