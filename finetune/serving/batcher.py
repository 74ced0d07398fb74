"""Continuous batching on one loaded causal LM: a thread owns the model and, at every step, admits waiting requests
(one prefill forward for all of them, each row with its own adapter), then decodes one token for every running
request in one forward. A request that finishes, is cancelled or whose client went away leaves at the next step;
a new one joins at the next step. Rows keep their own lengths in a RowCache (finetune/serving/kv.py) and their own
adapter through RowLora (finetune/serving/lora_rows.py); token choice and text are per row (sampling.py).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from finetune.serving.lora_rows import BASE_SLOT, RowLora
from finetune.serving.sampling import RowDecoder, choose
from finetune.serving.stream import Busy, Chunk, Stream

if TYPE_CHECKING:
    import torch

log = logging.getLogger("finetune.serve")


@dataclass(frozen=True)
class Batching:
    """How many requests decode together and how many may wait."""

    max_batch: int = 8  # rows decoded together in one forward
    max_queue: int = 64  # requests waiting for a row; more are refused (Busy)
    prefill_tokens: int = 2048  # padded prompt tokens admitted in one prefill forward (at least one request)
    merge: bool = True  # merge an adapter into its own weight buffers while it is the only one running


@dataclass
class Request:
    """One generation inside the batcher."""

    slot: int  # the adapter slot (0: the base)
    prompt: list[int]
    decoder: RowDecoder
    stream: Stream
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: bool = False


@dataclass
class _Row:
    request: Request
    length: int  # tokens whose keys/values are in the cache
    next_token: int  # the token to feed at the next decode step


@dataclass
class BatchStats:
    """A snapshot of one continuous batch (served at /health): rows running and waiting, their limits, requests
    served, tokens generated, decode steps, and whether the model thread is alive."""

    running: int
    waiting: int
    max_batch: int
    max_queue: int
    served: int
    generated_tokens: int
    steps: int
    alive: bool = True  # the model thread is running


class Batcher:
    """The request queue and the thread that runs the model (see the module docstring)."""

    _ids = itertools.count(1)

    def __init__(self, model: Any, row_lora: RowLora | None, peft_names: list[str | None], pad_id: int,
                 options: Batching, max_positions: int | None):
        self.model, self.row_lora, self.peft_names = model, row_lora, peft_names
        self.inner = model.base_model.model if row_lora is not None and not row_lora.peft_left else model
        self.pad_id, self.options, self.max_positions = pad_id, options, max_positions
        self.device = next(model.parameters()).device
        self.mask_kind = "additive" if getattr(model.config, "_attn_implementation", "sdpa") == "eager" else "bool"
        from finetune.serving.kv import row_cache

        self.cache = row_cache(_attention_layers(model), options.max_batch)
        self.rows: list[_Row] = []
        self.waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.served = self.generated = self.steps = 0
        self._thread = threading.Thread(target=self._run, name="finetune-batcher", daemon=True)
        self._thread.start()

    # -- the callers' side --------------------------------------------------------------------------------------

    def new_id(self) -> str:
        return f"req-{next(self._ids)}"

    def submit(self, requests: list[Request]) -> None:
        """Queue requests together (a compare pair is admitted in the same step when rows allow)."""
        with self._cond:
            if self._closed:
                raise Busy("the engine is shutting down")
            if len(self.waiting) + len(requests) > self.options.max_queue:
                raise Busy(f"the server is busy: {len(self.rows)} requests running and {len(self.waiting)} waiting "
                           f"(--max-queue {self.options.max_queue}); retry shortly")
            self.waiting.extend(requests)
            self._cond.notify()

    def stats(self) -> BatchStats:
        with self._cond:
            return BatchStats(len(self.rows), len(self.waiting), self.options.max_batch, self.options.max_queue,
                              self.served, self.generated, self.steps, self._thread.is_alive())

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- the model thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                admitted = self._next_work()
                if admitted is None:
                    return
                self._guarded(self._step, admitted)

    def _next_work(self) -> list[Request] | None:
        """Wait for work; return the requests to prefill now ([] when only decoding), None when closed."""
        with self._cond:
            while not self._closed and not self.waiting and not self.rows:
                self._cond.wait()
            if self._closed:
                self._fail_all(Busy("the engine was shut down"))
                return None
            return self._admit()

    def _admit(self) -> list[Request]:
        taken: list[Request] = []
        width = 0
        while self.waiting and len(self.rows) + len(taken) < self.options.max_batch:
            head = self.waiting[0]
            if head.stream.cancelled:
                self.waiting.popleft()
                self._end(head, Chunk("", "", 0, len(head.prompt), "cancelled"))
                continue
            width = max(width, len(head.prompt))
            if taken and width * (len(taken) + 1) > self.options.prefill_tokens:
                break
            taken.append(self.waiting.popleft())
        return taken

    def _step(self, admitted: list[Request]) -> None:
        self._drop_cancelled()
        admitted = [r for r in admitted if not self._cancelled_waiting(r)]
        if admitted:
            self._prefill(admitted)
        if self.rows:
            self._decode()
        if not self.rows:
            self.cache.release()

    def _guarded(self, step: Any, admitted: list[Request]) -> None:
        """A failing step fails the requests it touched, never the thread: the next requests run normally."""
        try:
            step(admitted)
        except Exception as exc:  # noqa: BLE001 - delivered to every affected request
            log.exception("batch step failed; failing %d running request(s)", len(self.rows) + len(admitted))
            for request in [r.request for r in self.rows] + admitted:
                if not request.stream.done:
                    request.stream.put(exc)
            self.rows = []
            self.cache.release()

    def _prefill(self, requests: list[Request]) -> None:
        import torch

        first, n = len(self.rows), len(requests)
        lengths = [len(r.prompt) for r in requests]
        width = max(lengths)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, : lengths[i]] = torch.tensor(r.prompt, dtype=torch.long)
        positions = torch.arange(width).expand(n, width)
        self.cache.plan_prefill(first, n, width)
        keep = torch.tensor(lengths).unsqueeze(1) - 1  # each row's last prompt position
        slots = [r.slot for r in requests]
        mask = self._prefill_mask(lengths, width) if len(set(lengths)) > 1 else None
        logits = self._forward(ids, positions, mask, slots, {row.request.slot for row in self.rows} | set(slots), keep)
        self.rows += [_Row(r, length, 0) for r, length in zip(requests, lengths, strict=True)]
        self._advance(self.rows[first:], logits[:, -1])

    def _decode(self) -> None:
        import torch

        lengths = torch.tensor([row.length for row in self.rows])
        width = int(lengths.max()) + 1
        ids = torch.tensor([[row.next_token] for row in self.rows])
        self.cache.plan_decode(lengths.to(self.device), width)
        slots = [row.request.slot for row in self.rows]
        mask = self._decode_mask(lengths, width) if int(lengths.min()) + 1 < width else None
        logits = self._forward(ids, lengths.unsqueeze(1), mask, slots, set(slots), None)
        for row in self.rows:
            row.length += 1
        self._advance(self.rows, logits[:, -1])
        self.steps += 1

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, slots: list[int],
                 engine_slots: set[int], keep: torch.Tensor | None) -> torch.Tensor:
        device = self.device
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), "position_ids": positions.to(device),
                                  "attention_mask": None if mask is None else mask.to(device),
                                  "past_key_values": self.cache, "use_cache": True}
        if keep is not None:
            kwargs["logits_to_keep"] = keep.to(device)
        if self.row_lora is None:
            return self.inner(**kwargs).logits
        self.row_lora.set_rows(slots, engine_slots, self.options.merge, device)
        if self.row_lora.peft_left:  # peft's own layers (DoRA, modules_to_save, ...) need its per-row names
            kwargs["adapter_names"] = [self.peft_names[s] or "__base__" for s in slots]
        return self.inner(**kwargs).logits

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose each row's next token, send what it adds, and let finished rows leave."""
        tokens = choose(logits, [row.request.decoder for row in rows])
        now = time.perf_counter()
        for row, token in zip(rows, tokens, strict=True):
            request = row.request
            request.first_token = request.first_token or now
            delta = request.decoder.push(token)
            row.next_token = token
            self.generated += 1
            decoder = request.decoder
            if decoder.finish is None and self._at_max_positions(row):
                decoder.finish = "length"
            if decoder.finish is not None:
                self._end(request, Chunk(decoder.text, delta, decoder.tokens, len(request.prompt), decoder.finish))
            elif delta:
                request.stream.put(Chunk(decoder.text, delta, decoder.tokens, len(request.prompt)))
        self._remove([i for i, row in enumerate(self.rows) if row.request.finished])

    def _at_max_positions(self, row: _Row) -> bool:
        return self.max_positions is not None and row.length + 1 >= self.max_positions

    def _drop_cancelled(self) -> None:
        gone = [i for i, row in enumerate(self.rows) if row.request.stream.cancelled]
        for i in gone:
            d = self.rows[i].request.decoder
            self._end(self.rows[i].request, Chunk(d.text, "", d.tokens, len(self.rows[i].request.prompt), "cancelled"))
        self._remove(gone)

    def _cancelled_waiting(self, request: Request) -> bool:
        if request.stream.cancelled:
            self._end(request, Chunk("", "", 0, len(request.prompt), "cancelled"))
            return True
        return False

    def _remove(self, indices: list[int]) -> None:
        """Drop rows, moving the last rows into the holes so that rows stay 0..n-1 (one row's columns copied)."""
        for i in sorted(indices, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                self.cache.move_row(last, i, self.rows[last].length)
                self.rows[i] = self.rows[last]
            self.rows.pop()

    def _end(self, request: Request, chunk: Chunk) -> None:
        request.finished = True
        request.stream.put(chunk)
        self.served += 1
        if request.first_token is not None:
            log.debug("%s done: %s", request.stream.id, chunk.finish_reason)

    def _fail_all(self, exc: Exception) -> None:
        for request in [r.request for r in self.rows] + list(self.waiting):
            request.stream.put(exc)
        self.rows, self.waiting = [], collections.deque()

    def _prefill_mask(self, lengths: list[int], width: int) -> torch.Tensor:
        import torch

        causal = torch.ones(width, width, dtype=torch.bool).tril()
        valid = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # n x width
        return self._as_mask((causal.unsqueeze(0) & valid.unsqueeze(1)).unsqueeze(1))

    def _decode_mask(self, lengths: torch.Tensor, width: int) -> torch.Tensor:
        import torch

        valid = torch.arange(width).unsqueeze(0) <= lengths.unsqueeze(1)  # the new token sits at column `length`
        return self._as_mask(valid[:, None, None, :])

    def _as_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        if self.mask_kind == "bool":
            return allowed
        import torch

        dtype = self.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _attention_layers(model: Any) -> int:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


__all__ = ["BASE_SLOT", "BatchStats", "Batcher", "Batching", "Request"]
