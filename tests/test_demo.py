"""The gradio demo served on 127.0.0.1: its API through gradio_client (named parameters, the recorded system prompt,
streaming, cancel, limits, refusals, queueing, auth and the login page), the card it shows, and the `finetune demo`
command. The real browser tests are in test_demo_browser.py; demo output = eval output in test_demo_eval.py."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from finetune.serving.demo.runs import prompt_for
from finetune.serving.engine import BASE, AdapterCard, Engine, GenerationParams, Limits, load_engine
from finetune.testing import JSON_SYSTEM, class_rows, farewell_rows, last

LIMITS = Limits(max_prompt_tokens=64, max_new_tokens=300)
GREEDY = {"max_new_tokens": 12, "temperature": 0.0, "top_p": 0.95, "seed": 0}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path, tiny_encoder: Path, train_tiny,
             json_adapter: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("demo")
    return {
        "extract": json_adapter,
        "farewell": train_tiny(tmp, tiny_lm, farewell_rows(), "farewell"),
        "sentiment": train_tiny(tmp, tiny_encoder, class_rows(), "sentiment", task="classification", steps=20),
    }


@pytest.fixture(scope="module")
def engine(adapters: dict[str, Path]) -> Engine:
    return load_engine(list(adapters.values()), limits=LIMITS)


@pytest.fixture(scope="module")
def served(engine: Engine) -> Iterator[Any]:
    from finetune.serving.demo import build_app, launch

    app = build_app(engine, concurrency_limit=1)
    launch(app, port=free_port(), block=False)
    yield app
    app.close()


@pytest.fixture(scope="module")
def client(served: Any) -> Any:
    from gradio_client import Client

    return Client(str(served.local_url), verbose=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def greedy(max_new_tokens: int = 12) -> GenerationParams:
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)


def as_page(engine: Engine, name: str, text: str, system: str | None = None) -> Any:
    """The prompt the page sends for `text` (the System prompt box holding the recorded one unless `system`)."""
    return prompt_for(engine.card(name), system, text)


def test_serves_on_loopback_without_a_share_link(served: Any) -> None:
    assert urlparse(served.local_url).hostname == "127.0.0.1" and served.server_name == "127.0.0.1"
    assert served.share is False and served.share_url is None


def test_api_has_named_endpoints_with_named_parameters(client: Any) -> None:
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(api) == {"/card", "/generate", "/chat", "/compare", "/classify"}  # the page's own events stay private
    names = [p["parameter_name"] for p in api["/generate"]["parameters"]]
    assert names == ["adapter", "prompt", "system_prompt", "max_new_tokens", "temperature", "top_p", "seed"]
    assert [p["parameter_name"] for p in api["/chat"]["parameters"]][:3] == ["adapter", "messages", "system_prompt"]


def test_the_page_renders_the_recorded_system_prompt(engine: Engine) -> None:
    card = engine.card("extract")
    assert card.prompt is not None and card.prompt.system_prompt == JSON_SYSTEM
    assert as_page(engine, "extract", "name: bob") == [{"role": "system", "content": JSON_SYSTEM},
                                                       {"role": "user", "content": "name: bob"}]
    assert as_page(engine, "extract", "name: bob", system="") == [{"role": "user", "content": "name: bob"}]


@pytest.mark.parametrize("name", [BASE, "extract", "farewell"])
def test_generate_equals_the_engine_on_the_pages_prompt(client: Any, engine: Engine, name: str) -> None:
    got = client.predict(name, "name: alice", **GREEDY, api_name="/generate")
    assert got == last(engine.generate(name, as_page(engine, name, "name: alice"), greedy()))


def test_system_prompt_parameter_overrides_or_clears_the_recorded_one(client: Any, engine: Engine) -> None:
    for system in ("", "Answer in French."):
        got = client.predict("extract", "name: carol", system_prompt=system, **GREEDY, api_name="/generate")
        assert got == last(engine.generate("extract", as_page(engine, "extract", "name: carol", system), greedy()))


def test_temperature_defaults_to_greedy_when_eval_was_greedy(client: Any, engine: Engine) -> None:
    """extract has an eval.json (greedy decoding); farewell has none, so it samples at 0.7 with the given seed."""
    got = client.predict("extract", "name: dave", max_new_tokens=12, api_name="/generate")
    assert got == last(engine.generate("extract", as_page(engine, "extract", "name: dave"), greedy()))
    card = client.predict("farewell", api_name="/card")
    assert card["default_temperature"] == 0.7 and client.predict("extract", api_name="/card")["default_temperature"] == 0.0


def test_picker_switches_adapter_per_request(client: Any) -> None:
    outs = [client.predict(n, "name: bob", **GREEDY, api_name="/generate") for n in ("farewell", "extract", "farewell")]
    assert outs[0].startswith("bye") and outs[1] != outs[0] and outs[2] == outs[0]


def test_streaming_sends_growing_prefixes(client: Any, engine: Engine) -> None:
    job = client.submit("farewell", "name: carol", **GREEDY, api_name="/generate")
    job.result(timeout=60)
    outputs = job.outputs()
    assert len(outputs) > 1 and all(b.startswith(a) for a, b in zip(outputs, outputs[1:], strict=False))
    assert outputs[-1] == last(engine.generate("farewell", as_page(engine, "farewell", "name: carol"), greedy()))


def test_cancel_stops_the_generation_on_the_server(client: Any, engine: Engine, slow_no_eos) -> None:
    with slow_no_eos(engine, delay=0.05) as probe:
        job = client.submit(BASE, "name: dave", max_new_tokens=300, temperature=1.0, seed=3, api_name="/generate")
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
    assert client.predict("farewell", "name: dave", **GREEDY, api_name="/generate") == last(
        engine.generate("farewell", as_page(engine, "farewell", "name: dave"), greedy()))


def test_refusals_are_errors_for_api_clients_and_one_log_line(client: Any, capfd: pytest.CaptureFixture[str]) -> None:
    from gradio_client.exceptions import AppError

    capfd.readouterr()
    with pytest.raises(AppError, match="empty"):
        client.predict("extract", "  ", **GREEDY, api_name="/generate")
    with pytest.raises(AppError, match="at most 64"):
        client.predict("extract", "name: alice " * 40, **GREEDY, api_name="/generate")
    with pytest.raises(AppError, match="Classify tab"):
        client.predict("sentiment", "great movie", **GREEDY, api_name="/generate")
    with pytest.raises(AppError, match=r"max_new_tokens=10000 is outside this demo's range 1\.\.300"):
        client.predict(BASE, "name: erin", max_new_tokens=10_000, api_name="/generate")
    log = capfd.readouterr()
    lines = [line for line in (log.out + log.err).splitlines() if line.startswith("demo: refused")]
    assert len(lines) == 4 and "Traceback" not in log.out + log.err, log


def test_compare_endpoint_is_base_adapter_and_reference(client: Any, engine: Engine) -> None:
    example = engine.card("extract").prompt.examples[1]  # type: ignore[union-attr]
    got = client.predict("extract", example.prompt, **GREEDY, api_name="/compare")
    prompt = as_page(engine, "extract", example.prompt)
    assert got == {"base": last(engine.generate(BASE, prompt, greedy())),
                   "adapter": last(engine.generate("extract", prompt, greedy())), "reference": example.reference}
    assert client.predict("extract", "name: zed", **GREEDY, api_name="/compare")["reference"] is None


def test_chat_endpoint_puts_the_system_prompt_first(client: Any, engine: Engine) -> None:
    turns = [{"role": "user", "content": "name: grace"}]
    got = client.predict("extract", turns, **GREEDY, api_name="/chat")
    assert got == last(engine.chat("extract", [{"role": "system", "content": JSON_SYSTEM}, *turns], greedy()))


def test_classify_endpoint_returns_label_probabilities(client: Any, engine: Engine) -> None:
    probs = client.predict("sentiment", "awful movie", api_name="/classify")
    assert probs == pytest.approx(engine.classify("sentiment", "awful movie"))
    assert max(probs, key=probs.get) == "neg"


def test_card_endpoint(client: Any, tiny_lm: Path) -> None:
    card = client.predict("extract", api_name="/card")
    assert card["summary"].startswith(f"extract · {tiny_lm.name} · LoRA r4 · json_exact_match ")
    assert card["system_prompt"] == JSON_SYSTEM and len(card["examples"]) == 5
    assert f"- **base**: {tiny_lm.name}\n" in card["card"] and "- **eval decoding**: greedy" in card["card"]
    assert client.predict("sentiment", api_name="/card")["labels"] == ["neg", "pos"]


def test_eight_concurrent_clients_are_queued_and_all_served(served: Any, engine: Engine) -> None:
    from gradio_client import Client

    names = ["extract", "farewell"] * 4
    expected = {n: last(engine.generate(n, as_page(engine, n, "name: heidi"), greedy())) for n in set(names)}
    results: list[Any] = [None] * len(names)

    def one(i: int) -> None:
        try:
            results[i] = Client(str(served.local_url), verbose=False).predict(names[i], "name: heidi", **GREEDY,
                                                                              api_name="/generate")
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [expected[n] for n in names]


def test_auth_is_required_and_the_login_page_shows_no_api_or_adapter_names(engine: Engine) -> None:
    from gradio_client import Client

    from finetune.serving.demo import build_app, launch

    app = build_app(engine)
    url = launch(app, port=free_port(), auth=[("ada", "s3cret")], block=False)
    try:
        login_page = urllib.request.urlopen(url, timeout=30).read().decode()
        assert '"auth_required":true' in login_page
        assert not any(name in login_page for name in ("extract", "farewell", "sentiment", "/generate", "system_prompt"))
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises ValueError or httpx errors by version
            Client(url, verbose=False)
        card = Client(url, auth=("ada", "s3cret"), verbose=False).predict(api_name="/card", adapter="farewell")
        assert card["name"] == "farewell"
    finally:
        app.close()


def test_mounted_on_another_server_with_the_same_page_and_login(engine: Engine) -> None:
    """`mount` (what `finetune serve` uses for /demo): the page's options, and a login page without API or names."""
    import uvicorn
    from fastapi import FastAPI

    from finetune.serving.demo import build_app, mount

    server, blocks = FastAPI(), build_app(engine)
    mount(server, blocks, "/demo", auth=[("ada", "s3cret")])
    assert "gradio_api/mcp/schema" in blocks.head and ".inline-warning" in blocks.css  # the page's own head and CSS
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(server, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not uv.started and time.time() < deadline:
            time.sleep(0.1)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/demo/", timeout=30).read().decode()
        assert '"auth_required":true' in page  # the login page
        assert not any(name in page for name in ("extract", "farewell", "sentiment", "/generate"))
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


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
    with pytest.raises(FinetuneError, match=r"--auth-file .*missing: not found"):
        read_auth(tmp_path / "missing", None)


def test_cli_refuses_bad_requests_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.cli import main

    assert main(["demo"]) == 1
    assert "nothing to serve" in capsys.readouterr().err
    assert main(["demo", str(tmp_path / "missing")]) == 1
    assert "adapter folder not found" in capsys.readouterr().err
    assert main(["demo", str(tmp_path), "--max-new-tokens", "0"]) == 1
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
    assert main(["demo", str(tmp_path), "--auth-file", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err


def test_demo_app_file_is_the_packaged_app() -> None:
    """demo/app.py (the Spaces-style entry point) only re-exports the app that lives in the package."""
    import runpy

    import finetune.serving.demo as packaged

    app_file = Path(__file__).resolve().parents[1] / "demo" / "app.py"
    module = runpy.run_path(str(app_file), run_name="demo_app")
    assert module["build_app"] is packaged.build_app and module["launch"] is packaged.launch


# -- the card -------------------------------------------------------------------------------------------------------


def quickstart_card(**changes: Any) -> AdapterCard:
    card = AdapterCard(
        name="quickstart", base="/home/me/.cache/models/SmolLM2-135M-Instruct", task="causal_lm", rank=16, alpha=32,
        chat=True, metrics={"train_loss": 0.41},
        eval_metrics={"exact_match": {"base": 0.0, "adapter": 0.9, "delta": 0.9},
                      "json_exact_match": {"base": 0.0, "adapter": 0.9, "delta": 0.9},
                      "loss": {"base": 6.9, "adapter": 2.33, "delta": -4.57}},
        eval_decoding={"strategy": "greedy", "max_new_tokens": 40})
    for key, value in changes.items():
        setattr(card, key, value)
    return card


def test_summary_line_names_the_base_and_the_headline_metric() -> None:
    from finetune.serving.demo.card import model_name, summary_line

    assert summary_line(quickstart_card()) == "quickstart · SmolLM2-135M-Instruct · LoRA r16 · json_exact_match 0.90 (base 0.00)"
    assert model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_name(".cache/models/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert summary_line(quickstart_card(eval_metrics={})) == "quickstart · SmolLM2-135M-Instruct · LoRA r16 · train_loss 0.41 (not evaluated yet)"


def test_card_lists_equal_exact_matches_once_with_signed_deltas() -> None:
    from finetune.serving.demo.card import card_markdown, default_temperature

    text = card_markdown(quickstart_card())
    assert "- **eval json_exact_match = exact_match**: 0.90 (base 0.00, +0.90)" in text
    assert "eval exact_match**" not in text and "- **eval loss**: 2.33 (base 6.90, -4.57)" in text
    assert "- **base**: SmolLM2-135M-Instruct" in text and "/home/me" not in text
    unequal = quickstart_card()
    unequal.eval_metrics["exact_match"] = {"base": 0.0, "adapter": 0.5, "delta": 0.5}
    assert "- **eval exact_match**: 0.50 (base 0.00, +0.50)" in card_markdown(unequal)
    assert default_temperature(quickstart_card()) == 0.0 and default_temperature(quickstart_card(eval_decoding={})) == 0.7


def test_installed_wheel_serves_the_demo_from_another_folder(adapters: dict[str, Path], tmp_path: Path) -> None:
    """`pip install` of the wheel into a fresh venv (dependencies borrowed from this one by a path file, the package
    itself only from the wheel), then `finetune demo` from an unrelated folder: no source checkout needed."""
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig

    root, src = Path(__file__).resolve().parents[1], tmp_path / "src"  # built from a copy: no build/ in the checkout
    shutil.copytree(root / "finetune", src / "finetune", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, env=env, cwd=tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)  # type: ignore[attr-defined]
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # a plain path: no editable finder
    wheel = next((tmp_path / "dist").glob("finetune-*.whl"))
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, env=env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = free_port()
    with (tmp_path / "server.log").open("w") as log:
        proc = subprocess.Popen([str(venv / "bin" / "finetune"), "demo", str(adapters["farewell"]), "--port", str(port)],
                                cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while proc.poll() is None and time.time() < deadline and f"demo: open http://127.0.0.1:{port}/" not in (tmp_path / "server.log").read_text():
            time.sleep(0.5)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert "finetune demo" in page and "farewell" in page
        where = subprocess.run([str(venv / "bin" / "python"), "-c", "import finetune.serving.demo as d; print(d.__file__)"],
                               check=True, capture_output=True, text=True, cwd=elsewhere, env=env).stdout
        assert where.startswith(str(purelib))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
