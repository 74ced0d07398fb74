"""What a generation request gives and gets back: its settings (GenerationParams), the events of its output
(Chunk) and the handle that delivers them (Stream), usable from threads and from asyncio alike."""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import Any

from finetune.errors import FinetuneError

FINISH_REASONS = ("stop", "length", "cancelled")


class InputError(FinetuneError):
    """A request refused before it runs (empty, too long, unknown adapter, wrong task); the message says why."""


class UnknownModel(InputError):
    """The request names no adapter (or base) that this engine serves."""


class Busy(FinetuneError):
    """Every batch slot and every queue place is taken: try again shortly."""


@dataclass(frozen=True)
class GenerationParams:
    """Per-request decoding settings; each request of a batch keeps its own."""

    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 means greedy decoding
    top_p: float = 0.95
    seed: int = 0  # sampling is reproducible for a seed, alone or in any batch
    stop: tuple[str, ...] = ()  # the text ends before the first of these strings (finish reason "stop")
    ignore_eos: bool = False  # keep going past the end-of-turn token (benchmarks: a fixed number of tokens)


@dataclass(frozen=True)
class Chunk:
    """One event of a generation: the text so far, what it added, and (on the last event) why it ended."""

    text: str  # the whole answer so far
    delta: str  # what this event added to `text`
    tokens: int  # tokens generated so far (the end-of-turn token included when it ended the answer)
    prompt_tokens: int
    finish_reason: str | None = None  # None while running; then "stop" | "length" | "cancelled"


class Stream:
    """The output of one request: iterate it (`for chunk in stream`, or `async for` when it was submitted with an
    event loop) to get Chunks until the one with a finish_reason. `cancel()` (or `close()`) stops the request at its
    next token; a request that failed raises its error from the iterator."""

    def __init__(self, request_id: str, prompt_tokens: int, cancel: threading.Event | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, wake: queue.SimpleQueue[Stream] | None = None):
        # `cancel` is the caller's event (it may serve several requests); closing this stream sets only its own
        self.id, self.prompt_tokens, self._watch = request_id, prompt_tokens, cancel
        self._cancel = threading.Event()
        self._loop, self._wake = loop, wake
        self._sync: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._async: asyncio.Queue[Any] | None = asyncio.Queue() if loop is not None else None
        self.last = Chunk("", "", 0, prompt_tokens)
        self.done = False

    # -- the consumer's side ------------------------------------------------------------------------------------

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        """Stop the request if it is still running (the consumer went away)."""
        if not self.done:
            self._cancel.set()

    def result(self) -> Chunk:
        """Wait for the end and return the last chunk (its text is the whole answer)."""
        for _ in self:
            pass
        return self.last

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Chunk:
        if self.done:
            raise StopIteration
        return self._take(self._sync.get())

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Chunk:
        if self.done:
            raise StopAsyncIteration
        assert self._async is not None, "submit with loop=... to iterate a stream with async for"
        return self._take(await self._async.get())

    def _take(self, item: Any) -> Chunk:
        if isinstance(item, BaseException):
            self.done = True
            raise item
        self.last = item
        self.done = item.finish_reason is not None
        return item

    # -- the batcher's side -------------------------------------------------------------------------------------

    def put(self, item: Chunk | BaseException) -> None:
        """Deliver a chunk or an error (called from the batcher thread)."""
        if self._async is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                self._cancel.set()
        else:
            self._sync.put(item)
        if self._wake is not None:
            self._wake.put(self)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set() or (self._watch is not None and self._watch.is_set())
