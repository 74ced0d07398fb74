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

import json
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from finetune.config.model import ModelConfig
from finetune.data.prompt_record import PromptRecord
from finetune.data.prompting import prompt_ids, stop_token_ids, uses_chat_template
from finetune.errors import FinetuneError
from finetune.lifecycle.fit import check_adapter_fits
from finetune.lifecycle.folder import base_source, load_adapter, load_base, read_adapter
from finetune.model import load_model, set_pad_token
from finetune.serving.batcher import Batcher, Batching, BatchStats, Request
from finetune.serving.lora_rows import BASE_SLOT, install_row_lora
from finetune.serving.sampling import RowDecoder
from finetune.serving.stream import Busy, Chunk, GenerationParams, InputError, Stream, UnknownModel

BASE = "base model"  # the picker entry that runs the base with every adapter disabled
CHARS_PER_TOKEN_CAP = 16  # reject absurdly long input before tokenizing it: no tokenizer packs more than this
Prompt = str | list[dict[str, Any]]

__all__ = ["BASE", "AdapterCard", "BatchStats", "Batching", "Busy", "Chunk", "Engine", "GenerationParams",
           "InputError", "Limits", "Stream", "UnknownModel", "load_engine"]


@dataclass(frozen=True)
class Limits:
    """Enforced on every request, whatever the page or an API client asks for."""

    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512


@dataclass
class AdapterCard:
    """What the demo and server show about one entry (an adapter, a fully fine-tuned model, or the base): its base,
    task, LoRA rank and alpha, prompt format, class names, and its training and eval results."""

    name: str
    base: str
    task: str
    rank: int | None = None
    alpha: float | None = None
    chat: bool = False
    labels: list[str] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # run.json "metrics"
    eval_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval.json name -> base/adapter/delta
    eval_decoding: dict[str, Any] = field(default_factory=dict)  # eval.json "decoding" (strategy, max_new_tokens)
    prompt: PromptRecord | None = None  # prompt.json: how training built prompts (None for the base entry)
    full: bool = False  # a fully fine-tuned model (lora.enabled: false) rather than an adapter


@dataclass
class Entry:
    """One picker entry: a loaded model (shared by the adapters of a group) and how to run it."""

    model: Any
    tok: Any  # the tokenizer saved with this adapter (the first adapter's for the base)
    task: str
    chat: bool  # render through the chat template, as recorded at training time
    peft_name: str | None  # None: the base, no adapter
    stop_ids: list[int]
    card: AdapterCard
    prompt: PromptRecord = field(default_factory=lambda: PromptRecord(False))
    slot: int = BASE_SLOT  # the adapter's row slot in the batcher
    batcher: Batcher | None = None  # text generation: the shared continuous batch
    lock: threading.Lock = field(default_factory=threading.Lock)  # classification: one forward at a time
    full: bool = False  # a fully fine-tuned model (its own weights and batch; compared with the BASE entry)


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


# -- loading ------------------------------------------------------------------------------------------------------


def load_engine(folders: Sequence[str | Path], base: str | None = None, limits: Limits | None = None,
                batching: Batching | None = None) -> Engine:
    """Load every adapter folder; those sharing task, base and labels share one loaded model. Text-generation
    adapters must share a base; with no folder, `base` alone is served. A fully fine-tuned folder (lora.enabled:
    false) is a model of its own, served in its own batch and compared with its base (the BASE entry)."""
    if not folders and not base:
        raise FinetuneError("nothing to serve: give one or more adapter folders, or --base MODEL for a base model alone")
    limits, batching = limits or Limits(), batching or Batching()
    infos = [read_adapter(f) for f in folders]
    _check_names(infos)
    full = [i for i in infos if i.full]
    groups = _grouped([i for i in infos if not i.full], base)
    _check_one_text_base(groups, full, base)
    entries: dict[str, Entry] = {}
    full_text = next((i for i in full if i.task == "causal_lm"), None)
    if not any(key[0] == "causal_lm" for key in groups) and (full_text is not None or not infos):
        entries[BASE] = (_full_base_entry(full_text, base, limits, batching) if full_text is not None
                         else _base_only_entry(str(base), limits, batching))
    for key, members in groups.items():
        if key[0] == "causal_lm":
            entries.update(_load_causal_group(members, base, limits, batching))
        else:
            entries.update(_load_classifiers(members, base))
    for info in full:
        entries[info.name] = _full_entry(info, limits, batching)
    return Engine(entries, limits)


