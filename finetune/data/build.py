"""Build the tokenized train/validation sets the training loop consumes: sources -> records -> examples -> mix ->
hold-out -> (packing) -> tables, cached by fingerprint; or, when streaming, the same chain run lazily."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from finetune.config.data import DataConfig, SourceConfig
from finetune.data import cache, mixing, packing
from finetune.data.chain import encoded, needs_end_of_turn, records
from finetune.data.chat import check_end_of_turn
from finetune.data.collate import PackedCollator, PadCollator, PaddingFreeCollator
from finetune.data.encode import Counts, Encoder
from finetune.data.formats import Record, detect_format
from finetune.data.preference import PreferenceCollator, collator_for, encoder_for
from finetune.data.prompting import uses_chat_template
from finetune.data.sources import (
    BadRows,
    iter_source,
    normalise_sources,
    source_columns,
    source_fingerprint,
    source_name,
)
from finetune.data.table import ExampleTable
from finetune.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

@dataclass
class DataBundle:
    """What the data stage hands to training: the train/validation examples, the collator that batches them, the
    cache fingerprint, and what inference must repeat (format, chat template or not, class names)."""

    train: Any  # ExampleTable (map-style), or StreamingExamples (an IterableDataset) when streaming
    validation: Any | None
    collator: PadCollator | PackedCollator | PaddingFreeCollator | PreferenceCollator
    fingerprint: str
    format: str
    chat: bool  # whether prompts go through the chat template (inference must do the same)
    stats: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None  # class names, for classification


@dataclass
class Plan:
    """What was decided before any tokenization: sources with their formats, chat or not, class names."""

    train: list[SourceConfig]
    validation: list[SourceConfig]
    format: str
    chat: bool
    labels: list[str] | None = None


def build_data(cfg: DataConfig, tok: PreTrainedTokenizerBase, task: str = "causal_lm") -> DataBundle:
    """The tokenized train/validation sets of `cfg` for `task` (causal_lm or classification): from the cache when the
    fingerprint matches, built lazily when data.streaming. Raises DataError naming the source (and file:line)."""
    plan = make_plan(cfg, tok, task)
    if cfg.streaming:
        return _streaming_bundle(cfg, tok, plan, task)
    hashes = [source_fingerprint(s) for s in plan.train + plan.validation]
    fp = cache.fingerprint(cfg, tok, task, hashes)
    hit = cache.load(cfg, fp) if cfg.cache else None
    if hit is not None:
        stats = {**hit["stats"], "cache": "hit"}
        return DataBundle(hit["train"], hit["validation"], collator_for(cfg, tok, plan.format, task), fp, plan.format,
                          plan.chat, stats, hit["labels"])
    with _gc_paused():
        train, val, stats = _materialise(cfg, tok, plan)
    if cfg.cache:
        cache.save(cfg, fp, train, val, {"stats": stats, "labels": plan.labels})
    return DataBundle(train, val, collator_for(cfg, tok, plan.format, task), fp, plan.format, plan.chat,
                      {**stats, "cache": "miss"}, plan.labels)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Tokenizing allocates millions of small lists that hold no cycles; the cyclic collector would rescan the
    growing heap again and again (~15% of the time on 20k chats) for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def make_plan(cfg: DataConfig, tok: Any, task: str) -> Plan:
    """Decide before tokenizing: each `auto` source's format from its first row (printed, and set on the source), that
    the formats fit `task` and each other, and whether prompts go through the chat template. Raises DataError."""
    train = normalise_sources(cfg.train, cfg)
    val = normalise_sources(cfg.validation, cfg)
    if val and cfg.val_size:
        raise DataError("data: set either validation (files) or val_size (a hold-out), not both")
    for src in train + val:
        if src.format == "auto":
            _detect(src, cfg)
    formats = sorted({s.format for s in train + val})
    _check_task(formats, task)
    _check_preference(formats, cfg)
    pairs = any(f in ("prompt_completion", "instruction", "preference") for f in formats)
    chat = "chat" in formats or (pairs and uses_chat_template(tok, cfg.use_chat_template))
    if "chat" in formats and cfg.use_chat_template == "never" and pairs:
        raise DataError("data: chat sources need the chat template, so the pair sources would be rendered both ways; "
                        "remove data.use_chat_template: never")
    return Plan(train, val, formats[0] if len(formats) == 1 else "mixed", chat)


def _detect(src: SourceConfig, cfg: DataConfig) -> None:
    bad = BadRows(cfg.on_bad_rows)
    first = next(iter_source(src, bad, streaming=True), None)
    if first is None:
        raise DataError(f"data: {source_name(src)} holds no rows")
    src.format = detect_format(first[0], first[1], source_columns(src))  # type: ignore[assignment]
    print(f"data: {source_name(src)}: detected format '{src.format}' from columns {sorted(first[0])} "
          "(set data.format to override)", file=sys.stderr)


def _check_task(formats: list[Any], task: str) -> None:
    if task == "classification" and formats != ["classification"]:
        raise DataError(f"task classification needs data in the classification format (text + label), got {formats}")
    if task != "classification" and "classification" in formats:
        raise DataError("data in the classification format (text + label) needs task: classification")


def _check_preference(formats: list[Any], cfg: DataConfig) -> None:
    if "preference" not in formats:
        return
    if formats != ["preference"]:
        raise DataError(f"data: preference pairs (chosen/rejected) cannot be mixed with other formats {formats} in one "
                        "job; train them in separate runs (e.g. SFT first, then model.adapter: <that adapter>)")
    if cfg.packing:
        raise DataError("data.packing does not apply to preference pairs (each pair is one example); turn it off")


def _materialise(cfg: DataConfig, tok: Any, plan: Plan) -> tuple[ExampleTable, ExampleTable | None, dict[str, Any]]:
    bad = BadRows(cfg.on_bad_rows)
    rows = [list(records(s, cfg, bad, False)) for s in plan.train]
    val_rows = [list(records(s, cfg, bad, False)) for s in plan.validation]
    plan.labels = cfg.labels or _class_names(rows) if plan.format == "classification" else None
    encoder = encoder_for(cfg, tok, plan.chat, plan.labels, plan.format)
    counts = [Counts() for _ in rows]
    used = [0] * len(rows)
    streams = [encoded(iter(r), encoder, c) for r, c in zip(rows, counts, strict=True)]
    train = list(mixing.interleave(streams, [s.weight for s in plan.train], cfg.seed, used))
    _check_not_empty(train, plan.train, counts, bad)
    val_counts = Counts()
    val = [ex for r in val_rows for ex in encoded(iter(r), encoder, val_counts)]
    if cfg.val_size:
        train, val = mixing.split(train, cfg.val_size, cfg.seed)
    if needs_end_of_turn(plan):
        check_end_of_turn(tok, train[:100], source_name(plan.train[0]))
    stats = _stats(cfg, plan, counts, used, bad, encoder)
    stats.update(train_examples=len(train), validation_examples=len(val))
    if cfg.packing:
        train, val = _pack(cfg, train, val, stats)
    return ExampleTable.from_examples(train), ExampleTable.from_examples(val) if val else None, stats


def _class_names(rows: list[list[tuple[Record, str]]]) -> list[str]:
    values = {r["label"] for src in rows for r, _ in src}
    if all(isinstance(v, int) for v in values):
        return [str(i) for i in range(max(values) + 1)] if values else []
    if any(isinstance(v, int) for v in values):
        raise DataError("data: the label column mixes numbers and names; use one kind, or list the names in data.labels")
    return sorted(str(v) for v in values)


def _check_not_empty(train: list[Any], sources: list[SourceConfig], counts: list[Counts], bad: BadRows) -> None:
    if train:
        return
    detail = "; ".join(f"{source_name(s)}: {c.rows} rows, {c.dropped_too_long} too long, {c.dropped_no_target} "
                       f"with nothing to train after truncation" for s, c in zip(sources, counts, strict=True))
    raise DataError(f"data: no training example left ({detail}; {bad.count} bad rows skipped). "
                    "Raise data.max_seq_len, use data.overlong: truncate, or check the data.")


def _pack(cfg: DataConfig, train: list[Any], val: list[Any], stats: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    if "label" in train[0]:
        raise DataError("data.packing is for causal LM data; turn it off for classification")
    rows = packing.pack(train, cfg.max_seq_len)
    stats.update(packed_rows=len(rows), packing_efficiency=round(packing.efficiency(rows, cfg.max_seq_len), 4))
    return rows, packing.pack(val, cfg.max_seq_len) if val else val


def _stats(cfg: DataConfig, plan: Plan, counts: list[Counts], used: list[int], bad: BadRows, encoder: Encoder) -> dict[str, Any]:
    total = Counts()
    for c in counts:
        for name in ("rows", "examples", "truncated", "dropped_too_long", "dropped_no_target", "tokens", "trained_tokens"):
            setattr(total, name, getattr(total, name) + getattr(c, name))
        total.lengths.update(c.lengths)
    out: dict[str, Any] = {k: getattr(total, k) for k in ("rows", "examples", "truncated", "dropped_too_long",
                                                          "dropped_no_target", "tokens", "trained_tokens")}
    out.update(format=plan.format, chat_template=plan.chat, bad_rows=bad.count, max_seq_len=cfg.max_seq_len,
               length_histogram={f"{k + 1}-{k + 64}": v for k, v in sorted(total.lengths.items())})
    if len(counts) > 1:
        out["sources"] = [{"source": source_name(s), "format": s.format, "weight": s.weight, "examples": c.examples,
                           "used": u} for s, c, u in zip(plan.train, counts, used, strict=True)]
    if encoder.chat_encoder is not None:
        out["chat_mask"] = {"proven_rows": encoder.chat_encoder.proven, "exact_fallbacks": encoder.chat_encoder.fallbacks,
                            "fast_path": encoder.chat_encoder.fast}
    return out


def _streaming_bundle(cfg: DataConfig, tok: Any, plan: Plan, task: str) -> DataBundle:
    from finetune.data.stream import (
        streaming_bundle_parts,  # imports torch (IterableDataset): only when streaming
    )

    train, val, stats, labels = streaming_bundle_parts(cfg, tok, plan)
    fp = cache.fingerprint(cfg, tok, "stream", [str(s.model_dump()) for s in plan.train + plan.validation])
    return DataBundle(train, val, collator_for(cfg, tok, plan.format, task), fp, plan.format, plan.chat, stats, labels)
