"""The parts every text tab shares: the page context (engine, picker, settings, Stop events), the prompt area
(System prompt box pre-filled from prompt.json, prompt box, `N / limit tokens` counter, clickable examples), the
Generate/Stop button states and the inline warning.

No `from __future__ import annotations` here: gradio reads the handlers' annotations (gr.Request) at runtime."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finetune.serving.demo.runs import Stops, chat_for, prompt_for, token_counter
from finetune.serving.engine import BASE, AdapterCard, Engine

Update = Callable[[str, AdapterCard], list[Any]]  # (picked name, its card) -> new values of some components


@dataclass
class Page:
    """What the tabs are built against; `on_pick` collects (outputs, update) pairs run when the picker changes."""

    engine: Engine
    picker: Any
    settings: list[Any]  # max new tokens, temperature, top-p, seed
    concurrency_limit: int
    stops: Stops = field(default_factory=Stops)
    on_pick: list[tuple[list[Any], Update]] = field(default_factory=list)

    @property
    def model_event(self) -> dict[str, Any]:
        """Keyword arguments of every event that runs the model: one queue, `--concurrency` at once."""
        return {"concurrency_id": "model", "concurrency_limit": self.concurrency_limit, "api_visibility": "private"}

    def first_card(self) -> AdapterCard:
        return self.engine.card(self.picker.value)


@dataclass
class PromptArea:
    """The components prompt_area builds: system prompt box, prompt box, token counter and example prompts."""

    system: Any
    prompt: Any
    counter: Any
    examples: Any


def system_box(page: Page, tab: str) -> Any:
    """The System prompt box, pre-filled with the recorded one (editable; cleared means no system prompt)."""
    import gradio as gr

    box = gr.Textbox(**_system_box(page.first_card()), label="System prompt", lines=2, max_lines=3,
                     elem_id=f"{tab}-system", placeholder="(none: the chat template's own default, if any, applies)")
    page.on_pick.append(([box], lambda name, card: [gr.Textbox(**_system_box(card, name))]))
    return box


def prompt_area(page: Page, tab: str, label: str, lines: int, placeholder: str, system: Any = None,
                history: Any = None) -> PromptArea:
    """System prompt box (unless given), prompt box, token counter (counting `history` too when given) and the
    adapter's example prompts (clicking one fills the box)."""
    import gradio as gr

    system = system if system is not None else system_box(page, tab)
    prompt = gr.Textbox(label=label, lines=lines, placeholder=placeholder, elem_id=f"{tab}-prompt",
                        max_lines=12 if lines > 1 else 1)
    counter = gr.Markdown(token_counter(page.engine, page.picker.value, ""), elem_id=f"{tab}-counter",
                          elem_classes=["counter"])
    examples = gr.Dataset(components=["textbox"], type="index", elem_id=f"{tab}-examples", samples_per_page=5,
                          **_examples(page.first_card()))
    page.on_pick.append(([examples], lambda name, card: [gr.Dataset(**_examples(card))]))
    inputs = [page.picker, system, prompt] + ([history] if history is not None else [])
    count = _counter(page)
    quick = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}
    # .change also fires when the picker refills the System prompt box and when an example fills the prompt
    triggers = [prompt.change, system.change] + ([history.change] if history is not None else [])
    gr.on(triggers, count, inputs, counter, trigger_mode="always_last", **quick)  # type: ignore[arg-type]

    def use_example(name: str, index: int) -> tuple[Any, Any]:
        record = page.engine.card(name).prompt
        if record is None or not 0 <= index < len(record.examples):
            return gr.skip(), gr.skip()
        return record.examples[index].prompt, _example_system(record.examples[index].messages)

    examples.click(use_example, [page.picker, examples], [prompt, system], **quick)  # type: ignore[arg-type]
    return PromptArea(system, prompt, counter, examples)


def run_buttons(go_label: str, tab: str) -> tuple[Any, Any]:
    """A tab's run button labelled `go_label` and its Stop button (disabled until a run starts): (go, stop)."""
    import gradio as gr

    with gr.Row():
        go = gr.Button(go_label, variant="primary", elem_id=f"{tab}-btn", min_width=120)
        stop = gr.Button("Stop", interactive=False, elem_id=f"{tab}-stop", min_width=120)
    return go, stop