def _check_one_text_base(groups: dict[tuple[str, str, tuple[str, ...]], list[Any]], full: list[Any],
                         base: str | None) -> None:
    """Every text-generation entry decodes next to the one BASE entry, so all must share that base."""
    by_base: dict[str, list[str]] = {}
    for key, members in groups.items():
        if key[0] == "causal_lm":
            by_base.setdefault(key[1], []).extend(i.name for i in members)
    for info in full:
        if info.task == "causal_lm":
            by_base.setdefault(base_source(info, base)[0].ref, []).append(info.name)
    if len(by_base) > 1:
        raise FinetuneError("the text-generation adapters were trained on different bases ("
                            + "; ".join(f"{ref}: {', '.join(names)}" for ref, names in by_base.items())
                            + "). Serve one base per process, or pass --base to run them all on one.")


def _check_names(infos: list[Any]) -> None:
    seen: dict[str, Any] = {}
    for info in infos:
        if info.name == BASE or info.name in seen:
            other = seen.get(info.name, "the base entry")
            raise FinetuneError(f"two adapters are named '{info.name}' ({other} and {info.folder}): the picker needs "
                                "distinct folder names; rename one")
        seen[info.name] = info.folder


def _grouped(infos: list[Any], base: str | None) -> dict[tuple[str, str, tuple[str, ...]], list[Any]]:
    groups: dict[tuple[str, str, tuple[str, ...]], list[Any]] = {}
    for info in infos:
        key = (info.task, base_source(info, base)[0].ref, tuple(info.run.get("labels") or ()))
        groups.setdefault(key, []).append(info)
    return groups


def _load_members(members: list[Any], base: str | None) -> tuple[Any, list[tuple[Any, Any, str]]]:
    """The first adapter loads the base (through finetune.lifecycle.folder); the others are added to it by name.
    Returns the model and (info, tokenizer, peft name) per adapter."""
    from transformers import AutoTokenizer

    model, tok, first = load_adapter(members[0].folder, base)
    loaded = [(first, tok, "default")]
    for i, info in enumerate(members[1:], start=1):
        check_adapter_fits(info, *base_source(info, base))
        result = model.load_adapter(str(info.folder), adapter_name=f"adapter_{i}")
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise FinetuneError(f"{info.folder}: {len(unexpected)} adapter weights match no layer of the base loaded "
                                f"for {first.folder} (e.g. {unexpected[0]}); was it trained on another base?")
        other_tok = AutoTokenizer.from_pretrained(str(info.folder))
        set_pad_token(other_tok)
        loaded.append((info, other_tok, f"adapter_{i}"))
    model.eval()
    return model, loaded


def _load_causal_group(members: list[Any], base: str | None, limits: Limits, batching: Batching) -> dict[str, Entry]:
    model, loaded = _load_members(members, base)
    peft_names: list[str | None] = [None] + [name for _, _, name in loaded]
    batcher = _batcher(model, install_row_lora(model, peft_names), peft_names, loaded[0][1], limits, batching)
    first_info, first_tok, _ = loaded[0]
    stop_ids = stop_token_ids(first_tok, getattr(model, "generation_config", None))
    card = AdapterCard(name=BASE, base=first_info.base, task="causal_lm", chat=first_info.chat)
    entries = {BASE: Entry(model, first_tok, "causal_lm", first_info.chat, None, stop_ids, card,
                           PromptRecord(first_info.chat), BASE_SLOT, batcher)}
    for slot, (info, tok, name) in enumerate(loaded, start=1):
        stops = stop_token_ids(tok, getattr(model, "generation_config", None))
        entries[info.name] = Entry(model, tok, "causal_lm", info.chat, name, stops, _card(info), info.prompt, slot,
                                   batcher)
    return entries


