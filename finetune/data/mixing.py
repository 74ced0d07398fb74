"""Interleave several sources by weight, and hold out validation examples deterministically (also when streaming)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

from finetune.errors import DataError

Example = dict[str, Any]


def interleave(streams: list[Iterator[Example]], weights: list[float], seed: int, used: list[int]) -> Iterator[Example]:
    """Draw the next example from source i with probability weights[i] / sum(weights); stop when the first source
    runs out (so the mix keeps the asked proportions instead of ending as a tail of one source). `used[i]` counts."""
    if len(streams) == 1:
        for ex in streams[0]:
            used[0] += 1
            yield ex
        return
    rng = random.Random(seed)
    choices = range(len(streams))
    while True:
        i = rng.choices(choices, weights)[0]
        try:
            ex = next(streams[i])
        except StopIteration:
            return
        used[i] += 1
        yield ex


def held_out(index: int, val_size: float, seed: int) -> bool:
    """Streaming hold-out, a pure function of the example's position: a share (<1) by hash, or the first N."""
    if val_size >= 1:
        return index < int(val_size)
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_size


def split(examples: list[Example], val_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Exactly round(share * n) (or N) examples, chosen by a seeded permutation."""
    n = len(examples)
    k = int(val_size) if val_size >= 1 else round(val_size * n)
    if not 0 < k < n:
        raise DataError(f"data.val_size={val_size} would hold out {k} of {n} examples; it must leave both sides non-empty")
    chosen = set(random.Random(seed).sample(range(n), k))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    return train, [e for i, e in enumerate(examples) if i in chosen]
