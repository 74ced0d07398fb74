"""The inference engine that the demo and `finetune serve` share: one loaded base, several adapters, requests for
different adapters (and the base) decoding together in one continuous batch.

The API (everything a front end needs; nothing else is public):

    engine = load_engine(["adapters/a", "adapters/b"], base=None, limits=Limits(), batching=Batching())
    engine.names()                   # ["base model", "a", "b"]: the picker entries, BASE first
    engine.card(name)                # AdapterCard: base, task, rank, labels, train / eval metrics
    engine.prompt(name)              # PromptRecord: chat template on/off, recorded system prompt, example prompts

    stream = engine.submit(name, prompt, GenerationParams(max_new_tokens=64, temperature=0, top_p=1, seed=0,
                           stop=("\\n\\n",)), system_prompt=None, cancel=None, loop=None)
    for chunk in stream:             # Chunk(text so far, delta, tokens, prompt_tokens, finish_reason)
        ...                          # finish_reason on the last chunk: "stop" | "length" | "cancelled"
    stream.cancel()                  # or close(), or set `cancel` (a threading.Event): stops at the next token
    # with loop=asyncio.get_running_loop(): `async for chunk in stream` (the HTTP server does this)

    engine.generate(name, prompt, params)        # Iterator[str]: the growing text (a closed iterator cancels)
    engine.chat(name, messages, params)          # the same for a chat (chat-template adapters only)
    engine.compare_chunks(name, prompt, params)  # Iterator[(base Chunk, adapter Chunk)]: both decode in ONE batch
    engine.compare(name, prompt, params)         # Iterator[(base text, adapter text)]
    engine.classify(name, text)                  # {label: probability}, labels in run.json order
    engine.classify_many(name, texts)            # one forward for several texts
    engine.stats()                               # BatchStats: running, waiting, served, generated tokens
    engine.close()

`prompt` is a string (one user turn) or a list of chat messages. Prompts render through finetune/data/prompting.py
with the chat-template flag recorded at training time; a chat without a system message gets the system prompt
training used (prompt.json, `PromptRecord.messages`), unless `system_prompt` is given ("" means none). Greedy
(temperature 0) output is the same alone or in any batch; sampling is reproducible for a seed in any batch.
Refused requests raise InputError (UnknownModel for a name that is not served); a full queue raises Busy.
Limits (prompt tokens, new tokens) are enforced here, not in a UI, so API clients are held to them as well.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from finetune.data.prompt_record import PromptRecord
from finetune.data.prompting import prompt_ids
from finetune.serving.batcher import Batcher, Batching, BatchStats, Request
from finetune.serving.entries import BASE, AdapterCard, Entry, Limits
from finetune.serving.lora_rows import BASE_SLOT
from finetune.serving.sampling import RowDecoder
from finetune.serving.stream import Busy, Chunk, GenerationParams, InputError, Stream, UnknownModel

CHARS_PER_TOKEN_CAP = 16  # reject absurdly long input before tokenizing it: no tokenizer packs more than this
Prompt = str | list[dict[str, Any]]

__all__ = ["BASE", "AdapterCard", "BatchStats", "Batching", "Busy", "Chunk", "Engine", "GenerationParams",
           "InputError", "Limits", "Stream", "UnknownModel", "load_engine"]


class Engine:
    """Front end over the loaded entries: rendering, limits, streams (see the module docstring)."""

    def __init__(self, entries: dict[str, Entry], limits: Limits | None = None):
        self.entries, self.limits = entries, limits or Limits()

    def names(self) -> list[str]:
        return list(self.entries)

    def card(self, name: str) -> AdapterCard:
        return self._entry(name).card

    def prompt(self, name: str) -> PromptRecord:
        """How training built this adapter's prompts (the base gets the template flag and no system prompt)."""
        return self._entry(name).prompt

    def submit(self, name: str, prompt: Prompt, params: GenerationParams | None = None, *,
               system_prompt: str | None = None, cancel: threading.Event | None = None, loop: Any = None) -> Stream:
        """Queue one generation; its Stream yields Chunks. Raises InputError / Busy before anything runs."""
        entry = self._generator(name)
        ids = self._render(entry, prompt, system_prompt)
        return self._submit([entry], ids, params or GenerationParams(), cancel, loop)[0]

    def generate(self, name: str, prompt: Prompt, params: GenerationParams,
                 cancel: threading.Event | None = None, system_prompt: str | None = None) -> Iterator[str]:
        """Yield the growing answer. Closing the iterator or setting `cancel` stops the model at its next token."""
        stream = self.submit(name, prompt, params, system_prompt=system_prompt, cancel=cancel)
        try:
            for chunk in stream:
                if chunk.delta:
                    yield chunk.text
        finally:
            stream.close()

    def chat(self, name: str, messages: list[dict[str, Any]], params: GenerationParams,
             cancel: threading.Event | None = None) -> Iterator[str]:
        entry = self._generator(name)
        if not entry.chat:
            raise InputError(f"'{name}' was trained without a chat template: use the Generate tab with plain text.")
        if not messages or messages[-1].get("role") != "user":
            raise InputError("Type a message first.")
        yield from self.generate(name, messages, params, cancel)

    def compare_chunks(self, name: str, prompt: Prompt, params: GenerationParams,
                       cancel: threading.Event | None = None,
                       system_prompt: str | None = None) -> Iterator[tuple[Chunk, Chunk]]:
        """(base, adapter) as both grow, decoded in one batch from the same prompt ids, settings and seed."""
        entry = self._generator(name)
        if entry.peft_name is None and not entry.full:
            raise InputError("Pick an adapter to compare with the base model.")
        # an adapter's base is the same loaded model with no adapter on the row; a fully fine-tuned model's base is
        # the BASE entry, a model of its own decoding in its own batch (same prompt ids, settings and seed)
        base = self.entries[BASE] if entry.full else replace(entry, peft_name=None, slot=BASE_SLOT)
        ids = self._render(entry, prompt, system_prompt)  # rendered the adapter's way for both: only weights differ
        wake: queue.SimpleQueue[Stream] = queue.SimpleQueue()
        streams = self._submit([base, entry], ids, params, cancel, None, wake)
        latest = [streams[0].last, streams[1].last]
        try:
            while not all(s.done for s in streams):
                stream = wake.get()
                latest[streams.index(stream)] = next(stream)
                yield latest[0], latest[1]
        finally:
            for stream in streams:
                stream.close()

    def compare(self, name: str, prompt: Prompt, params: GenerationParams,
                cancel: threading.Event | None = None, system_prompt: str | None = None) -> Iterator[tuple[str, str]]:
        """(base text, adapter text) as both grow (see compare_chunks)."""
        for base, adapter in self.compare_chunks(name, prompt, params, cancel, system_prompt):
            yield base.text, adapter.text

    def classify(self, name: str, text: str) -> dict[str, float]:
        """Label -> probability (softmax of the classifier logits), labels in run.json order."""
        return self.classify_many(name, [text])[0]

    def classify_many(self, name: str, texts: list[str]) -> list[dict[str, float]]:
        import torch

        entry = self._entry(name)
        if entry.task != "classification":
            raise InputError(f"'{name}' generates text: pick a classification adapter to classify.")
        if not texts:
            raise InputError("Type a text first: the input is empty.")
        # under the lock: padding changes the tokenizer's state, which another thread must not see half-way
        with entry.lock, torch.inference_mode():
            for text in texts:
                self._check_length(text, lambda t=text: list(entry.tok(t)["input_ids"]))
            batch = entry.tok(texts, return_tensors="pt", padding=True)
            if entry.peft_name is not None:
                entry.model.set_adapter(entry.peft_name)  # peft's active adapter is global state: under the lock
            logits = entry.model(**batch).logits.float()
        labels = entry.card.labels or [str(i) for i in range(logits.shape[-1])]
        return [dict(zip(labels, row, strict=True)) for row in torch.softmax(logits, dim=-1).tolist()]

    def stats(self) -> BatchStats | None:
        """The text batch's load (None when only classification adapters are served)."""
        batcher = next((e.batcher for e in self.entries.values() if e.batcher is not None), None)
        return batcher.stats() if batcher is not None else None

    def close(self) -> None:
        for batcher in {id(e.batcher): e.batcher for e in self.entries.values() if e.batcher is not None}.values():
            batcher.close()

    # -- internals --------------------------------------------------------------------------------------------

    def _entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise UnknownModel(f"unknown adapter '{name}'; choose one of: {', '.join(self.entries)}")
        return self.entries[name]

    def _generator(self, name: str) -> Entry:
        entry = self._entry(name)
        if entry.task != "causal_lm":
            raise InputError(f"'{name}' is a classification adapter: use the Classify tab.")
        return entry

    def _render(self, entry: Entry, prompt: Prompt, system_prompt: str | None) -> list[int]:
        if isinstance(prompt, str):
            text = prompt
            rendered: Prompt = entry.prompt.messages(prompt, system_prompt) if entry.chat else prompt
        else:
            if not entry.chat:
                raise InputError(f"'{entry.card.name}' was trained without a chat template: send plain text.")
            text = "".join(str(m.get("content", "")) for m in prompt if m.get("role") != "system")
            system = entry.prompt.system_prompt if system_prompt is None else system_prompt
            has_system = any(m.get("role") == "system" for m in prompt)
            rendered = prompt if has_system or not system else [{"role": "system", "content": system}, *prompt]
        return self._check_length(text, lambda: prompt_ids(entry.tok, rendered, chat=entry.chat))

    def _check_length(self, text: str, encode: Any) -> list[int]:
        limit = self.limits.max_prompt_tokens
        if not text.strip():
            raise InputError("Type a prompt first: the input is empty.")
        if len(text) > limit * CHARS_PER_TOKEN_CAP:
            raise InputError(f"The input is {len(text)} characters, far over this server's limit of {limit} tokens. "
                             "Shorten it.")
        ids: list[int] = encode()
        if len(ids) > limit:
            raise InputError(f"The input is {len(ids)} tokens; this server accepts at most {limit}. Shorten it "
                             f"(or start the server with a larger --max-prompt-tokens).")
        return ids

    def _submit(self, entries: list[Entry], ids: list[int], params: GenerationParams, cancel: threading.Event | None,
                loop: Any, wake: queue.SimpleQueue[Stream] | None = None) -> list[Stream]:
        params = self._clamped(params)
        streams: list[Stream] = []
        groups: dict[int, tuple[Batcher, list[Request]]] = {}  # one submit per batch: its rows join it together
        for entry in entries:
            assert entry.batcher is not None
            stream = Stream(entry.batcher.new_id(), len(ids), cancel, loop, wake)
            request = Request(entry.slot, ids, RowDecoder(entry.tok, params, entry.stop_ids), stream)
            groups.setdefault(id(entry.batcher), (entry.batcher, []))[1].append(request)
            streams.append(stream)
        try:
            for batcher, requests in groups.values():
                batcher.submit(requests)
        except Exception:
            for stream in streams:  # a second batch refusing (Busy) must not leave the first one's rows running
                stream.close()
            raise
        return streams

    def _clamped(self, params: GenerationParams) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=max(1, min(int(params.max_new_tokens), self.limits.max_new_tokens)),
            temperature=max(0.0, float(params.temperature)),
            top_p=min(1.0, max(0.01, float(params.top_p))),
            seed=int(params.seed) % 2**64,  # any integer: torch's generator takes 0 <= seed < 2**64
            stop=tuple(str(s) for s in params.stop),
            ignore_eos=bool(params.ignore_eos),
        )


# -- loading (finetune/serving/loading.py) ----------------------------------------------------------------------


def load_engine(folders: Sequence[str | Path], base: str | None = None, limits: Limits | None = None,
                batching: Batching | None = None) -> Engine:
    """Load every adapter folder; those sharing task, base and labels share one loaded model. Text-generation
    adapters must share a base; with no folder, `base` alone is served. A fully fine-tuned folder (lora.enabled:
    false) is a model of its own, served in its own batch and compared with its base (the BASE entry)."""
    from finetune.serving.loading import load_entries

    limits = limits or Limits()
    return Engine(load_entries(folders, base, limits, batching or Batching()), limits)
