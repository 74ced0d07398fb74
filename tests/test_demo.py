"""The gradio demo served on 127.0.0.1: its API through gradio_client (predict, streaming, cancel, limits, queueing,
auth), the `finetune demo` command, and a real browser that must make no request outside 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from finetune.serving.engine import BASE, Engine, GenerationParams, Limits, load_engine
from finetune.testing import class_rows, farewell_rows, last, qa_rows

CHROMIUM = "/usr/bin/chromium"
# ENVIRONMENT.md: what keeps Debian chromium quiet and offline; the resolver rule makes any other host unreachable.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
LIMITS = Limits(max_prompt_tokens=64, max_new_tokens=300)
# predict() arguments after the adapter and the prompt: max new tokens, temperature, top-p, seed
GREEDY_ARGS = (12, 0.0, 0.95, 0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path, tiny_encoder: Path, train_tiny) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("demo")
    return {
        "greeter": train_tiny(tmp, tiny_lm, qa_rows(), "greeter"),
        "farewell": train_tiny(tmp, tiny_lm, farewell_rows(), "farewell"),
        "sentiment": train_tiny(tmp, tiny_encoder, class_rows(), "sentiment", task="classification", steps=20),
    }


@pytest.fixture(scope="module")
def engine(adapters: dict[str, Path]) -> Engine:
    return load_engine(list(adapters.values()), limits=LIMITS)


@pytest.fixture(scope="module")
def app_module() -> Any:
    from finetune.commands.demo import load_app_module

    return load_app_module()


@pytest.fixture(scope="module")
def served(engine: Engine, app_module: Any) -> Iterator[Any]:
    app = app_module.build_app(engine, concurrency_limit=1)
    app_module.launch(app, port=free_port(), block=False)
    yield app
    app.close()


@pytest.fixture(scope="module")
def server(served: Any) -> str:
    return str(served.local_url)


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    from gradio_client import Client

    return Client(server, verbose=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def greedy(max_new_tokens: int = 12) -> GenerationParams:
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)


def test_serves_on_loopback_without_a_share_link(served: Any, server: str) -> None:
    assert urlparse(server).hostname == "127.0.0.1" and served.server_name == "127.0.0.1"
    assert served.share is False and served.share_url is None


def test_api_lists_the_endpoints(client: Any) -> None:
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(api) == {"/card", "/generate", "/chat", "/compare", "/classify"}


@pytest.mark.parametrize("name", [BASE, "greeter", "farewell"])
def test_predict_equals_the_engine(client: Any, engine: Engine, name: str) -> None:
    assert client.predict(name, "name: alice", *GREEDY_ARGS, api_name="/generate") == last(
        engine.generate(name, "name: alice", greedy()))


def test_picker_switches_adapter_per_request(client: Any) -> None:
    outs = [client.predict(n, "name: bob", *GREEDY_ARGS, api_name="/generate") for n in ("greeter", "farewell", "greeter")]
    assert outs[0].startswith("hello") and outs[1].startswith("bye") and outs[2] == outs[0]


def test_streaming_sends_growing_prefixes(client: Any, engine: Engine) -> None:
    job = client.submit("greeter", "name: carol", *GREEDY_ARGS, api_name="/generate")
    job.result(timeout=60)
    outputs = job.outputs()
    assert len(outputs) > 1 and all(b.startswith(a) for a, b in zip(outputs, outputs[1:], strict=False))
    assert outputs[-1] == last(engine.generate("greeter", "name: carol", greedy()))


def test_cancel_stops_the_generation_on_the_server(client: Any, engine: Engine, slow_no_eos) -> None:
    with slow_no_eos(engine, delay=0.05) as probe:
        job = client.submit(BASE, "name: dave", 300, 1.0, 0.95, 3, api_name="/generate")
        deadline = time.time() + 30
        while len(job.outputs()) < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert len(job.outputs()) >= 2
        job.cancel()
        calls_at_cancel = probe.calls
        time.sleep(1.0)  # a running model would make ~20 more steps in this time
        assert probe.calls <= calls_at_cancel + 2 < 100
    assert (engine.stats().running, engine.stats().waiting) == (0, 0)  # the row left the batch
    # the server is free again and answers the next request in full
    assert client.predict("greeter", "name: dave", *GREEDY_ARGS, api_name="/generate") == last(
        engine.generate("greeter", "name: dave", greedy()))


def test_bad_input_gets_a_friendly_message(client: Any) -> None:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="empty"):
        client.predict("greeter", "  ", *GREEDY_ARGS, api_name="/generate")
    with pytest.raises(AppError, match="at most 64"):
        client.predict("greeter", "name: alice " * 40, *GREEDY_ARGS, api_name="/generate")
    with pytest.raises(AppError, match="Classify tab"):
        client.predict("sentiment", "great movie", *GREEDY_ARGS, api_name="/generate")


def test_max_new_tokens_is_enforced_on_the_server(client: Any) -> None:
    """An API client cannot ask past the server's limit (the engine also clamps: test_inference)."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="greater than maximum value 300"):
        client.predict(BASE, "name: erin", 10_000, 0.0, 0.95, 0, api_name="/generate")


def test_compare_endpoint_is_base_and_adapter(client: Any, engine: Engine) -> None:
    base, adapter = client.predict("farewell", "name: frank", *GREEDY_ARGS, api_name="/compare")
    assert (base, adapter) == (last(engine.generate(BASE, "name: frank", greedy())),
                               last(engine.generate("farewell", "name: frank", greedy())))
    assert adapter.startswith("bye") and base != adapter


