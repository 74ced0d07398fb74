"""`finetune serve`: the official `openai` client against a live server on tiny adapters trained by the real pipeline
(models, chat, completions, streaming, greedy equal to plain peft, adapters and base batched together, cancel,
errors, API keys, 429, /demo, /v1/classify), the batching engine's guarantees, and the CLI (--print-vllm/sglang)."""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune.serving.engine import BASE, Batching, Engine, GenerationParams, Limits, load_engine
from finetune.testing import class_rows, farewell_rows, last, qa_rows

LIMITS = Limits(max_prompt_tokens=64, max_new_tokens=40)
GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0)
SYSTEM = "You are a tiny test model."


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path, tiny_encoder: Path, train_tiny) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serve")
    return {
        "greeter": train_tiny(tmp, tiny_lm, qa_rows(), "greeter"),
        "farewell": train_tiny(tmp, tiny_lm, farewell_rows(), "farewell", data={"system_prompt": SYSTEM}),
        "sentiment": train_tiny(tmp, tiny_encoder, class_rows(), "sentiment", task="classification", steps=20),
    }


@pytest.fixture(scope="module")
def engine(adapters: dict[str, Path]) -> Iterator[Engine]:
    engine = load_engine(list(adapters.values()), limits=LIMITS)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def url(engine: Engine) -> Iterator[str]:
    from finetune.serving.demo import build_app
    from finetune.serving.server import create_app, running

    with running(create_app(engine, demo=build_app)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


class Probe:
    """LM-head hook: records the rows of every forward and can slow steps down (so requests overlap)."""

    def __init__(self, engine: Engine, delay: float = 0.0):
        self.head, self.delay, self.rows = engine.entries[BASE].model.get_output_embeddings(), delay, []

    def __enter__(self) -> Probe:
        self.handle = self.head.register_forward_hook(lambda m, i, o: self._seen(o))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()

    def _seen(self, output: Any) -> None:
        self.rows.append(output.shape[0])
        time.sleep(self.delay)


def reference(folder: Path | None, prompt: Any, max_new: int, base: Path | None = None) -> str:
    """Plain transformers/peft greedy generate on a model loaded on its own (the base alone when folder is None)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.prompting import prompt_ids, stop_token_ids
    from finetune.lifecycle.folder import load_adapter

    if folder is None:
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:
        model, tok, _ = load_adapter(folder)
    ids = prompt_ids(tok, prompt, chat=True)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=stop_token_ids(tok, model.generation_config))
    return str(tok.decode(out[0, len(ids):], skip_special_tokens=True))


def chat(client: Any, model: str, text: str, **kw: Any) -> Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          temperature=kw.pop("temperature", 0), max_tokens=kw.pop("max_tokens", 12), **kw)


# -- the API through the official client ----------------------------------------------------------------------


def test_models_lists_the_base_and_every_adapter(client: Any) -> None:
    assert [m.id for m in client.models.list()] == ["base", "greeter", "farewell", "sentiment"]


@pytest.mark.parametrize("model", ["greeter", "base"])
def test_greedy_chat_equals_plain_peft(client: Any, adapters: dict[str, Path], tiny_lm: Path, model: str) -> None:
    folder = adapters[model] if model != "base" else None
    expected = reference(folder, [{"role": "user", "content": "name: carol"}], 12, base=tiny_lm)
    answer = chat(client, model, "name: carol")
    assert answer.choices[0].message.content == expected
    assert answer.model == model and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_a_chat_without_system_message_gets_the_recorded_system_prompt(client: Any, adapters: dict[str, Path]) -> None:
    from finetune.lifecycle.folder import read_adapter

    assert read_adapter(adapters["farewell"]).prompt.system_prompt == SYSTEM
    recorded = reference(adapters["farewell"], [{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": "name: dave"}], 12)
    assert chat(client, "farewell", "name: dave").choices[0].message.content == recorded
    assert recorded.startswith("bye")
    own = [{"role": "system", "content": "Be different."}, {"role": "user", "content": "name: dave"}]
    answer = client.chat.completions.create(model="farewell", messages=own, temperature=0, max_tokens=12)
    assert answer.choices[0].message.content == reference(adapters["farewell"], own, 12)


def test_completion_renders_the_prompt_as_training_did(client: Any) -> None:
    done = client.completions.create(model="greeter", prompt="name: erin", temperature=0, max_tokens=12)
    assert done.choices[0].text == chat(client, "greeter", "name: erin").choices[0].message.content
    assert done.choices[0].text.startswith("hello")


def test_streamed_chunks_reassemble_to_the_non_streamed_text(client: Any) -> None:
    whole = chat(client, "farewell", "name: frank", max_tokens=20)
    chunks = list(chat(client, "farewell", "name: frank", max_tokens=20, stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    pieces = list(client.completions.create(model="greeter", prompt="name: frank", temperature=0, max_tokens=12,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == chat(client, "greeter", "name: frank").choices[0].message.content


def test_stop_strings_end_the_answer_before_them(client: Any) -> None:
    full = chat(client, "greeter", "name: grace", max_tokens=20).choices[0].message.content
    cut = full[3:5]
    stopped = chat(client, "greeter", "name: grace", max_tokens=20, stop=[cut])
    assert stopped.choices[0].message.content == full[: full.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


def test_adapters_and_base_in_one_batch_each_get_their_own_output(client: Any, engine: Engine) -> None:
    names = ["greeter", "farewell", "base", "greeter", "farewell", "base"]
    alone = {n: chat(client, n, "name: heidi").choices[0].message.content for n in set(names)}
    results: list[Any] = [None] * len(names)

    def one(i: int) -> None:
        results[i] = chat(client, names[i], "name: heidi").choices[0].message.content

    with Probe(engine, delay=0.05) as probe:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(names))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert results == [alone[n] for n in names]
    assert max(probe.rows) >= 3  # they really decoded together
    assert len(set(alone.values())) == 3


def test_a_closed_stream_stops_generation(url: str, engine: Engine, slow_no_eos) -> None:
    import httpx

    body = {"model": "base", "messages": [{"role": "user", "content": "name: ivan"}], "max_tokens": 40,
            "temperature": 1.0, "stream": True}
    with slow_no_eos(engine, delay=0.05) as probe:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data:")
                if events == 3:
                    break  # leaving the block closes the connection
        calls = probe.calls
        time.sleep(1.0)  # a running row would take ~20 more steps in this time
        assert probe.calls <= calls + 2 < 40
    stats = engine.stats()
    assert stats is not None and (stats.running, stats.waiting) == (0, 0)


def test_a_client_that_hangs_up_on_a_plain_request_frees_its_row(url: str, engine: Engine, slow_no_eos) -> None:
    import httpx

    body = {"model": "base", "prompt": "name: ivan", "max_tokens": 40, "temperature": 1.0}
    with slow_no_eos(engine, delay=0.05) as probe:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
        time.sleep(0.5)  # the server notices the closed connection and cancels at the next step
        calls = probe.calls
        time.sleep(1.0)
        assert probe.calls <= calls + 1 < 40
    stats = engine.stats()
    assert stats is not None and (stats.running, stats.waiting) == (0, 0)


def test_bad_requests_get_openai_error_objects(url: str, client: Any) -> None:
    import httpx
    import openai

    def post(path: str, body: Any) -> tuple[int, dict]:
        r = httpx.post(f"{url}{path}", content=body if isinstance(body, str) else json.dumps(body), timeout=30)
        return r.status_code, r.json()["error"]

    ok = {"model": "greeter", "messages": [{"role": "user", "content": "hi"}]}
    assert post("/v1/chat/completions", "{not json")[0] == 400
    status, error = post("/v1/chat/completions", {**ok, "temperature": "hot"})
    assert (status, error["param"], error["type"]) == (400, "temperature", "invalid_request_error")
    status, error = post("/v1/chat/completions", {**ok, "n": 2})
    assert status == 400 and "n=2" in error["message"] and error["param"] == "n"
    assert post("/v1/chat/completions", {**ok, "logprobs": True})[1]["param"] == "logprobs"
    assert post("/v1/chat/completions", {**ok, "max_tokens": 41})[1]["param"] == "max_tokens"
    assert post("/v1/chat/completions", {**ok, "messages": []})[0] == 400
    assert post("/v1/completions", {"model": "greeter", "prompt": "name: alice " * 40})[1]["message"].count("at most 64")
    assert post("/v1/chat/completions", {**ok, "model": "sentiment"})[1]["message"].endswith("POST /v1/classify")
    assert post("/nope", {})[0] == 404
    with pytest.raises(openai.NotFoundError) as missing:
        chat(client, "nope", "hi")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        chat(client, "greeter", "hi", max_tokens=1000)
    assert chat(client, "greeter", "name: bob").choices[0].message.content  # still serving


def test_classify_returns_label_probabilities(url: str, engine: Engine) -> None:
    import httpx

    body = httpx.post(f"{url}/v1/classify", json={"model": "sentiment", "input": ["awful movie", "great movie"]}).json()
    assert [d["label"] for d in body["data"]] == ["neg", "pos"]
    assert body["data"][0]["probs"] == pytest.approx(engine.classify("sentiment", "awful movie"), abs=1e-5)


def test_health_and_the_demo_page(url: str) -> None:
    import httpx

    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    page = httpx.get(f"{url}/demo/", follow_redirects=True)
    assert page.status_code == 200 and "gradio" in page.text.lower()


def test_one_log_line_per_request_without_the_prompt(client: Any, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="finetune.serve"):
        chat(client, "greeter", "name: secret-prompt-text")
        deadline = time.time() + 5  # the line is written once the response is complete, just after the client has it
        while not any("/v1/chat/completions" in r.getMessage() for r in caplog.records) and time.time() < deadline:
            time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if "/v1/chat/completions" in r.getMessage()]
    assert len(lines) == 1 and "model=greeter" in lines[0] and "completion_tokens=" in lines[0]
    assert "secret-prompt-text" not in caplog.text


def test_api_key_is_enforced_when_set(engine: Engine) -> None:
    import httpx
    import openai

    from finetune.serving.demo import build_app
    from finetune.serving.server import create_app, running

    key = "k" * 32
    with running(create_app(engine, api_keys=[key], demo=build_app)) as base:
        assert httpx.get(f"{base}/v1/models").status_code == 401
        denied = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        assert len(openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0).models.list().data) == 4
        page = httpx.Client(base_url=base)  # the demo's login takes any user name and a key as the password
        assert page.get("/demo/config").status_code == 401
        assert page.post("/demo/login", data={"username": "me", "password": "wrong"}).status_code == 400
        assert page.post("/demo/login", data={"username": "me", "password": key}).status_code == 200
        assert page.get("/demo/config").status_code == 200


def test_a_full_queue_answers_429(adapters: dict[str, Path], slow_no_eos) -> None:
    import httpx

    from finetune.serving.server import create_app, running

    small = load_engine([adapters["greeter"]], limits=LIMITS, batching=Batching(max_batch=1, max_queue=1))
    body = {"model": "base", "prompt": "name: alice", "max_tokens": 40, "temperature": 1.0}
    try:
        with slow_no_eos(small, delay=0.05), running(create_app(small)) as base:
            results: list[int] = []
            retry: list[str | None] = []

            def one() -> None:
                response = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
                results.append(response.status_code)
                if response.status_code == 429:
                    retry.append(response.headers.get("retry-after"))
                    assert response.json()["error"]["code"] == "queue_full"

            threads = [threading.Thread(target=one) for _ in range(4)]
            for t in threads:
                t.start()
                time.sleep(0.2)
            for t in threads:
                t.join()
            refused = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert sorted(results) == [200, 200, 429, 429] and retry == ["1", "1"]
        assert refused.status_code == 200  # the queue drained: served again
    finally:
        small.close()


# -- the engine's batching guarantees -------------------------------------------------------------------------


def test_greedy_and_seeded_outputs_are_the_same_alone_or_batched(engine: Engine) -> None:
    sampled = GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    asks = [("greeter", GREEDY), ("farewell", GREEDY), (BASE, GREEDY), ("greeter", sampled), (BASE, sampled)]
    alone = [engine.submit(n, "name: judy", p).result().text for n, p in asks]
    with Probe(engine, delay=0.02) as probe:
        streams = [engine.submit(n, "name: judy", p) for n, p in asks]
        together = [s.result().text for s in streams]
    assert together == alone and max(probe.rows) >= 4


def test_dora_and_other_ranks_batch_with_plain_adapters_and_equal_plain_peft(
        adapters: dict[str, Path], tiny_lm: Path, train_tiny, tmp_path_factory: pytest.TempPathFactory) -> None:
    """DoRA (which peft cannot mix in a batch) and a rank-8 adapter next to a rank-4 one, alone and together."""
    tmp = tmp_path_factory.mktemp("serve_variants")
    folders = [adapters["greeter"], train_tiny(tmp, tiny_lm, farewell_rows(), "wide", lora={"r": 8, "alpha": 16}),
               train_tiny(tmp, tiny_lm, farewell_rows(), "dora", lora={"use_dora": True})]
    mixed = load_engine(folders, limits=LIMITS)
    try:
        names = [f.name for f in folders]
        expected = [reference(f, [{"role": "user", "content": "name: kim"}], 12) for f in folders]
        alone = [mixed.submit(n, "name: kim", GREEDY).result().text for n in names]
        with Probe(mixed, delay=0.02) as probe:
            streams = [mixed.submit(n, "name: kim", GREEDY) for n in [*names, BASE]]
            together = [s.result().text for s in streams]
        assert alone == expected and together[:3] == expected and max(probe.rows) >= 3
        assert len(set(expected)) == 3
    finally:
        mixed.close()


def test_stream_events_carry_text_tokens_and_finish_reason(engine: Engine) -> None:
    chunks = list(engine.submit("greeter", "name: alice", GenerationParams(max_new_tokens=3, temperature=0.0)))
    assert chunks[-1].finish_reason in ("stop", "length") and all(c.finish_reason is None for c in chunks[:-1])
    assert "".join(c.delta for c in chunks) == chunks[-1].text and chunks[-1].tokens <= 3
    capped = engine.submit(BASE, "name: alice", GenerationParams(max_new_tokens=2, temperature=1.0, seed=3)).result()
    assert capped.tokens <= 2 and capped.prompt_tokens > 0


def test_compare_chunks_decode_both_sides_in_one_batch(engine: Engine) -> None:
    with Probe(engine) as probe:
        pairs = list(engine.compare_chunks("farewell", "name: bob", GREEDY))
    base, adapter = pairs[-1]
    assert (base.finish_reason, adapter.finish_reason) != (None, None)
    assert base.text == last(engine.generate(BASE, "name: bob", GREEDY, system_prompt=SYSTEM))
    assert adapter.text == last(engine.generate("farewell", "name: bob", GREEDY))
    assert probe.rows[0] == 2  # one prefill for both


# -- the command ----------------------------------------------------------------------------------------------


def test_print_vllm_and_sglang_commands(adapters: dict[str, Path], tiny_lm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.cli import main
    from finetune.lifecycle.targets import VLLM_RANKS

    folders = [str(adapters["greeter"]), str(adapters["farewell"])]
    assert main(["serve", *folders, "--print-vllm"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[:3] == ["vllm", "serve", str(tiny_lm.resolve())] and "--enable-lora" in argv
    rank = int(argv[argv.index("--max-lora-rank") + 1])
    assert rank in VLLM_RANKS and rank >= 4 and rank == min(r for r in VLLM_RANKS if r >= 4)
    modules = argv[argv.index("--lora-modules") + 1:]
    assert modules == [f"greeter={adapters['greeter']}", f"farewell={adapters['farewell']}"]
    assert main(["serve", *folders, "--print-sglang"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[argv.index("--model-path") + 1] == str(tiny_lm.resolve())
    targets = argv[argv.index("--lora-target-modules") + 1: argv.index("--lora-paths")]
    config = json.loads((adapters["greeter"] / "adapter_config.json").read_text())
    assert set(targets) == {t.rsplit(".", 1)[-1] for t in config["target_modules"]} and argv[argv.index("--max-lora-rank") + 1] == "4"
    assert main(["serve", str(adapters["sentiment"]), "--print-vllm"]) == 1
    assert "[task]" in capsys.readouterr().err


def test_cli_refuses_an_open_host_without_a_key_and_bad_key_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.cli import main

    assert main(["serve", "--base", str(tmp_path), "--host", "0.0.0.0"]) == 1
    assert "--api-key-file" in capsys.readouterr().err
    weak = tmp_path / "keys"
    weak.write_text("# keys\nshort\n")
    assert main(["serve", "--base", str(tmp_path), "--api-key-file", str(weak)]) == 1
    err = capsys.readouterr().err
    assert "shorter than 16" in err and "short\n" not in err
    assert main(["serve", "--max-batch", "0", "--base", str(tmp_path)]) == 1
    assert "--max-batch must be between 1 and 256, got 0" in capsys.readouterr().err
    assert main(["serve", "--port", "70000", "--base", str(tmp_path)]) == 1
    assert "--port must be between 1 and 65,535" in capsys.readouterr().err


# -- the acceptance run on the real quickstart adapter (slow: `pytest -m slow tests/test_serve.py`) ---------------


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_quickstart_served_through_openai_scores_what_eval_scores(tmp_path: Path) -> None:
    """`finetune serve adapters/quickstart` + the openai client on the held-out rows (greedy) gives the same
    json_exact_match as `finetune eval` on those rows (its eval.json when it was made from exactly these rows, else
    a fresh eval). The client sends only the user message: the server adds the system prompt recorded at training."""
    import os
    import socket
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from openai import OpenAI

    from finetune.evaluation.scoring import generation_metrics

    root = Path(__file__).resolve().parents[1]
    folder = Path(os.environ.get("FINETUNE_QUICKSTART_ADAPTER", root / "adapters" / "quickstart"))
    if not (folder / "adapter_config.json").is_file():
        pytest.skip(f"no quickstart adapter at {folder}: run `bash scripts/quickstart.sh` (or set FINETUNE_QUICKSTART_ADAPTER)")
    test_file = root / "data" / "quickstart" / "test.jsonl"
    rows = [json.loads(line) for line in test_file.read_text().splitlines()]
    finetune = [sys.executable, "-m", "finetune"]
    saved = folder / "eval.json"
    evaluated_on = Path(json.loads(saved.read_text())["data"]["path"]) if saved.is_file() else None
    if not (evaluated_on and evaluated_on.is_file() and evaluated_on.read_bytes() == test_file.read_bytes()):
        saved = tmp_path / "eval" / "eval.json"
        subprocess.run([*finetune, "eval", str(folder), "--data", str(test_file), "--out", str(saved.parent)],
                       check=True, timeout=3000)
    report = json.loads(saved.read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([*finetune, "serve", str(folder), "--port", str(port), "--no-demo"], stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)

        def ask(row: dict) -> str:
            user = [m for m in row["messages"] if m["role"] == "user"]
            answer = client.chat.completions.create(model=folder.name, messages=user, temperature=0,
                                                    max_tokens=report["decoding"]["max_new_tokens"])
            return str(answer.choices[0].message.content).strip()

        with ThreadPoolExecutor(8) as pool:
            predictions = list(pool.map(ask, rows))
    finally:
        server.terminate()
        server.wait(timeout=60)
    references = [row["messages"][-1]["content"] for row in rows]
    served = generation_metrics(predictions, references, json_match=True)["json_exact_match"]
    evaluated = report["metrics"]["json_exact_match"]["adapter"]
    print(f"json_exact_match: served {served:.4f}, finetune eval {evaluated:.4f} on {len(rows)} rows")
    assert served == pytest.approx(evaluated, abs=1e-9)


def test_any_integer_seed_is_accepted(engine: Engine, client: Any) -> None:
    """torch's generator takes 0 <= seed < 2**64: larger or negative seeds are taken modulo 2**64, not a crash."""
    def sampled(seed: int) -> str | None:
        return last(engine.generate(BASE, "name: alice", GenerationParams(max_new_tokens=6, temperature=1.0, seed=seed)))

    assert sampled(7 + 2**64) == sampled(7) and sampled(-1) == sampled(2**64 - 1)
    answer = chat(client, "greeter", "name: bob", temperature=1.0, seed=2**70, max_tokens=4)
    assert answer.choices[0].finish_reason in ("stop", "length")