def _load_classifiers(members: list[Any], base: str | None) -> dict[str, Entry]:
    model, loaded = _load_members(members, base)
    lock = threading.Lock()  # one peft model: its active adapter is global state
    return {info.name: Entry(model, tok, info.task, info.chat, name, [], _card(info), info.prompt, lock=lock)
            for info, tok, name in loaded}


def _full_entry(info: Any, limits: Limits, batching: Batching) -> Entry:
    """A fully fine-tuned model: its own weights, no adapter; a text model gets a batch of its own."""
    model, tok, info = load_adapter(info.folder)
    model.eval()
    if info.task != "causal_lm":
        return Entry(model, tok, info.task, info.chat, None, [], _card(info), info.prompt, full=True)
    stops = stop_token_ids(tok, getattr(model, "generation_config", None))
    return Entry(model, tok, "causal_lm", info.chat, None, stops, _card(info), info.prompt, BASE_SLOT,
                 _batcher(model, None, [None], tok, limits, batching), full=True)


def _full_base_entry(info: Any, base: str | None, limits: Limits, batching: Batching) -> Entry:
    """The base a fully fine-tuned text model started from (or --base), with that model's tokenizer, as eval does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(info.folder))
    set_pad_token(tok)
    model = load_base(info, tok, base)
    card = AdapterCard(name=BASE, base=info.base, task="causal_lm", chat=info.chat)
    return Entry(model, tok, "causal_lm", info.chat, None, stop_token_ids(tok, getattr(model, "generation_config", None)),
                 card, PromptRecord(info.chat), BASE_SLOT, _batcher(model, None, [None], tok, limits, batching))


def _base_only_entry(base: str, limits: Limits, batching: Batching) -> Entry:
    model, tok, source = load_model(ModelConfig(name_or_path=base))
    model.eval()
    chat = uses_chat_template(tok)
    card = AdapterCard(name=BASE, base=source.ref, task="causal_lm", chat=chat)
    batcher = _batcher(model, None, [None], tok, limits, batching)
    return Entry(model, tok, "causal_lm", chat, None, stop_token_ids(tok, model.generation_config), card,
                 PromptRecord(chat), BASE_SLOT, batcher)


def _batcher(model: Any, row_lora: Any, peft_names: list[str | None], tok: Any, limits: Limits,
             batching: Batching) -> Batcher:
    config = model.config
    _check_attention(model, limits)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return Batcher(model, row_lora, peft_names, pad, batching, getattr(config, "max_position_embeddings", None))


def _check_attention(model: Any, limits: Limits) -> None:
    """The batch runs full causal attention with its own 4D masks (sdpa or eager kernels)."""
    config = model.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    longest = limits.max_prompt_tokens + limits.max_new_tokens
    window = getattr(config, "sliding_window", None)
    if kinds - {"full_attention", "sliding_attention"}:
        raise FinetuneError(f"{config.model_type}: layers of kind {', '.join(sorted(kinds))} are not supported by "
                            "the batched engine (full or sliding attention only)")
    if "sliding_attention" in kinds and window is not None and window < longest:
        raise FinetuneError(f"{config.model_type} attends over a sliding window of {window} tokens, shorter than "
                            f"--max-prompt-tokens + --max-new-tokens = {longest}: lower them to at most {window}")
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa")


def _card(info: Any) -> AdapterCard:
    eval_file = info.folder / "eval.json"
    report = json.loads(eval_file.read_text()) if eval_file.is_file() else {}
    # eval.json (finetune/evaluation/report.py): metrics -> {base, adapter, delta, better}; scalars only here
    eval_metrics = {name: {k: m.get(k) for k in ("base", "adapter", "delta")}
                    for name, m in (report.get("metrics") or {}).items() if isinstance(m, dict) and "delta" in m}
    return AdapterCard(
        name=info.name, base=info.base, task=info.task, rank=info.adapter_config.get("r"),
        alpha=info.adapter_config.get("lora_alpha"), chat=info.chat, labels=info.run.get("labels"),
        metrics=dict(info.run.get("metrics") or {}), eval_metrics=eval_metrics,
        eval_decoding=dict(report.get("decoding") or {}), prompt=info.prompt, full=info.full,
    )
