"""The page: the adapter picker with a one-line summary, the full card and the generation settings in collapsed
accordions, then the playground tabs (Generate, Chat, Compare; Classify for classification adapters) and the API.

`build_app(engine)` returns the gradio Blocks (the demo command and `finetune serve` mount it), `launch(app, ...)`
serves it: loopback by default, never a share link, bundled fonts only, no analytics, no MCP server.

No `from __future__ import annotations` here: gradio reads handler annotations at runtime."""

import os
from typing import Any

from finetune.serving.demo.api import DEFAULT_NEW_TOKENS, add_api
from finetune.serving.demo.card import card_markdown, default_temperature, summary_line
from finetune.serving.demo.chat import chat_tab
from finetune.serving.demo.tabs import classify_tab, compare_tab, generate_tab
from finetune.serving.demo.widgets import Page
from finetune.serving.engine import BASE, AdapterCard, Engine

CSS = """
#summary-column { justify-content: center; gap: 0; }
#page-title p { font-size: var(--text-sm); color: var(--body-text-color-subdued); margin: 0; }
#adapter-summary p { font-size: var(--text-xl); overflow-wrap: anywhere; margin: 0; }
#adapter-card ul { margin: 0; padding-left: 1.2em; }
#adapter-card li { overflow-wrap: anywhere; }
@media (max-width: 640px) {  /* a phone: the summary smaller; the accordions stacked once one opens */
  #adapter-summary p { font-size: var(--text-lg); }
  #accordions:has(.label-wrap.open) { flex-direction: column; }
  #accordions > * { width: 100%; }
}
.counter { font-size: var(--text-sm); color: var(--body-text-color-subdued); text-align: right; }
.status-line { font-size: var(--text-sm); color: var(--body-text-color-subdued); min-height: 1.5em; }
.prose.inline-warning { border-left: 4px solid #d97706; background: #fffbeb; color: #78350f; padding: 2px 12px;
                        border-radius: 4px; }
"""
# The API page asks for the MCP schema and the monitoring summary; both are switched off here, so the page answers
# those two fetches itself ("no MCP", "no monitoring data") instead of sending requests that can only 404 / 403.
HEAD = """<script>
(() => {
  const local = {
    "/gradio_api/mcp/schema": () => new Response("[]", {status: 404, statusText: "MCP is off in finetune demo"}),
    "/monitoring/summary": () => new Response('{"functions": {}}', {headers: {"content-type": "application/json"}}),
  };
  const fetch = window.fetch.bind(window);
  window.fetch = (input, init) => {
    const url = new URL(typeof input === "string" ? input : input.url, window.location.href);
    const answer = url.origin === window.location.origin && Object.entries(local).find(([path]) => url.pathname.endsWith(path));
    return answer ? Promise.resolve(answer[1]()) : fetch(input, init);
  };
})();
</script>"""


