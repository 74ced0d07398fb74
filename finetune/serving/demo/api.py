"""The page's API for gradio_client and HTTP callers: /generate, /chat, /compare, /classify and /card, with named,
typed parameters (`max_new_tokens`, `temperature`, `top_p`, `seed`). Prompts are built as the page builds them
(the recorded system prompt unless one is given), and a refused request is an error for the caller (an AppError in
gradio_client) and one line in the server log.

No `from __future__ import annotations` here: gr.api reads the annotations at runtime to type the endpoints."""

from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from finetune.errors import FinetuneError
from finetune.serving.demo.card import card_markdown, default_temperature, summary_line
from finetune.serving.demo.runs import chat_for, prompt_for, reference_for, refusal
from finetune.serving.engine import AdapterCard, Engine, GenerationParams, InputError

DEFAULT_NEW_TOKENS = 128


def add_api(engine: Engine, concurrency_limit: int) -> None:
    """Declare the endpoints inside the Blocks being built."""
    import gradio as gr

    limit = engine.limits.max_new_tokens
    default_new = min(DEFAULT_NEW_TOKENS, limit)
    queued = {"concurrency_id": "model", "concurrency_limit": concurrency_limit}

    def generate(adapter: str, prompt: str, system_prompt: str | None = None, max_new_tokens: int = default_new,
                 temperature: float | None = None, top_p: float = 0.95, seed: int = 0) -> Iterator[str]:
        """Stream the answer (the text so far). system_prompt: None = the adapter's recorded one, "" = none.
        temperature: None = the adapter's default (0, greedy, when its eval decoded greedily)."""
        def run() -> Iterator[str]:
            card = engine.card(adapter)
            settings = _settings(card, max_new_tokens, temperature, top_p, seed, limit)
            yield from engine.generate(adapter, prompt_for(card, system_prompt, prompt), settings)

        yield from _guarded(f"/generate ({adapter})", run())

    def chat(adapter: str, messages: list[dict[str, Any]], system_prompt: str | None = None,
             max_new_tokens: int = default_new, temperature: float | None = None, top_p: float = 0.95,
             seed: int = 0) -> Iterator[str]:
        """Stream the next assistant turn of `messages` ({"role": "user" | "assistant", "content": text} dicts).
        The system prompt is put first as in /generate, unless `messages` starts with one."""
        def run() -> Iterator[str]:
            card = engine.card(adapter)
            settings = _settings(card, max_new_tokens, temperature, top_p, seed, limit)
            has_system = bool(messages) and messages[0].get("role") == "system"
            turns = list(messages) if has_system else chat_for(card, system_prompt, messages)
            yield from engine.chat(adapter, turns, settings)

        yield from _guarded(f"/chat ({adapter})", run())

    def compare(adapter: str, prompt: str, system_prompt: str | None = None, max_new_tokens: int = default_new,
                temperature: float | None = None, top_p: float = 0.95, seed: int = 0) -> Iterator[dict[str, Any]]:
        """Stream {"base", "adapter", "reference"}: the base model and the adapter on the same prompt, settings and
        seed; reference is the recorded answer when the prompt is one of the adapter's examples, else null."""
        def run() -> Iterator[dict[str, Any]]:
            card = engine.card(adapter)
            settings = _settings(card, max_new_tokens, temperature, top_p, seed, limit)
            reference = reference_for(card, prompt)
            for base, text in engine.compare(adapter, prompt_for(card, system_prompt, prompt), settings):
                yield {"base": base, "adapter": text, "reference": reference}

        yield from _guarded(f"/compare ({adapter})", run())

    def classify(adapter: str, text: str) -> dict[str, float]:
        """Label -> probability for a classification adapter."""
        return _guarded_call(f"/classify ({adapter})", lambda: engine.classify(adapter, text))

    def card(adapter: str) -> dict[str, Any]:
        """The adapter's card: summary line, Markdown card, task, chat template, recorded system prompt, examples,
        training and eval metrics."""
        return _guarded_call(f"/card ({adapter})", lambda: card_info(engine.card(adapter)))

    for fn in (generate, chat, compare, classify):
        gr.api(fn, api_name=fn.__name__, **queued)  # type: ignore[arg-type]
    gr.api(card, api_name="card", queue=False)


def card_info(card: AdapterCard) -> dict[str, Any]:
    """What /card returns."""
    record = card.prompt
    return {
        "name": card.name, "summary": summary_line(card), "card": card_markdown(card), "base": card.base,
        "task": card.task, "chat_template": card.chat, "lora_rank": card.rank, "lora_alpha": card.alpha,
        "labels": card.labels, "system_prompt": record.system_prompt if record else None,
        "examples": [{"prompt": e.prompt, "reference": e.reference} for e in record.examples] if record else [],
        "metrics": card.metrics, "eval_metrics": card.eval_metrics, "eval_decoding": card.eval_decoding,
        "default_temperature": default_temperature(card),
    } | ({"prompt_record": asdict(record)} if record else {})


def _settings(card: AdapterCard, max_new_tokens: int, temperature: float | None, top_p: float, seed: int,
              limit: int) -> GenerationParams:
    if not 1 <= int(max_new_tokens) <= limit:
        raise InputError(f"max_new_tokens={max_new_tokens} is outside this demo's range 1..{limit} "
                         "(the server's --max-new-tokens)")
    temp = default_temperature(card) if temperature is None else float(temperature)
    return GenerationParams(int(max_new_tokens), temp, float(top_p), int(seed))


def _guarded(where: str, stream: Iterator[Any]) -> Iterator[Any]:
    """A refused request becomes a gradio Error for the caller (an AppError in gradio_client) and one log line."""
    try:
        yield from stream
    except FinetuneError as exc:
        raise _error(where, exc) from None


def _guarded_call(where: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except FinetuneError as exc:
        raise _error(where, exc) from None


def _error(where: str, exc: FinetuneError) -> Exception:
    import gradio as gr

    return gr.Error(refusal(where, str(exc)), title="Not run", print_exception=False)
