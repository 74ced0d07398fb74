"""Pipeline-style inference for the demo: one loaded base with several adapters (peft multi-adapter), streaming
generation that a caller can cancel, classification probabilities, and base-vs-adapter comparison.

Adapters load only through finetune/adapters.py and prompts render only through finetune/prompting.py, so the
demo sees the base, tokenizer and chat template that training saw. Server-side limits live here, not in the UI,
so API clients are held to them as well.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config.model import ModelConfig
from finetune.data.prompt_record import PromptRecord
from finetune.data.prompting import prompt_ids, stop_token_ids, uses_chat_template
from finetune.errors import FinetuneError
from finetune.lifecycle.fit import check_adapter_fits
from finetune.lifecycle.folder import base_source, load_adapter, read_adapter
from finetune.model import load_model, set_pad_token

BASE = "base model"  # the picker entry that runs the base with every adapter disabled
CHARS_PER_TOKEN_CAP = 16  # reject absurdly long input before tokenizing it: no tokenizer packs more than this
Prompt = str | list[dict[str, Any]]


class InputError(FinetuneError):
    """A request the demo refuses (empty, too long, wrong kind of adapter); the message is shown to the user."""


@dataclass(frozen=True)
class Limits:
    """Enforced on every request, whatever the page or an API client asks for."""

    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 means greedy decoding
    top_p: float = 0.95
    seed: int = 0


@dataclass
class AdapterCard:
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


@dataclass
class Entry:
    """One picker entry: a loaded model (shared by the adapters of a group) and how to run it."""

    model: Any
    tok: Any  # the tokenizer saved with this adapter (the first adapter's for the base)
    task: str
    chat: bool  # render through the chat template, as recorded at training time
    peft_name: str | None  # None: run the base with adapters disabled
    stop_ids: list[int]
    card: AdapterCard


class Engine:
    """Serialises model use: peft's active adapter is global state, so one request at a time holds the model."""

    def __init__(self, entries: dict[str, Entry], limits: Limits):
        self.entries, self.limits = entries, limits
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.entries)

    def card(self, name: str) -> AdapterCard:
        return self._entry(name).card

    def generate(self, name: str, prompt: Prompt, params: GenerationParams,
                 cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the growing answer. Closing the iterator or setting `cancel` stops the model at its next token."""
        entry = self._generator(name)
        ids = self._render(entry, prompt)
        yield from self._run(entry, ids, params, cancel or threading.Event())

    def chat(self, name: str, messages: list[dict[str, Any]], params: GenerationParams,
             cancel: threading.Event | None = None) -> Iterator[str]:
        entry = self._generator(name)
        if not entry.chat:
            raise InputError(f"'{name}' was trained without a chat template: use the Generate tab with plain text.")
        if not messages or messages[-1].get("role") != "user":
            raise InputError("Type a message first.")
        yield from self.generate(name, messages, params, cancel)

    def compare(self, name: str, prompt: Prompt, params: GenerationParams,
                cancel: threading.Event | None = None) -> Iterator[tuple[str, str]]:
        """(base text, adapter text) as both grow: the base first, then the adapter; same prompt ids, params, seed."""
        entry = self._generator(name)
        if entry.peft_name is None:
            raise InputError("Pick an adapter to compare with the base model.")
        base = Entry(entry.model, entry.tok, entry.task, entry.chat, None, entry.stop_ids, entry.card)
        ids = self._render(entry, prompt)  # rendered the adapter's way for both sides, so only the weights differ
        cancel = cancel or threading.Event()
        base_text = ""
        for base_text in self._run(base, ids, params, cancel):
            yield base_text, ""
        if cancel.is_set():
            return
        for text in self._run(entry, ids, params, cancel):
            yield base_text, text

    def classify(self, name: str, text: str) -> dict[str, float]:
        """Label -> probability (softmax of the classifier logits), labels in run.json order."""
        import torch

        entry = self._entry(name)
        if entry.task != "classification":
            raise InputError(f"'{name}' generates text: pick a classification adapter to classify.")
        ids = self._check_length(text, lambda: list(entry.tok(text)["input_ids"]))
        with self._lock, self._active(entry), torch.inference_mode():
            logits = entry.model(input_ids=torch.tensor([ids])).logits[0].float()
        probs = torch.softmax(logits, dim=-1).tolist()
        labels = entry.card.labels or [str(i) for i in range(len(probs))]
        return dict(zip(labels, probs, strict=True))

    # -- internals --------------------------------------------------------------------------------------------

    def _entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise InputError(f"unknown adapter '{name}'; choose one of: {', '.join(self.entries)}")
        return self.entries[name]

    def _generator(self, name: str) -> Entry:
        entry = self._entry(name)
        if entry.task != "causal_lm":
            raise InputError(f"'{name}' is a classification adapter: use the Classify tab.")
        return entry

    def _render(self, entry: Entry, prompt: Prompt) -> list[int]:
        text = prompt if isinstance(prompt, str) else "".join(str(m.get("content", "")) for m in prompt)
        return self._check_length(text, lambda: prompt_ids(entry.tok, prompt, chat=entry.chat))

    def _check_length(self, text: str, encode: Any) -> list[int]:
        limit = self.limits.max_prompt_tokens
        if not text.strip():
            raise InputError("Type a prompt first: the input is empty.")
        if len(text) > limit * CHARS_PER_TOKEN_CAP:
            raise InputError(f"The input is {len(text)} characters, far over this demo's limit of {limit} tokens. Shorten it.")
        ids: list[int] = encode()
        if len(ids) > limit:
            raise InputError(f"The input is {len(ids)} tokens; this demo accepts at most {limit}. Shorten it "
                             f"(or start the demo with a larger --max-prompt-tokens).")
        return ids

    def _run(self, entry: Entry, ids: list[int], params: GenerationParams, cancel: threading.Event) -> Iterator[str]:
        with self._lock, self._active(entry):
            yield from _stream(entry, ids, self._clamped(params), cancel)

    def _clamped(self, params: GenerationParams) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=max(1, min(int(params.max_new_tokens), self.limits.max_new_tokens)),
            temperature=max(0.0, float(params.temperature)),
            top_p=min(1.0, max(0.01, float(params.top_p))),
            seed=int(params.seed),
        )

    @staticmethod
    def _active(entry: Entry) -> Any:
        """Select the entry's adapter, or disable all adapters for the base; call with the lock held."""
        if entry.peft_name is not None:
            entry.model.set_adapter(entry.peft_name)
            return contextlib.nullcontext()
        if hasattr(entry.model, "disable_adapter"):
            return entry.model.disable_adapter()
        return contextlib.nullcontext()


def _stream(entry: Entry, ids: list[int], params: GenerationParams, cancel: threading.Event) -> Iterator[str]:
    """Run `generate` in a thread feeding a TextIteratorStreamer; on close or cancel, stop it and wait for it."""
    import torch
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    streamer = TextIteratorStreamer(entry.tok, skip_prompt=True, skip_special_tokens=True, timeout=300)
    closed = threading.Event()  # this stream's own stop, so a shared `cancel` is only set by the caller
    kwargs = _generate_kwargs(entry, ids, params, streamer, StoppingCriteriaList([_Cancelled(cancel, closed)]))
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                entry.model.generate(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread below
            failure.append(exc)
            streamer.end()

    torch.manual_seed(params.seed)  # global RNG: safe because the engine lock is held
    thread = threading.Thread(target=work, name="finetune-generate", daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            if piece:  # the streamer also sends "" while a multi-byte character is incomplete
                text += piece
                yield text
    finally:
        closed.set()  # a closed iterator (the user pressed stop) must not leave the model generating
        thread.join()
    if failure:
        raise failure[0]


def _generate_kwargs(entry: Entry, ids: list[int], params: GenerationParams, streamer: Any, stopping: Any) -> dict[str, Any]:
    import torch

    sample = params.temperature > 0
    kwargs: dict[str, Any] = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "max_new_tokens": params.max_new_tokens,
        "do_sample": sample,
        "eos_token_id": entry.stop_ids,
        "pad_token_id": entry.tok.pad_token_id,
        "streamer": streamer,
        "stopping_criteria": stopping,
    }
    if sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
    else:  # a checkpoint's generation_config may carry sampling defaults that warn under greedy decoding
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


class _Cancelled:
    """A stopping criterion: true for every row once any event is set (checked after each new token)."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)


# -- loading ------------------------------------------------------------------------------------------------------


def load_engine(folders: Sequence[str | Path], base: str | None = None, limits: Limits | None = None) -> Engine:
    """Load every adapter folder; those sharing task, base and labels share one loaded model (peft multi-adapter).
    With no folder, `base` alone is served."""

    if not folders and not base:
        raise FinetuneError("nothing to serve: give one or more adapter folders, or --base MODEL for a base model alone")
    infos = [read_adapter(f) for f in folders]
    _check_names(infos)
    entries: dict[str, Entry] = {}
    groups = _grouped(infos, base)
    causal = [key for key in groups if key[0] == "causal_lm"]
    if len(causal) > 1:
        raise FinetuneError("the text-generation adapters were trained on different bases ("
                            + "; ".join(f"{k[1]}: {', '.join(i.name for i in groups[k])}" for k in causal)
                            + "). Start one demo per base, or pass --base to run them all on one.")
    if not infos:
        entries[BASE] = _base_only_entry(str(base))
    for key, members in groups.items():
        group_entries = _load_group(members, base)
        if key[0] == "causal_lm":
            entries[BASE] = _base_entry(next(iter(group_entries.values())))
        entries.update(group_entries)
    return Engine(entries, limits or Limits())


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


def _load_group(members: list[Any], base: str | None) -> dict[str, Entry]:
    """The first adapter loads the base (through finetune.lifecycle.folder); the others are added to it by name."""
    from transformers import AutoTokenizer

    model, tok, first = load_adapter(members[0].folder, base)
    entries = {first.name: _entry(model, tok, first, "default")}
    for i, info in enumerate(members[1:], start=1):
        check_adapter_fits(info, *base_source(info, base))
        result = model.load_adapter(str(info.folder), adapter_name=f"adapter_{i}")
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise FinetuneError(f"{info.folder}: {len(unexpected)} adapter weights match no layer of the base loaded "
                                f"for {first.folder} (e.g. {unexpected[0]}); was it trained on another base?")
        other_tok = AutoTokenizer.from_pretrained(str(info.folder))
        set_pad_token(other_tok)
        entries[info.name] = _entry(model, other_tok, info, f"adapter_{i}")
    model.eval()
    return entries


def _entry(model: Any, tok: Any, info: Any, peft_name: str) -> Entry:
    stop_ids = stop_token_ids(tok, getattr(model, "generation_config", None)) if info.task == "causal_lm" else []
    return Entry(model, tok, info.task, info.chat, peft_name, stop_ids, _card(info))


def _base_entry(first: Entry) -> Entry:
    card = AdapterCard(name=BASE, base=first.card.base, task="causal_lm", chat=first.chat)
    return Entry(first.model, first.tok, "causal_lm", first.chat, None, first.stop_ids, card)


def _base_only_entry(base: str) -> Entry:
    model, tok, source = load_model(ModelConfig(name_or_path=base))
    model.eval()
    chat = uses_chat_template(tok)
    card = AdapterCard(name=BASE, base=source.ref, task="causal_lm", chat=chat)
    return Entry(model, tok, "causal_lm", chat, None, stop_token_ids(tok, model.generation_config), card)


def _card(info: Any) -> AdapterCard:
    import json

    eval_file = info.folder / "eval.json"
    report = json.loads(eval_file.read_text()) if eval_file.is_file() else {}
    # eval.json (finetune/evaluation/report.py): metrics -> {base, adapter, delta, better}; scalars only here
    eval_metrics = {name: {k: m.get(k) for k in ("base", "adapter", "delta")}
                    for name, m in (report.get("metrics") or {}).items() if isinstance(m, dict) and "delta" in m}
    return AdapterCard(
        name=info.name, base=info.base, task=info.task, rank=info.adapter_config.get("r"),
        alpha=info.adapter_config.get("lora_alpha"), chat=info.chat, labels=info.run.get("labels"),
        metrics=dict(info.run.get("metrics") or {}), eval_metrics=eval_metrics,
        eval_decoding=dict(report.get("decoding") or {}), prompt=info.prompt,
    )
