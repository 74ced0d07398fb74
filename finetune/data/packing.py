"""Pack examples into rows of at most max_seq_len tokens without letting them see each other.

A packed row keeps `seq_lens` (the length of each example in it); the collator turns that into position ids that
restart per example and a block-diagonal causal mask. The first label of each example is masked: in a packed row
it would otherwise be predicted from the previous example's last token.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from typing import Any

from finetune.data.chat import IGNORE

Example = dict[str, Any]


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Best-fit decreasing: longest first, each into the fullest row it still fits in (efficiency near 100%)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        n = len(examples[i]["input_ids"])
        j = bisect_left(free, (n, -1))
        if j < len(free):
            space, r = free.pop(j)
        else:
            space, r = max_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - n > 0:
            insort(free, (space - n, r))
    return [merge([examples[i] for i in members]) for members in rows]


def pack_stream(examples: Iterable[Example], max_len: int) -> Iterator[Example]:
    """Greedy, in order: for streaming, where we cannot look ahead."""
    row: list[Example] = []
    used = 0
    for ex in examples:
        n = len(ex["input_ids"])
        if row and used + n > max_len:
            yield merge(row)
            row, used = [], 0
        row.append(ex)
        used += n
    if row:
        yield merge(row)


def merge(members: list[Example]) -> Example:
    """One packed row of `members`: their ids back to back, `seq_lens`, and each member's first label masked (in the row
    it would be predicted from the previous member's last token)."""
    ids: list[int] = []
    labels: list[int] = []
    for ex in members:
        ids.extend(ex["input_ids"])
        labels.append(IGNORE)
        labels.extend(ex["labels"][1:])
    return {"input_ids": ids, "labels": labels, "seq_lens": [len(ex["input_ids"]) for ex in members]}


def efficiency(rows: list[Example], max_len: int) -> float:
    """Share of real (non-pad) tokens in rows padded to max_len."""
    return sum(len(r["input_ids"]) for r in rows) / max(1, len(rows) * max_len)
