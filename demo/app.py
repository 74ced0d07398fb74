"""The finetune demo: a gradio Blocks page over finetune.serving.engine (see docs/demo.md).

    python demo/app.py adapters/my-run [adapters/other ...] [--base MODEL] [--port 7860]

is the same as `finetune demo ...`. Importable: `build_app(engine)` returns the Blocks, `launch(app, ...)` serves it.
The page is local-only by design: loopback by default, never a share link, bundled fonts only, no analytics.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gradio as gr

    from finetune.serving.engine import AdapterCard, Engine


def build_app(engine: Engine, concurrency_limit: int = 1, queue_size: int = 64) -> gr.Blocks:
    """The page: an adapter picker with its card, then Generate / Chat / Compare (text models) and Classify tabs."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: stops its version check
    import gradio as gr

    from finetune.serving.engine import BASE

    names = engine.names()
    default = next((n for n in names if n != BASE), names[0])
    tasks = {engine.card(n).task for n in names}
    with gr.Blocks(title="finetune demo", analytics_enabled=False) as app:
        gr.Markdown("## finetune demo\nPick an adapter (or the base model alone), then try it in a tab.")
        picker = gr.Dropdown(choices=names, value=default, label="Adapter", elem_id="adapter-picker")
        card = gr.Markdown(card_markdown(engine.card(default)), elem_id="adapter-card")
        picker.change(lambda name: card_markdown(engine.card(name)), picker, card, api_name="card")
        settings = _settings(engine)
        if "causal_lm" in tasks:
            _generate_tab(engine, picker, settings)
            _chat_tab(engine, picker, settings)
            _compare_tab(engine, picker, settings)
        if "classification" in tasks:
            _classify_tab(engine, picker)
    app.queue(default_concurrency_limit=concurrency_limit, max_size=queue_size)
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, auth: list[tuple[str, str]] | None = None,
           block: bool = True) -> str:
    """Serve on `host` (loopback unless asked); returns the local URL. Never a share link, never a browser tab."""
    _, url, _ = app.launch(server_name=host, server_port=port, auth=auth, share=False, inbrowser=False,
                           prevent_thread_lock=not block, ssr_mode=False, mcp_server=False, enable_monitoring=False,
                           quiet=True, footer_links=["api"])
    return str(url)


def card_markdown(card: AdapterCard) -> str:
    rows = [("base", f"`{card.base}`"), ("task", card.task), ("chat template", "yes" if card.chat else "no")]
    if card.rank is not None:
        rows.append(("LoRA rank / alpha", f"{card.rank} / {card.alpha}"))
    if card.labels:
        rows.append(("labels", ", ".join(card.labels)))
    rows += [(k if k.startswith("train") else f"train {k}", _fmt(v)) for k, v in card.metrics.items()]
    rows += [(f"eval {k}", f"{_fmt(m['adapter'])} (base {_fmt(m['base'])}, delta {_fmt(m['delta'])})")
             for k, m in card.eval_metrics.items()]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"**{card.name}**\n\n| adapter card | |\n|---|---|\n{table}"


# -- tabs ---------------------------------------------------------------------------------------------------------


def _settings(engine: Engine) -> list[Any]:
    import gradio as gr

    top = engine.limits.max_new_tokens
    with gr.Accordion("Generation settings", open=False), gr.Row():
        max_new = gr.Slider(1, top, value=min(128, top), step=1, label="Max new tokens", elem_id="max-new-tokens")
        temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature")
        top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
        seed = gr.Number(value=0, precision=0, label="Seed")
    return [max_new, temperature, top_p, seed]


def _generate_tab(engine: Engine, picker: Any, settings: list[Any]) -> None:
    import gradio as gr

    with gr.Tab("Generate"):
        prompt = gr.Textbox(label="Prompt", lines=4, elem_id="prompt")
        with gr.Row():
            go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
            stop = gr.Button("Stop", elem_id="stop-btn")
        output = gr.Textbox(label="Output", lines=8, interactive=False, elem_id="output")

    def generate(name: str, text: str, *values: Any) -> Iterator[str]:
        yield from _friendly(engine.generate(name, text, _params(*values)))

    event = go.click(generate, [picker, prompt, *settings], output, api_name="generate")
    stop.click(None, None, None, cancels=[event])


