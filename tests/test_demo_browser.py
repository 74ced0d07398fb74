"""A real browser (Debian chromium driven by playwright) against the real `finetune demo` command, at desktop
(1280x800) and phone (400x800) width: the recorded system prompt, examples, exact engine output, the run loop (button
states, status line, inline warning), Chat with Enter and Undo, Compare with the reference, and no request that
leaves 127.0.0.1 or fails. Screenshots go to /tmp/demo_screenshot_*.png."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from finetune.serving.demo.runs import count_tokens, prompt_for
from finetune.serving.engine import BASE, Engine, GenerationParams, load_engine
from finetune.testing import JSON_SYSTEM, farewell_rows, last

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="Debian chromium is not installed")]
CHROMIUM = "/usr/bin/chromium"
# ENVIRONMENT.md: what keeps Debian chromium quiet and offline; the resolver rule makes any other host unreachable.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
STATUS = re.compile(r"^\d+ tokens · [\d.]+ tokens/s · stopped: (end of answer|max tokens)$")
DEFAULT_NEW_TOKENS = 128  # the page's default max new tokens


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path, train_tiny, json_adapter: Path) -> list[Path]:
    return [json_adapter, train_tiny(tmp_path_factory.mktemp("browser"), tiny_lm, farewell_rows(), "farewell")]


@pytest.fixture(scope="module")
def engine(adapters: list[Path]) -> Engine:
    return load_engine(adapters)  # the command's default limits


@pytest.fixture(scope="module")
def cli_server(adapters: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`finetune demo extract farewell` in its own process, as a user starts it: (address, its log)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("cli_server") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "finetune", "demo", *map(str, adapters), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"`finetune demo` did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class Browser:
    """One chromium page that records every request and every failed response."""

    def __init__(self, playwright: Any, width: int):
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        self.page = self.browser.new_page(viewport={"width": width, "height": 800})
        self.page.set_default_timeout(90_000)  # a shared 2-core machine can be slow to hydrate the page
        self.requests: list[str] = []
        self.failed: list[tuple[int, str]] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("response", lambda r: self.failed.append((r.status, r.url)) if r.status >= 400 else None)

    def open(self, url: str) -> Any:
        self.page.goto(url, wait_until="load")
        self.page.wait_for_selector("#generate-prompt textarea")
        return self.page

    def check_requests(self) -> None:
        outside = sorted({u for u in self.requests if urlparse(u).hostname != "127.0.0.1" and not u.startswith(("data:", "blob:"))})
        assert self.requests and outside == [] and self.failed == []


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        made: list[Browser] = []
        yield lambda width: made.append(Browser(playwright, width)) or made[-1]
        for b in made:
            b.browser.close()


def value(page: Any, selector: str) -> str:
    return str(page.locator(selector).input_value())


def run_and_wait(page: Any, tab: str, button: str = "btn") -> str:
    """Click the tab's run button, see it off and Stop on while the run goes, then both back; returns the status line."""
    page.locator(f"#{tab}-{button}").click()
    page.wait_for_function("t => document.querySelector(`#${t}-btn`).disabled && !document.querySelector(`#${t}-stop`).disabled",
                           arg=tab)
    page.wait_for_function("t => !document.querySelector(`#${t}-btn`).disabled && document.querySelector(`#${t}-stop`).disabled",
                           arg=tab)
    return str(page.locator(f"#{tab}-status").inner_text()).strip()


def pick(page: Any, name: str) -> None:
    page.locator("#adapter-picker input").click()
    page.get_by_role("option", name=name, exact=True).click()
    shows = "the base model alone" if name == BASE else f"{name} · "  # the summary line of the picked entry
    page.wait_for_function("n => document.querySelector('#adapter-summary').innerText.includes(n)", arg=shows)


