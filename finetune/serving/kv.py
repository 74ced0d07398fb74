"""The key/value cache of a running batch whose rows have their own lengths (continuous batching).

Row i's tokens sit in columns [0, len_i) of its slot, so a column index is always the token's position: a new row
is prefilled straight into a free slot and an old one keeps its columns untouched, and nothing is ever shifted when
rows join or leave. Each decode step writes row i's new key/value at column len_i; the batcher passes a 4D mask
that hides each row's unused columns (transformers returns a 4D mask as given), or no mask when every row has the
same length, so that transformers takes its own (faster, causal) attention path as a plain `generate` does. Buffers grow by doubling and are
dropped when the batch empties, so memory follows the load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

GROW_COLUMNS = 64  # the smallest column capacity; columns grow to a multiple of this


def row_cache(n_layers: int, max_rows: int) -> Any:
    """A RowCache for a model with `n_layers` attention layers and at most `max_rows` rows (transformers is
    imported only here)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class RowCache(Cache):
        def __init__(self) -> None:
            super().__init__(layers=[DynamicLayer() for _ in range(n_layers)])
            self.keys: list[torch.Tensor | None] = [None] * n_layers
            self.values: list[torch.Tensor | None] = [None] * n_layers
            self.slots = self.columns = 0
            self._rows = slice(0, 0)
            self._cols: torch.Tensor | None = None  # decode: each row's write column; None: prefill block
            self._width = self._seen = 0

        def plan_prefill(self, first_row: int, n: int, length: int) -> None:
            """The next forward writes `length` columns of rows [first_row, first_row + n)."""
            self._reserve(first_row + n, length)
            self._rows, self._cols, self._width, self._seen = slice(first_row, first_row + n), None, length, 0

        def plan_decode(self, cols: torch.Tensor, width: int) -> None:
            """The next forward writes one column per row 0..n-1, row i at cols[i]; attention reads `width` columns."""
            self._reserve(len(cols), width)
            self._rows, self._cols, self._width, self._seen = slice(0, len(cols)), cols, width, width - 1

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            keys = self._buffer(self.keys, layer_idx, key_states)
            values = self._buffer(self.values, layer_idx, value_states)
            rows = self._rows
            if self._cols is None:
                keys[rows, :, : key_states.shape[2]] = key_states
                values[rows, :, : value_states.shape[2]] = value_states
            else:
                import torch

                index = torch.arange(rows.start, rows.stop, device=key_states.device)
                keys[index, :, self._cols] = key_states[:, :, 0]
                values[index, :, self._cols] = value_states[:, :, 0]
            return keys[rows, :, : self._width], values[rows, :, : self._width]

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self._seen

        def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
            """For transformers' own causal mask, used when no row needs padding (all rows of one length)."""
            return self._seen + query_length, 0

        def move_row(self, src: int, dst: int, length: int) -> None:
            """Copy row `src`'s first `length` columns into slot `dst` (compacting after a row left)."""
            for buffers in (self.keys, self.values):
                for buf in buffers:
                    if buf is not None:
                        buf[dst, :, :length] = buf[src, :, :length]

        def release(self) -> None:
            """Drop every buffer (the batch is empty): memory returns to the idle level."""
            self.keys = [None] * n_layers
            self.values = [None] * n_layers
            self.slots = self.columns = 0

        def _reserve(self, slots: int, columns: int) -> None:
            if slots <= self.slots and columns <= self.columns:
                return
            new_slots = min(max(slots, 2 * self.slots), max(max_rows, slots)) if slots > self.slots else self.slots
            new_cols = self.columns
            if columns > self.columns:
                new_cols = max(columns, 2 * self.columns, GROW_COLUMNS)
                new_cols = -(-new_cols // GROW_COLUMNS) * GROW_COLUMNS
            for buffers in (self.keys, self.values):
                for i, buf in enumerate(buffers):
                    if buf is not None:
                        buffers[i] = _grown(buf, new_slots, new_cols)
            self.slots, self.columns = new_slots, new_cols

        def _buffer(self, buffers: list[torch.Tensor | None], layer_idx: int, states: torch.Tensor) -> torch.Tensor:
            buf = buffers[layer_idx]
            if buf is None:
                import torch

                # zeros, not empty: a masked column still enters q.k, and a NaN bit pattern there would poison the row
                buf = torch.zeros((self.slots, states.shape[1], self.columns, states.shape[3]), dtype=states.dtype,
                                  device=states.device)
                buffers[layer_idx] = buf
            return buf

    return RowCache()


def _grown(buf: torch.Tensor, slots: int, columns: int) -> torch.Tensor:
    import torch

    new = torch.zeros((slots, buf.shape[1], columns, buf.shape[3]), dtype=buf.dtype, device=buf.device)
    new[: buf.shape[0], :, : buf.shape[2]] = buf
    return new