def test_chat_endpoint_uses_the_chat_template(client: Any, engine: Engine) -> None:
    messages, cleared = client.predict("greeter", "name: grace", *GREEDY_ARGS, api_name="/chat")
    assert cleared == "" and [m["role"] for m in messages] == ["user", "assistant"]
    answer = messages[-1]["content"]
    text = answer if isinstance(answer, str) else "".join(part["text"] for part in answer)
    assert text == last(engine.chat("greeter", [{"role": "user", "content": "name: grace"}], greedy()))


def test_classify_endpoint_returns_label_probabilities(client: Any, engine: Engine) -> None:
    result = client.predict("sentiment", "awful movie", api_name="/classify")
    probs = {c["label"]: c["confidence"] for c in result["confidences"]}
    assert probs == pytest.approx(engine.classify("sentiment", "awful movie"))
    assert result["label"] == "neg"


def test_card_endpoint_shows_base_task_rank_and_metrics(client: Any, engine: Engine) -> None:
    card = client.predict("farewell", api_name="/card")
    assert "**farewell**" in card and "| task | causal_lm |" in card and "| LoRA rank / alpha | 4 / 8.0 |" in card
    assert f"| train_loss | {engine.card('farewell').metrics['train_loss']:.4g} |" in card
    assert "| labels | neg, pos |" in client.predict("sentiment", api_name="/card")


def test_eight_concurrent_clients_are_queued_and_all_served(server: str, engine: Engine) -> None:
    from gradio_client import Client

    names = ["greeter", "farewell"] * 4
    expected = {n: last(engine.generate(n, "name: heidi", greedy())) for n in set(names)}
    results: list[Any] = [None] * len(names)

    def one(i: int) -> None:
        try:
            results[i] = Client(server, verbose=False).predict(names[i], "name: heidi", *GREEDY_ARGS, api_name="/generate")
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [expected[n] for n in names]


def test_basic_auth_is_required_when_configured(engine: Engine, app_module: Any) -> None:
    from gradio_client import Client

    app = app_module.build_app(engine)
    url = app_module.launch(app, port=free_port(), auth=[("ada", "s3cret")], block=False)
    try:
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises ValueError or httpx errors by version
            Client(url, verbose=False)
        assert Client(url, auth=("ada", "s3cret"), verbose=False).predict(api_name="/card", name="greeter").startswith("**greeter**")
    finally:
        app.close()


def test_auth_file_parsing(tmp_path: Path) -> None:
    from finetune.commands.demo import read_auth
    from finetune.errors import FinetuneError

    good = tmp_path / "auth"
    good.write_text("# demo users\nada:s3cret\nbob:pa:ss\n")
    assert read_auth(good, None) == [("ada", "s3cret"), ("bob", "pa:ss")]
    assert read_auth(None, "eve:pw") == [("eve", "pw")]
    assert read_auth(None, None) is None
    good.write_text("ada\n")
    with pytest.raises(FinetuneError, match=r"auth:1: expected user:password"):
        read_auth(good, None)


def test_cli_refuses_bad_requests_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.cli import main

    assert main(["demo"]) == 1
    assert "nothing to serve" in capsys.readouterr().err
    assert main(["demo", str(tmp_path / "missing")]) == 1
    assert "adapter folder not found" in capsys.readouterr().err
    assert main(["demo", str(tmp_path), "--max-new-tokens", "0"]) == 1
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err


# -- a real browser against the real `finetune demo` command ------------------------------------------------------


@pytest.fixture(scope="module")
def cli_server(adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`finetune demo greeter farewell` in its own process, as a user starts it."""
    import urllib.request

    port = free_port()
    log = tmp_path_factory.mktemp("cli_server") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "finetune", "demo", str(adapters["greeter"]), str(adapters["farewell"]), "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
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
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (apt-get install chromium)")
def test_browser_types_a_prompt_gets_output_switches_adapter(cli_server: str, engine: Engine, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    expected = {n: last(engine.generate(n, "name: alice", GenerationParams(12, 0.0))) for n in ("greeter", "farewell")}
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(90_000)  # a shared 2-core CI machine can be slow to hydrate the page
            page.on("request", lambda r: requests.append(r.url))
            page.goto(cli_server, wait_until="load")
            _use_greedy_settings(page)
            shown = {}
            for name in ("greeter", "farewell"):
                _pick(page, name)
                page.locator("#prompt textarea").fill("name: alice")
                page.locator("#generate-btn").click()
                page.wait_for_function("t => document.querySelector('#output textarea').value === t", arg=expected[name],
                                       timeout=60_000)
                shown[name] = page.locator("#output textarea").input_value()
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    shutil.copy(shot, "/tmp/demo_screenshot.png")
    assert shown == expected and shown["greeter"] != shown["farewell"]
    outside = sorted({u for u in requests if urlparse(u).hostname != "127.0.0.1" and not u.startswith(("data:", "blob:"))})
    assert requests and outside == []


def _pick(page: Any, name: str) -> None:
    page.locator("#adapter-picker input").click()
    page.get_by_role("option", name=name, exact=True).click()
    page.wait_for_function("n => document.querySelector('#adapter-card').innerText.includes(n)", arg=name)


def _use_greedy_settings(page: Any) -> None:
    """Temperature 0 and 12 new tokens, so the page's answer can be compared with the engine's."""
    page.get_by_text("Generation settings").click()
    for elem_id, value in (("max-new-tokens", "12"), ("temperature", "0")):
        box = page.locator(f"#{elem_id} input[type=number]")
        box.fill(value)
        box.press("Enter")
        page.wait_for_function("([id, v]) => document.querySelector(`#${id} input[type=range]`).value === v",
                               arg=[elem_id, value])
