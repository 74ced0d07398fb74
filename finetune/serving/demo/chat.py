"""The Chat tab: a conversation behind the recorded system prompt, rendered through the chat template as training
did. Enter sends; Stop ends the answer; Retry answers the last message again; Undo takes back the last exchange
and puts its message back in the box; Clear starts over.

No `from __future__ import annotations` here: gradio reads the handlers' annotations (gr.Request) at runtime."""

import threading
from collections.abc import Iterator
from typing import Any

from finetune.errors import FinetuneError
from finetune.serving.demo.runs import Tracked, chat_for, params, refusal
from finetune.serving.demo.widgets import (
    Page,
    hide_warning,
    prompt_area,
    show_warning,
    status_line,
    system_box,
    warning_box,
    wire_run,
)

Turns = list[dict[str, Any]]


def chat_tab(page: Page) -> None:
    """Build the Chat tab on `page` and wire its Send, Stop, Retry, Undo and Clear buttons."""
    import gradio as gr

    with gr.Tab("Chat", id="chat") as tab:
        system = system_box(page, "chat")
        chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=260, buttons=["copy", "copy_all"])
        history = gr.State([])
        area = prompt_area(page, "chat", "Message", 1, "Type a message and press Enter", system=system, history=history)
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="chat-btn", min_width=80)
            stop = gr.Button("Stop", interactive=False, elem_id="chat-stop", min_width=80)
            retry = gr.Button("Retry", elem_id="chat-retry", min_width=80)
            undo = gr.Button("Undo", elem_id="chat-undo", min_width=80)
            clear = gr.Button("Clear", elem_id="chat-clear", min_width=80)
        warning = warning_box("chat")
        status = status_line("chat")

    outputs = [chatbot, history, area.prompt, status, warning]
    inputs = [page.picker, system, area.prompt, history, *page.settings]
    reply = _replier(page)

    def send_message(name: str, system_text: str, text: str, past: Turns, max_new: float, temperature: float,
                     top_p: float, seed: float, run_id: str, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        turns = [*past, {"role": "user", "content": text or ""}]
        with page.stops.running(request.session_hash or "", run_id) as cancel:
            yield from reply(name, system_text, turns, past, text, (max_new, temperature, top_p, seed), cancel)

    def retry_last(name: str, system_text: str, text: str, past: Turns, max_new: float, temperature: float,
                   top_p: float, seed: float, run_id: str, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        turns = past[:-1] if past and past[-1]["role"] == "assistant" else past
        if not turns:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), show_warning(refusal("chat retry", "Nothing to retry yet."))
            return
        with page.stops.running(request.session_hash or "", run_id) as cancel:
            yield from reply(name, system_text, turns, past, gr.skip(), (max_new, temperature, top_p, seed), cancel)

    buttons = [send, retry, undo]
    runs = [(send_message, [send.click, area.prompt.submit]), (retry_last, [retry.click])]
    wire_run(page, tab, buttons, stop, runs, inputs, outputs)
    quick = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}
    undo.click(_undo, history, [chatbot, history, area.prompt, status, warning], **quick)  # type: ignore[arg-type]
    gr.on([clear.click, chatbot.clear], lambda: ([], [], "", hide_warning()), None, [chatbot, history, status, warning],
          **quick)  # type: ignore[arg-type]


def _replier(page: Page) -> Any:
    """The streaming reply shared by Send and Retry: the conversation shows at once; a refusal restores the previous
    conversation and message and shows one inline warning."""
    import gradio as gr

    engine = page.engine

    def reply(name: str, system: str, turns: Turns, past: Turns, restore: Any, settings: tuple[float, ...],
              cancel: threading.Event) -> Iterator[tuple[Any, ...]]:
        yield turns, gr.skip(), "", "", hide_warning()
        try:
            stream = engine.chat(name, chat_for(engine.card(name), system, turns), params(*settings), cancel)
            tracked = Tracked(engine, name, stream, cancel, int(settings[0]))
            for answer in tracked:
                yield [*turns, {"role": "assistant", "content": answer}], gr.skip(), gr.skip(), gr.skip(), gr.skip()
        except FinetuneError as exc:
            yield past, past, restore, gr.skip(), show_warning(refusal(f"chat ({name})", str(exc)))
            return
        assert tracked.outcome is not None
        done = [*turns, {"role": "assistant", "content": tracked.text}]
        yield done, done, gr.skip(), tracked.outcome.status(), hide_warning()

    return reply


def _undo(past: Turns) -> tuple[Any, ...]:
    """Drop the last exchange (the answer and the message before it); the message goes back in the box."""
    import gradio as gr

    turns = list(past)
    if turns and turns[-1]["role"] == "assistant":
        turns.pop()
    if not turns:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), show_warning(refusal("chat undo", "Nothing to undo."))
    message = turns.pop()
    return turns, turns, str(message.get("content", "")), "", hide_warning()
