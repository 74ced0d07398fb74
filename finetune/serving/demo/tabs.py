"""The Generate, Compare and Classify tabs. Every run: Generate off and Stop on while it runs, the answer streamed,
a status line after it (`23 tokens · 9.8 tokens/s · stopped: end of answer`), and a refused request keeps the
previous output and shows one inline warning.

No `from __future__ import annotations` here: gradio reads the handlers' annotations (gr.Request) at runtime."""

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from finetune.errors import FinetuneError
from finetune.serving.demo.card import model_name
from finetune.serving.demo.runs import Tracked, pair_status, params, prompt_for, reference_for, refusal
from finetune.serving.demo.widgets import (
    Page,
    hide_warning,
    prompt_area,
    run_buttons,
    show_warning,
    status_line,
    warning_box,
    wire_run,
)

NO_REFERENCE = "(pick an example to see its reference answer)"


def generate_tab(page: Page) -> None:
    """Build the Generate tab on `page`: one prompt, the answer streamed, then its status line."""
    import gradio as gr

    engine = page.engine
    with gr.Tab("Generate", id="generate") as tab:
        area = prompt_area(page, "generate", "Prompt", 4, "Type a prompt, or click an example below")
        go, stop = run_buttons("Generate", "generate")
        warning = warning_box("generate")
        output = gr.Textbox(label="Output", lines=8, interactive=False, elem_id="generate-output")
        status = status_line("generate")

    def run(name: str, system: str, text: str, max_new: float, temperature: float, top_p: float, seed: float,
            run_id: str, request: gr.Request) -> Iterator[tuple[Any, Any, Any]]:
        with page.stops.running(request.session_hash or "", run_id) as cancel:
            try:
                stream = engine.generate(name, prompt_for(engine.card(name), system, text or ""),
                                         params(max_new, temperature, top_p, seed), cancel)
                tracked = Tracked(engine, name, stream, cancel, int(max_new))
                for answer in tracked:
                    yield answer, "", hide_warning()
            except FinetuneError as exc:
                yield gr.skip(), gr.skip(), show_warning(refusal(f"generate ({name})", str(exc)))
                return
        assert tracked.outcome is not None
        yield tracked.text, tracked.outcome.status(), hide_warning()

    wire_run(page, tab, [go], stop, [(run, [go.click])], [page.picker, area.system, area.prompt, *page.settings],
             [output, status, warning])


def compare_tab(page: Page) -> None:
    """Build the Compare tab on `page`: one prompt answered by the base and by the adapter with the same settings and
    seed, beside the example's reference answer."""
    import gradio as gr

    engine = page.engine
    base_name = model_name(page.first_card().base)
    with gr.Tab("Compare", id="compare") as tab:
        area = prompt_area(page, "compare", "Prompt (the same prompt, settings and seed for both)", 3,
                           "Type a prompt, or click an example below")
        go, stop = run_buttons("Compare", "compare")
        warning = warning_box("compare")
        with gr.Row():
            base_out = gr.Textbox(label=f"Base model ({base_name})", lines=8, interactive=False, elem_id="compare-base",
                                  min_width=220)
            adapter_out = gr.Textbox(label="With the adapter", lines=8, interactive=False, elem_id="compare-adapter",
                                     min_width=220)
            reference = gr.Textbox(NO_REFERENCE, label="Reference (the example's answer in the data)", lines=8,
                                   interactive=False, elem_id="compare-reference", min_width=220)
        status = status_line("compare")

    def show_reference(name: str, text: str) -> str:
        return reference_for(engine.card(name), text or "") or NO_REFERENCE

    area.prompt.input(show_reference, [page.picker, area.prompt], reference, queue=False, show_progress="hidden",
                      trigger_mode="always_last", api_visibility="private")
    area.examples.click(show_reference, [page.picker, area.prompt], reference, queue=False, api_visibility="private")

    def run(name: str, system: str, text: str, max_new: float, temperature: float, top_p: float, seed: float,
            run_id: str, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        card = engine.card(name)
        ref = reference_for(card, text or "") or NO_REFERENCE
        texts, started = ("", ""), time.perf_counter()
        with page.stops.running(request.session_hash or "", run_id) as cancel:
            try:
                stream = engine.compare(name, prompt_for(card, system, text or ""),
                                        params(max_new, temperature, top_p, seed), cancel)
                with contextlib.closing(stream):  # type: ignore[type-var]
                    for texts in stream:
                        yield *texts, ref, "", hide_warning()
            except FinetuneError as exc:
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), show_warning(refusal(f"compare ({name})", str(exc)))
                return
            stopped = cancel.is_set()
        yield *texts, ref, pair_status(engine, name, texts, int(max_new), stopped, time.perf_counter() - started), hide_warning()

    wire_run(page, tab, [go], stop, [(run, [go.click])], [page.picker, area.system, area.prompt, *page.settings],
             [base_out, adapter_out, reference, status, warning])


def classify_tab(page: Page) -> None:
    """Build the Classify tab on `page`: a text in, the probability of each class out."""
    import gradio as gr

    engine = page.engine
    with gr.Tab("Classify", id="classify"):
        text = gr.Textbox(label="Text", lines=4, elem_id="classify-text", placeholder="Type a text to classify")
        go = gr.Button("Classify", variant="primary", elem_id="classify-btn")
        warning = warning_box("classify")
        probs = gr.Label(label="Label probabilities", num_top_classes=20, elem_id="classify-output")

    def run(name: str, value: str) -> tuple[Any, Any]:
        try:
            return engine.classify(name, value or ""), hide_warning()
        except FinetuneError as exc:
            return gr.skip(), show_warning(refusal(f"classify ({name})", str(exc)))

    go.click(run, [page.picker, text], [probs, warning], **page.model_event)

