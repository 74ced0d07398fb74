"""One request of the page or of its API: the prompt rendered as training built it (prompt.json's system prompt,
the chat template as recorded), the generation settings, a Stop that ends the run gracefully, the status line after
it, and refusals shown as one inline warning and logged as one line. No gradio here."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from finetune.data.prompt_record import PromptRecord
from finetune.data.prompting import Messages, prompt_ids
from finetune.serving.engine import AdapterCard, Engine, GenerationParams, InputError

STOPPED = {"stop": "end of answer", "length": "max tokens", "cancelled": "Stop"}  # finish reason -> status words


def prompt_for(card: AdapterCard, system_prompt: str | None, text: str) -> str | Messages:
    """What the engine is given for one user text: for a chat adapter the conversation training built (the system
    prompt, the recorded one when `system_prompt` is None, "" for none, then the text); plain text otherwise."""
    _require_text(text)
    if not card.chat:
        return text
    return _record(card).messages(text, system_prompt)


def chat_for(card: AdapterCard, system_prompt: str | None, turns: Messages) -> Messages:
    """A conversation (user / assistant turns) behind the system prompt, as `prompt_for` puts it."""
    if turns and turns[-1].get("role") == "user":
        _require_text(str(turns[-1].get("content") or ""))
    system = _record(card).system_prompt if system_prompt is None else system_prompt
    return ([{"role": "system", "content": system}] if system else []) + list(turns)


def reference_for(card: AdapterCard, text: str) -> str | None:
    """The recorded reference answer when `text` is one of the adapter's example prompts."""
    record = card.prompt
    return next((e.reference for e in record.examples if e.prompt.strip() == text.strip()), None) if record else None


def count_tokens(engine: Engine, name: str, prompt: str | Messages) -> int:
    """Prompt tokens as the engine's limit counts them (template and system prompt included)."""
    entry = engine.entries[name]
    return len(prompt_ids(entry.tok, prompt, chat=entry.chat))


def token_counter(engine: Engine, name: str, prompt: str | Messages) -> str:
    """`N / limit tokens` under a prompt box, with a warning sign once over the limit."""
    limit = engine.limits.max_prompt_tokens
    try:
        count = count_tokens(engine, name, prompt) if _has_text(prompt) else 0
    except (KeyError, TypeError, ValueError):  # a classification entry or a half-typed template input
        return ""
    over = " — over the limit: shorten the prompt" if count > limit else ""
    return f"{count} / {limit} tokens{over}"


def params(max_new_tokens: float, temperature: float, top_p: float, seed: float) -> GenerationParams:
    """Settings from sliders or an API call (numbers may arrive as floats or None)."""
    return GenerationParams(int(max_new_tokens or 1), float(temperature or 0.0), float(top_p or 1.0), int(seed or 0))


class Stops:
    """Stop buttons: one cancel event per (browser session, run id). Setting it ends the engine's run at its next
    token, so the run finishes normally and still reports its tokens and its stop reason; a Stop that comes while
    the run still waits in the queue is kept for it."""

    LIMIT = 4096  # events remembered (a few bytes each; finished runs drop theirs)

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], threading.Event] = {}
        self._lock = threading.Lock()

    def event(self, session: str, run_id: str) -> threading.Event:
        with self._lock:
            if len(self._events) >= self.LIMIT:
                self._events.clear()
            return self._events.setdefault((session, run_id), threading.Event())

    def stop(self, session: str, run_id: str) -> None:
        self.event(session, run_id).set()

    @contextlib.contextmanager
    def running(self, session: str, run_id: str) -> Iterator[threading.Event]:
        """The cancel event of one run, forgotten when the run ends."""
        try:
            yield self.event(session, run_id)
        finally:
            with self._lock:
                self._events.pop((session, run_id), None)


@dataclass
class Outcome:
    """How a streamed answer ended: tokens generated, seconds taken, and why (stop, length or cancelled)."""

    tokens: int
    seconds: float
    reason: str  # stop | length | cancelled

    def status(self) -> str:
        """`23 tokens · 9.8 tokens/s · stopped: end of answer`."""
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return f"{self.tokens} tokens · {rate:.1f} tokens/s · stopped: {STOPPED.get(self.reason, self.reason)}"


class Tracked:
    """A text stream from the engine, timed; `outcome` after it ends. Token counts come from re-encoding the answer
    with the adapter's tokenizer (the engine's text stream does not report ids)."""

    def __init__(self, engine: Engine, name: str, stream: Iterator[str], cancel: threading.Event, max_new: int):
        self.engine, self.name, self.stream, self.cancel, self.max_new = engine, name, stream, cancel, max_new
        self.text, self.started = "", time.perf_counter()
        self.outcome: Outcome | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for text in self.stream:
                self.text = text
                yield text
        finally:
            self.stream.close()  # type: ignore[attr-defined]
        self.outcome = self._outcome()

    def _outcome(self) -> Outcome:
        tokens = answer_tokens(self.engine, self.name, self.text, self.max_new)
        reason = finish_reason(self.engine, tokens, self.max_new, self.cancel.is_set())
        return Outcome(tokens, time.perf_counter() - self.started, reason)


def answer_tokens(engine: Engine, name: str, text: str, max_new: int) -> int:
    """Tokens of a generated answer, re-encoded with the adapter's tokenizer (capped at what was allowed: broken
    UTF-8 from a model's byte tokens can re-encode longer)."""
    count = len(engine.entries[name].tok(text, add_special_tokens=False)["input_ids"]) if text else 0
    return min(count, max_new, engine.limits.max_new_tokens)


def finish_reason(engine: Engine, tokens: int, max_new: int, cancelled: bool) -> str:
    """Why a run ended: "cancelled" (Stop was pressed), "length" (`tokens` reached the request's maximum, capped by
    the server's limit) or "stop"."""
    if cancelled:
        return "cancelled"
    return "length" if tokens >= min(max_new, engine.limits.max_new_tokens) else "stop"


def pair_status(engine: Engine, name: str, texts: tuple[str, str], max_new: int, cancelled: bool, seconds: float) -> str:
    """Compare's status line: `base: 12 tokens, end of answer · adapter: 9 tokens, end of answer · 8.1 tokens/s`."""
    counts = [answer_tokens(engine, name, t, max_new) for t in texts]
    sides = [f"{side}: {n} tokens, {STOPPED[finish_reason(engine, n, max_new, cancelled)]}"
             for side, n in zip(("base", "adapter"), counts, strict=True)]
    rate = sum(counts) / seconds if seconds > 0 else 0.0
    return " · ".join([*sides, f"{rate:.1f} tokens/s"])


def refusal(where: str, message: str) -> str:
    """Log a refused request as one line (never a traceback); returns the message for the page or the caller."""
    print(f"demo: refused {where}: {message}", file=sys.stderr, flush=True)
    return message


def _require_text(text: str) -> None:
    """The system prompt alone is no request: the user's own text must not be empty."""
    if not text.strip():
        raise InputError("Type a prompt first: the input is empty.")


def _record(card: AdapterCard) -> PromptRecord:
    return card.prompt if card.prompt is not None else PromptRecord(card.chat)


def _has_text(prompt: str | Messages) -> bool:
    if isinstance(prompt, str):
        return bool(prompt.strip())
    return any(str(m.get("content", "")).strip() for m in prompt if m.get("role") != "system")