def _chat_tab(engine: Engine, picker: Any, settings: list[Any]) -> None:
    import gradio as gr

    with gr.Tab("Chat"):
        chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot")
        history = gr.State([])
        message = gr.Textbox(label="Message", elem_id="chat-message")
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="chat-send")
            stop = gr.Button("Stop", elem_id="chat-stop")
            clear = gr.Button("Clear", elem_id="chat-clear")

    def chat(name: str, text: str, past: list[dict[str, str]], *values: Any) -> Iterator[tuple[Any, Any, str]]:
        turns = [*past, {"role": "user", "content": text}]
        yield turns, past, ""
        reply = ""
        for reply in _friendly(engine.chat(name, turns, _params(*values))):
            yield [*turns, {"role": "assistant", "content": reply}], past, ""
        done = [*turns, {"role": "assistant", "content": reply}]
        yield done, done, ""

    event = send.click(chat, [picker, message, history, *settings], [chatbot, history, message], api_name="chat")
    stop.click(None, None, None, cancels=[event])
    clear.click(lambda: ([], []), None, [chatbot, history], api_visibility="private")


def _compare_tab(engine: Engine, picker: Any, settings: list[Any]) -> None:
    import gradio as gr

    with gr.Tab("Compare"):
        prompt = gr.Textbox(label="Prompt (same prompt, settings and seed for both)", lines=3, elem_id="compare-prompt")
        with gr.Row():
            go = gr.Button("Compare", variant="primary", elem_id="compare-btn")
            stop = gr.Button("Stop", elem_id="compare-stop")
        with gr.Row():
            base_out = gr.Textbox(label="Base model", lines=8, interactive=False, elem_id="compare-base")
            adapter_out = gr.Textbox(label="With the adapter", lines=8, interactive=False, elem_id="compare-adapter")

    def compare(name: str, text: str, *values: Any) -> Iterator[tuple[str, str]]:
        yield from _friendly(engine.compare(name, text, _params(*values)))

    event = go.click(compare, [picker, prompt, *settings], [base_out, adapter_out], api_name="compare")
    stop.click(None, None, None, cancels=[event])


def _classify_tab(engine: Engine, picker: Any) -> None:
    import gradio as gr

    with gr.Tab("Classify"):
        text = gr.Textbox(label="Text", lines=4, elem_id="classify-text")
        go = gr.Button("Classify", variant="primary", elem_id="classify-btn")
        probs = gr.Label(label="Label probabilities", num_top_classes=20, elem_id="classify-output")

    def classify(name: str, value: str) -> dict[str, float]:
        from finetune.errors import FinetuneError

        try:
            return engine.classify(name, value)
        except FinetuneError as exc:
            raise _refused(exc) from None

    go.click(classify, [picker, text], probs, api_name="classify")


# -- helpers ------------------------------------------------------------------------------------------------------


def _params(max_new: Any, temperature: Any, top_p: Any, seed: Any) -> Any:
    from finetune.serving.engine import GenerationParams

    return GenerationParams(int(max_new or 1), float(temperature or 0.0), float(top_p or 1.0), int(seed or 0))


def _friendly(stream: Iterator[Any]) -> Iterator[Any]:
    """Closing this iterator (gradio does on Stop) closes the engine's, which stops the model at its next token."""
    from finetune.errors import FinetuneError

    with contextlib.closing(stream):  # type: ignore[type-var]
        try:
            yield from stream
        except FinetuneError as exc:
            raise _refused(exc) from None


def _refused(exc: Exception) -> Exception:
    """A refused request becomes a gradio message: a toast on the page, an AppError for API clients."""
    import gradio as gr

    return gr.Error(str(exc), title="Not run")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    from finetune.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
