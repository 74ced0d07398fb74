"""How an adapter's prompts were built, recorded at save time (`prompt.json` in the adapter folder), so that eval,
the demo and the server render a request exactly as training did: the chat template on or off, the system prompt
the training rows shared, and a few example prompts with their references taken from the validation data (or the
training data when there is none).

The examples may hold private data: `finetune publish` strips them (see lifecycle/publish.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

from finetune.config.data import DataConfig
from finetune.data.chain import records
from finetune.data.formats import Record, detect_format
from finetune.data.prompting import Messages, prompt_and_reference
from finetune.data.sources import BadRows, iter_source, normalise_sources, source_columns

PROMPT_FILE = "prompt.json"
MAX_EXAMPLES = 5
SCAN_ROWS = 2000  # training rows read to find the shared system prompt (the whole file when smaller)


@dataclass
class PromptExample:
    """One example prompt: what a user would type, and the answer training (or validation) data gives for it."""

    prompt: str  # the last user message (chat) or the plain prompt; for classification, the text
    reference: str  # the reference answer, or the class name
    messages: Messages | None = None  # chat only: the whole prompt conversation (system and earlier turns included)


@dataclass
class PromptRecord:
    """The prompt format an adapter was trained with (see the module docstring)."""

    chat_template: bool
    system_prompt: str | None = None
    # where system_prompt comes from: data.system_prompt | training rows | none | varies (rows differ: none recorded)
    system_prompt_source: str = "none"
    examples: list[PromptExample] = field(default_factory=list)
    examples_source: str | None = None  # validation | train

    def to_dict(self, with_examples: bool = True) -> dict[str, Any]:
        """The JSON form of prompt.json; without examples for anything published."""
        out = asdict(self)
        if not with_examples:
            out.update(examples=[], examples_source=None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptRecord:
        """Read prompt.json's content (unknown keys from newer versions are ignored)."""
        examples = [PromptExample(str(e.get("prompt", "")), str(e.get("reference", "")), e.get("messages"))
                    for e in data.get("examples") or [] if isinstance(e, dict)]
        return cls(bool(data.get("chat_template")), data.get("system_prompt"), str(data.get("system_prompt_source") or "none"),
                   examples, data.get("examples_source"))

    def messages(self, user_text: str, system_prompt: str | None = None) -> Messages:
        """A one-turn chat as training built it: the system prompt (the recorded one unless given), then the user."""
        system = self.system_prompt if system_prompt is None else system_prompt
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]


def describe_prompts(cfg: DataConfig, chat: bool) -> PromptRecord:
    """The prompt record of a job's data: the shared system prompt of the training rows and a few examples."""
    system, source = _shared_system_prompt(cfg, chat)
    record = PromptRecord(chat, system, source)
    for split, value in (("validation", cfg.validation), ("train", cfg.train)):
        examples = _examples(value, cfg, chat)
        if examples:
            record.examples, record.examples_source = examples, split
            break
    return record


def _records(value: Any, cfg: DataConfig, limit: int) -> list[Record]:
    bad = BadRows("skip")  # a record describes the data; bad rows are training's business, not ours
    out: list[Record] = []
    for src in normalise_sources(value, cfg):
        if src.hub is not None:
            continue  # a hub dataset is not downloaded again just for the record
        if src.format == "auto":
            first = next(iter_source(src, bad, streaming=True), None)
            if first is None:
                continue
            src.format = detect_format(first[0], first[1], source_columns(src))  # type: ignore[assignment]
        out += [r for r, _ in islice(records(src, cfg, bad, streaming=True), limit - len(out))]
        if len(out) >= limit:
            break
    return out


def _system_of(record: Record, chat: bool) -> str | None:
    if record["kind"] == "preference":
        record = record["chosen"]
    if record["kind"] == "chat":
        first = record["messages"][0]
        return str(first.get("content")) if first.get("role") == "system" else None
    if record["kind"] == "pair" and chat:  # plain-text prompts never carry the system prompt
        return record.get("system") or None
    return None


def _shared_system_prompt(cfg: DataConfig, chat: bool) -> tuple[str | None, str]:
    found = {_system_of(r, chat) for r in _records(cfg.train, cfg, SCAN_ROWS)}
    if len(found) > 1:
        return None, "varies"
    value = next(iter(found), None)
    if value is None:
        return None, "none"
    return value, "data.system_prompt" if value == cfg.system_prompt else "training rows"


def _examples(value: Any, cfg: DataConfig, chat: bool) -> list[PromptExample]:
    if not value:
        return []
    out = []
    for record in _records(value, cfg, MAX_EXAMPLES * 4):
        example = _example(record, chat)
        if example is not None:
            out.append(example)
        if len(out) == MAX_EXAMPLES:
            break
    return out


def _example(record: Record, chat: bool) -> PromptExample | None:
    if record["kind"] == "cls":
        return PromptExample(str(record["text"]), str(record["label"]))
    split = prompt_and_reference(record, chat)
    if split is None:
        return None
    prompt, reference = split
    if isinstance(prompt, str):
        return PromptExample(prompt, reference)
    users = [m for m in prompt if m.get("role") == "user" and isinstance(m.get("content"), str)]
    return PromptExample(str(users[-1]["content"]), reference, prompt) if users else None