def build_app(engine: Engine, concurrency_limit: int = 1, queue_size: int = 64) -> Any:
    """The demo page over `engine` as a gradio Blocks; `concurrency_limit` model runs at once, the rest queue."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: stops its version check
    import gradio as gr

    names = engine.names()
    first = engine.card(next((n for n in names if n != BASE), names[0]))
    tasks = {engine.card(n).task for n in names}
    with gr.Blocks(title="finetune demo", analytics_enabled=False) as app:
        with gr.Row(equal_height=True):
            picker = gr.Dropdown(choices=names, value=first.name, label="Adapter", elem_id="adapter-picker", scale=1,
                                 min_width=200)
            with gr.Column(scale=3, min_width=240, elem_id="summary-column"):
                gr.Markdown("finetune demo", elem_id="page-title")
                summary = gr.Markdown(summary_line(first), elem_id="adapter-summary")
        with gr.Row(equal_height=False, elem_id="accordions"):  # side by side; on a phone stacked once one opens (CSS)
            with gr.Column(min_width=160), gr.Accordion("Adapter card", open=False, elem_id="card-accordion"):
                card = gr.Markdown(card_markdown(first), elem_id="adapter-card")
            with gr.Column(min_width=160), gr.Accordion("Generation settings", open=False, elem_id="settings-accordion"):
                settings = _settings(engine, first)
        page = Page(engine, picker, settings, concurrency_limit)
        with gr.Tabs(elem_id="tabs") as tabs:
            if "causal_lm" in tasks:
                generate_tab(page)
                chat_tab(page)
                compare_tab(page)
            if "classification" in tasks:
                classify_tab(page)
        _wire_picker(page, summary, card, tabs, len(tasks) > 1)
        add_api(engine, concurrency_limit)
    app.queue(default_concurrency_limit=concurrency_limit, max_size=queue_size)
    return app


def launch(app: Any, host: str = "127.0.0.1", port: int | None = None, auth: list[tuple[str, str]] | None = None,
           block: bool = True) -> str:
    """Serve on `host` (loopback unless asked); returns the local URL. Never a share link, never a browser tab.
    With `block=False` it returns at once (then `app.block_thread()` waits)."""
    extra: dict[str, Any] = {"app_kwargs": {"middleware": [_login_middleware()]}} if auth else {}
    _, url, _ = app.launch(server_name=host, server_port=port, auth=auth, share=False, inbrowser=False,
                           prevent_thread_lock=not block, quiet=True, **page_options(), **extra)
    return str(url)


def mount(server: Any, app: Any, path: str = "/demo", auth: Any = None) -> Any:
    """Mount the page on another FastAPI app (e.g. `finetune serve`), with the same page options as `launch` and,
    with `auth`, the login page stripped of the API description. Call before the server starts."""
    import gradio as gr

    if auth:
        from finetune.serving.demo.login import LoginPageWithoutApi

        server.add_middleware(LoginPageWithoutApi)
    return gr.mount_gradio_app(server, app, path=path, auth=auth, **page_options())


def page_options() -> dict[str, Any]:
    """How the page is served, wherever it is: our CSS and fetch guard, the API link, nothing that calls out."""
    return {"css": CSS, "head": HEAD, "footer_links": ["api"], "ssr_mode": False, "mcp_server": False,
            "enable_monitoring": False}


def _login_middleware() -> Any:
    from starlette.middleware import Middleware

    from finetune.serving.demo.login import LoginPageWithoutApi

    return Middleware(LoginPageWithoutApi)


def _settings(engine: Engine, card: AdapterCard) -> list[Any]:
    import gradio as gr

    top = engine.limits.max_new_tokens
    with gr.Row():
        max_new = gr.Slider(1, top, value=min(DEFAULT_NEW_TOKENS, top), step=1, label="Max new tokens",
                            elem_id="max-new-tokens", min_width=160)
        temperature = gr.Slider(0.0, 2.0, value=default_temperature(card), step=0.05, min_width=160,
                                label="Temperature (0 = greedy, as eval decodes)", elem_id="temperature")
        top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p", elem_id="top-p", min_width=160)
        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed", min_width=100)
    return [max_new, temperature, top_p, seed]


def _wire_picker(page: Page, summary: Any, card: Any, tabs: Any, mixed: bool) -> None:
    """Picking an entry updates the summary, the card, the default temperature, every System prompt box and example
    list (the token counters follow those boxes); with text and classification adapters served, it opens the matching tab."""
    import gradio as gr

    engine, temperature = page.engine, page.settings[1]
    last_task = gr.State(page.first_card().task)
    outputs = [summary, card, temperature, tabs, last_task, *[c for outs, _ in page.on_pick for c in outs]]

    def pick(name: str, last: str) -> list[Any]:
        picked = engine.card(name)
        values = [summary_line(picked), card_markdown(picked),
                  gr.skip() if name == BASE else default_temperature(picked),
                  _tab_for(picked.task, last) if mixed else gr.skip(), picked.task]
        for _, update in page.on_pick:
            values += update(name, picked)
        return values

    quick = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}
    page.picker.change(pick, [page.picker, last_task], outputs, **quick)  # type: ignore[arg-type]


def _tab_for(task: str, last: str) -> Any:
    """Classify for a classification adapter; back to Generate when leaving one; else the tab stays."""
    import gradio as gr

    if task == last:
        return gr.skip()
    return gr.Tabs(selected="classify" if task == "classification" else "generate")