def set_slider(page: Any, elem_id: str, target: float) -> None:
    """Set a slider through its range input (what dragging does) until its number box shows the value. A slider in an
    accordion just opened is mounted lazily and then sets its stored value once more, which can undo a value put in
    right away (the old test's timeout): so put it in again until it holds."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    shows = "([id, v]) => parseFloat(document.querySelector(`#${id} input[type=number]`).value) === v"
    for _ in range(10):
        page.locator(f"#{elem_id} input[type=range]").fill(str(target))
        try:
            page.wait_for_function(shows, arg=[elem_id, target], timeout=5_000)
            page.wait_for_timeout(500)
            if page.evaluate(shows, [elem_id, target]):
                return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"slider #{elem_id} did not take the value {target}")


def test_browser_types_a_prompt_gets_output_switches_adapter(cli_server: tuple[str, Path], engine: Engine,
                                                             browser: Any, json_adapter: Path) -> None:
    url, log = cli_server
    b = browser(1280)
    page = b.open(url)
    extract = json_adapter.name
    assert str(page.locator("#adapter-summary").inner_text()).startswith(f"{extract} · ")
    assert value(page, "#generate-system textarea") == JSON_SYSTEM  # the recorded system prompt, pre-filled
    shutil.copy(_shot(page, "1280_first_screen"), "/tmp/demo_screenshot_1280.png")

    page.locator("#generate-examples").get_by_text("name: bob", exact=True).click()  # an example from the data
    page.wait_for_function("() => document.querySelector('#generate-prompt textarea').value === 'name: bob'")
    prompt = prompt_for(engine.card(extract), None, "name: bob")
    tokens = count_tokens(engine, extract, prompt)
    page.wait_for_function("t => document.querySelector('#generate-counter').innerText.trim() === t", arg=f"{tokens} / 1024 tokens")
    status = run_and_wait(page, "generate")  # greedy by default: this adapter's eval decoded greedily
    assert value(page, "#generate-output textarea") == last(engine.generate(extract, prompt, GenerationParams(DEFAULT_NEW_TOKENS, 0.0)))
    assert STATUS.match(status), status

    shown = value(page, "#generate-output textarea")
    page.locator("#generate-prompt textarea").fill("   ")
    page.locator("#generate-btn").click()
    page.wait_for_selector("#generate-warning", state="visible")
    assert "Not run: Type a prompt first" in page.locator("#generate-warning").inner_text()
    assert value(page, "#generate-output textarea") == shown and page.locator(".toast-body").count() == 0

    pick(page, "farewell")  # trained without a system prompt: the box empties
    assert value(page, "#generate-system textarea") == ""
    page.get_by_text("Generation settings").click()
    set_slider(page, "temperature", 0.0)
    set_slider(page, "max-new-tokens", 12)
    page.locator("#generate-prompt textarea").fill("name: alice")
    run_and_wait(page, "generate")
    expected = last(engine.generate("farewell", prompt_for(engine.card("farewell"), "", "name: alice"), GenerationParams(12, 0.0)))
    assert value(page, "#generate-output textarea") == expected and expected.startswith("bye")  # type: ignore[union-attr]
    _shot(page, "1280_farewell", full_page=True)
    b.check_requests()
    server_log = log.read_text()
    assert re.search(r"^demo: open http://127\.0\.0\.1:\d+/ ", server_log, re.M)
    assert server_log.count("demo: refused") == 1 and "Traceback" not in server_log


def test_browser_chat_compare_stop_and_api_page(
        cli_server: tuple[str, Path], engine: Engine, browser: Any, json_adapter: Path) -> None:
    url, _ = cli_server
    b = browser(1280)
    page = b.open(url)
    extract = json_adapter.name
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-prompt input").fill("name: carol")
    page.locator("#chat-prompt input").press("Enter")  # Enter sends
    status = run_wait_status(page, "chat")
    assert STATUS.match(status), status
    messages = [{"role": "system", "content": JSON_SYSTEM}, {"role": "user", "content": "name: carol"}]
    reply = last(engine.chat(extract, messages, GenerationParams(DEFAULT_NEW_TOKENS, 0.0)))
    conversation = page.locator("#chatbot").inner_text().strip()
    assert conversation.endswith(reply.strip())  # type: ignore[union-attr]
    run_and_wait(page, "chat", "retry")  # answers the same message again (greedy: the same answer), not a second turn
    assert page.locator("#chatbot").inner_text().strip() == conversation
    page.locator("#chat-undo").click()
    page.wait_for_function("() => document.querySelector('#chat-prompt input').value === 'name: carol'")

    page.get_by_role("tab", name="Compare").click()
    example = engine.card(extract).prompt.examples[2]  # type: ignore[union-attr]
    page.locator("#compare-examples").get_by_text(example.prompt, exact=True).click()
    page.wait_for_function("r => document.querySelector('#compare-reference textarea').value === r", arg=example.reference)
    run_and_wait(page, "compare")
    prompt = prompt_for(engine.card(extract), None, example.prompt)
    params = GenerationParams(DEFAULT_NEW_TOKENS, 0.0)
    assert value(page, "#compare-base textarea") == last(engine.generate(BASE, prompt, params))
    assert value(page, "#compare-adapter textarea") == last(engine.generate(extract, prompt, params))
    _shot(page, "1280_compare")

    page.get_by_role("tab", name="Generate").click()  # Stop: the base model rambles until stopped
    pick(page, BASE)
    page.get_by_text("Generation settings").click()
    set_slider(page, "max-new-tokens", 512)
    page.locator("#generate-prompt textarea").fill("name: stop me")
    page.locator("#generate-btn").click()
    page.wait_for_function("() => document.querySelector('#generate-output textarea').value.length > 0")
    page.locator("#generate-stop").click()
    page.wait_for_function("() => document.querySelector('#generate-status').innerText.includes('stopped')")
    stopped = str(page.locator("#generate-status").inner_text()).strip()
    assert stopped.endswith("stopped: Stop") and int(stopped.split()[0]) < 512, stopped
    page.wait_for_function("() => !document.querySelector('#generate-btn').disabled")

    page.get_by_text("Use via API").click()  # the API page: no MCP or monitoring request that could 404 / 403
    page.get_by_text("/generate").first.wait_for()
    page.wait_for_timeout(2000)
    _shot(page, "1280_api")
    b.check_requests()


def test_browser_phone_width_prompt_is_on_the_first_screen(cli_server: tuple[str, Path], browser: Any) -> None:
    url, _ = cli_server
    b = browser(400)
    page = b.open(url)
    summary = page.locator("#adapter-summary").bounding_box()
    prompt = page.locator("#generate-prompt textarea").bounding_box()
    go = page.locator("#generate-btn").bounding_box()
    assert summary["y"] + summary["height"] <= prompt["y"] and prompt["y"] + prompt["height"] <= 800, (summary, prompt)
    assert go["y"] + go["height"] <= 800
    shutil.copy(_shot(page, "400_first_screen"), "/tmp/demo_screenshot_400.png")
    page.get_by_text("Adapter card").click()  # the full card wraps: nothing wider than the phone
    page.locator("#adapter-card").get_by_text("eval decoding").wait_for()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 400
    _shot(page, "400_card", full_page=True)
    b.check_requests()


def run_wait_status(page: Any, tab: str) -> str:
    page.wait_for_function("t => document.querySelector(`#${t}-status`).innerText.includes('stopped')", arg=tab)
    return str(page.locator(f"#{tab}-status").inner_text()).strip()


def _shot(page: Any, name: str, full_page: bool = False) -> str:
    path = f"/tmp/demo_{name}.png"
    page.screenshot(path=path, full_page=full_page)
    return path
