"""Streaming: an IterableDataset that reads, tokenizes (and packs) while training, so memory stays flat."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

from torch.utils.data import IterableDataset

from finetune.data.chain import encoded, needs_end_of_turn, records
from finetune.data.chat import check_end_of_turn
from finetune.data.encode import Counts
from finetune.data.mixing import held_out, interleave
from finetune.data.packing import pack_stream
from finetune.data.preference import encoder_for
from finetune.data.sources import BadRows
from finetune.errors import DataError, FinetuneError

Example = dict[str, Any]


class StreamLengthError(FinetuneError, TypeError):
    """A TypeError too, so list()/length hints fall back to iterating, while the CLI prints the message."""


class StreamingExamples(IterableDataset):  # type: ignore[type-arg]
    """Each pass re-reads the sources through `make_iter()`; a shuffle buffer mixes nearby examples, with a
    different order on each pass (seed + pass number), the same order on each run."""

    def __init__(self, make_iter: Callable[[], Iterator[Example]], shuffle_buffer: int = 0, seed: int = 0):
        self.make_iter, self.shuffle_buffer, self.seed = make_iter, shuffle_buffer, seed
        self.passes = 0

    def __iter__(self) -> Iterator[Example]:
        self.passes += 1
        stream = self.make_iter()
        if self.shuffle_buffer <= 1:
            return stream
        return _shuffled(stream, self.shuffle_buffer, random.Random(self.seed + self.passes))

    def __len__(self) -> int:
        # DataLoader asks for a length to size an epoch; a stream has none, so say what to set instead.
        raise StreamLengthError("data.streaming: a stream has no length, so set train.max_steps (the number of optimizer "
                            "steps to run) instead of epochs")

    def __bool__(self) -> bool:
        return True

    def __getitem__(self, index: slice) -> list[Example]:
        """Only slices from the start (e.g. `train[:2]` for a probe batch): the first examples, unshuffled."""
        if not isinstance(index, slice) or index.start not in (None, 0) or index.step not in (None, 1):
            raise TypeError("a streaming dataset supports only [:n]")
        return list(islice(self.make_iter(), index.stop))


def _shuffled(stream: Iterator[Example], size: int, rng: random.Random) -> Iterator[Example]:
    buffer: list[Example] = []
    for ex in stream:
        if len(buffer) < size:
            buffer.append(ex)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = ex
    rng.shuffle(buffer)
    yield from buffer


def streaming_bundle_parts(cfg: Any, tok: Any, plan: Any) -> tuple[StreamingExamples, Any, dict[str, Any], list[str] | None]:
    """Train (and validation) as lazy streams. The stats dict is updated in place as the stream is read, so the
    counts saved at the end of training (run.json) are those of what was actually trained on."""
    if plan.format == "classification" and not cfg.labels:
        raise DataError("data.streaming with classification data needs data.labels (the class names, in order), since "
                        "the labels cannot be collected from a stream before training")
    labels = list(cfg.labels) if plan.format == "classification" else None
    encoder = encoder_for(cfg, tok, plan.chat, labels, plan.format)
    stats: dict[str, Any] = {"format": plan.format, "chat_template": plan.chat, "streaming": True, "max_seq_len": cfg.max_seq_len}

    def examples(sources: list[Any], role: str) -> Iterator[Example]:
        bad, counts = BadRows(cfg.on_bad_rows), [Counts() for _ in sources]
        used = [0] * len(sources)
        streams = [encoded(records(s, cfg, bad, True), encoder, c) for s, c in zip(sources, counts, strict=True)]
        for i, ex in enumerate(interleave(streams, [s.weight for s in sources], cfg.seed, used)):
            if role == "train" and i % 1000 == 0:
                _live(stats, counts, bad)
            if role == "files" or not cfg.val_size or held_out(i, cfg.val_size, cfg.seed) == (role == "validation"):
                yield ex
        if role == "train":
            _live(stats, counts, bad)

    def train_iter() -> Iterator[Example]:
        stream = examples(plan.train, "train")
        return pack_stream(stream, cfg.max_seq_len) if cfg.packing else stream

    first = list(islice(examples(plan.train, "train"), 100))
    if not first:
        raise DataError("data: the training stream yields no example (empty, or every example dropped); check the data")
    if needs_end_of_turn(plan):
        check_end_of_turn(tok, first, "data.train")
    train = StreamingExamples(train_iter, cfg.shuffle_buffer, cfg.seed)
    return train, _validation(cfg, plan, examples), stats, labels


def _validation(cfg: Any, plan: Any, examples: Callable[..., Iterator[Example]]) -> Any:
    if plan.validation:
        return StreamingExamples(lambda: examples(plan.validation, "files"))
    if not cfg.val_size:
        return None
    if cfg.val_size >= 1:  # the first N examples: small, so kept in memory
        return list(islice(examples(plan.train, "validation"), int(cfg.val_size)))
    return StreamingExamples(lambda: examples(plan.train, "validation"))


def _live(stats: dict[str, Any], counts: list[Any], bad: Any) -> None:
    for name in ("rows", "examples", "truncated", "dropped_too_long", "dropped_no_target", "tokens", "trained_tokens"):
        stats[name] = sum(getattr(c, name) for c in counts)
    stats["bad_rows"] = bad.count