def warning_box(tab: str) -> Any:
    """The tab's inline warning, hidden until show_warning fills it."""
    import gradio as gr

    return gr.Markdown(visible=False, elem_id=f"{tab}-warning", elem_classes=["inline-warning"])


def show_warning(text: str) -> Any:
    """The one inline warning of a tab (it replaces the previous one; the outputs keep what they showed)."""
    import gradio as gr

    return gr.Markdown(f"**Not run:** {text}", visible=True)


def hide_warning() -> Any:
    """The update that hides a tab's inline warning."""
    import gradio as gr

    return gr.Markdown(visible=False)


def status_line(tab: str) -> Any:
    """The line under a tab's output that shows how the finished run went."""
    import gradio as gr

    return gr.Markdown("", elem_id=f"{tab}-status", elem_classes=["status-line"])


def wire_run(page: Page, tab: Any, buttons: list[Any], stop: Any, runs: list[tuple[Any, list[Any]]],
             inputs: list[Any], outputs: list[Any]) -> None:
    """For each (run, triggers): trigger -> in the browser at once: run buttons off, Stop on, a new run id -> the run
    (queued; its handler takes the run id after `inputs`) -> buttons back. Stop sets the cancel event of that run id
    (even while it waits in the queue): the engine ends at its next token and the run finishes normally, with its
    status line."""
    import gradio as gr

    with tab:  # the hidden run id lives in the tab (a Tabs block takes only Tab children)
        run_id = gr.Textbox(visible=False, elem_id=f"{tab.id}-run-id")
    n = len(buttons)

    def stop_run(key: str, request: gr.Request) -> None:
        page.stops.stop(request.session_hash or "", key)

    quick = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}
    for run, triggers in runs:
        started = gr.on(triggers, None, None, [*buttons, stop, run_id], js=_BUSY_JS.replace("N", str(n)), **quick)  # type: ignore[arg-type]
        running = started.then(run, [*inputs, run_id], outputs, show_progress="minimal", show_progress_on=outputs[0],
                               **page.model_event)
        running.then(None, None, [*buttons, stop], js=_IDLE_JS.replace("N", str(n)), **quick)  # type: ignore[arg-type]
    stop.click(stop_run, run_id, None, **quick)  # type: ignore[arg-type]


# Button states set in the browser, so a click shows at once however busy the server is.
_BUSY_JS = """() => [...Array(N).fill({__type__: "update", interactive: false}), {__type__: "update", interactive: true},
  Date.now().toString(36) + Math.random().toString(36).slice(2)]"""
_IDLE_JS = """() => [...Array(N).fill({__type__: "update", interactive: true}), {__type__: "update", interactive: false}]"""


def _counter(page: Page) -> Callable[..., str]:
    def count(name: str, system: str, text: str, history: list[dict[str, Any]] | None = None) -> str:
        card, text = page.engine.card(name), text or ""
        new = [{"role": "user", "content": text}] if text.strip() else []
        if history:
            return token_counter(page.engine, name, chat_for(card, system, [*history, *new]))
        return token_counter(page.engine, name, prompt_for(card, system, text) if new else "")

    return count


def _system_box(card: AdapterCard, name: str | None = None) -> dict[str, Any]:
    """The System prompt box for a picked entry: the recorded system prompt of a chat adapter; the base entry keeps
    what the box holds (compare the base under the same instructions); plain-text adapters have no system prompt."""
    if name == BASE:
        return {"visible": card.chat}
    value = card.prompt.system_prompt if card.prompt is not None else None
    return {"value": value or "", "visible": card.chat}


def _examples(card: AdapterCard) -> dict[str, Any]:
    record = card.prompt
    examples = record.examples if record is not None and card.task == "causal_lm" else []
    source = f" (from the {record.examples_source} data)" if record is not None and record.examples_source else ""
    return {"samples": [[e.prompt] for e in examples], "visible": bool(examples),
            "label": f"Examples{source}: click one to use it", "headers": ["Example prompt"]}


def _example_system(messages: Any) -> Any:
    """An example's own system prompt when it has one (rows whose system prompts vary); else the box is kept."""
    import gradio as gr

    if messages and messages[0].get("role") == "system":
        return str(messages[0].get("content", ""))
    return gr.skip()
