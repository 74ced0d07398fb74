"""What the engine serves: the picker entries (a loaded model and how to run it), their cards, and the limits every
request is held to. Built by finetune/serving/loading.py, used by finetune/serving/engine.py."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from finetune.data.prompt_record import PromptRecord
from finetune.serving.batcher import Batcher
from finetune.serving.lora_rows import BASE_SLOT

BASE = "base model"  # the picker entry that runs the base with every adapter disabled


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
