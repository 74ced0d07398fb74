"""A compact, map-style dataset of examples (flat int arrays + offsets), and its on-disk form for the cache.

Python lists of ints cost ~9x the memory of int32 arrays; a 100k-example set stays small this way. Items come
back as ordinary dicts of lists, so callers see the same examples as before caching.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

Example = dict[str, Any]


class ExampleTable:
    """Examples stored as flat int64 arrays plus per-key offsets; indexing gives back ordinary dicts (lists and
    ints), the same examples it was built from."""

    def __init__(self, columns: dict[str, Any], offsets: Any, size: int):
        self.columns, self.offsets, self.size = columns, offsets, size

    @classmethod
    def from_examples(cls, examples: list[Example]) -> ExampleTable:
        import numpy as np

        if not examples:
            return cls({}, {}, 0)
        columns: dict[str, Any] = {}
        offsets: dict[str, Any] = {}
        for key, first in examples[0].items():
            if isinstance(first, list):
                lengths = np.fromiter((len(e[key]) for e in examples), dtype=np.int64, count=len(examples))
                offsets[key] = np.concatenate([[0], np.cumsum(lengths)])
                flat = np.empty(int(offsets[key][-1]), dtype=np.int64)
                for i, e in enumerate(examples):
                    flat[offsets[key][i] : offsets[key][i + 1]] = e[key]
                columns[key] = flat
            else:
                columns[key] = np.asarray([e[key] for e in examples], dtype=np.int64)
        return cls(columns, offsets, len(examples))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        if not -self.size <= index < self.size:
            raise IndexError(index)
        index %= self.size
        out: Example = {}
        for key, col in self.columns.items():
            if key in self.offsets:
                out[key] = col[self.offsets[key][index] : self.offsets[key][index + 1]].tolist()
            else:
                out[key] = int(col[index])
        return out

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(self.size))

    def save(self, path: Path) -> None:
        import numpy as np

        arrays = {f"col.{k}": v for k, v in self.columns.items()}
        arrays.update({f"off.{k}": v for k, v in self.offsets.items()})
        with path.open("wb") as f:
            np.savez(f, size=np.asarray(self.size), **arrays)

    @classmethod
    def load(cls, path: Path) -> ExampleTable:
        import numpy as np

        with np.load(path) as z:
            columns = {k[4:]: z[k] for k in z.files if k.startswith("col.")}
            offsets = {k[4:]: z[k] for k in z.files if k.startswith("off.")}
            return cls(columns, offsets, int(z["size"]))
