"""finetune.serving.engine: the functions the demo calls, checked against plain transformers / peft references on tiny
adapters trained by the real pipeline (once per module)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from finetune.serving.engine import BASE, Engine, GenerationParams, InputError, Limits, load_engine
from finetune.testing import class_rows, farewell_rows, last, qa_rows

GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0)
SAMPLED = GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path, tiny_lm_plain: Path, tiny_encoder: Path, train_tiny) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("inference")
    return {
        "greeter": train_tiny(tmp, tiny_lm, qa_rows(), "greeter"),
        "farewell": train_tiny(tmp, tiny_lm, farewell_rows(), "farewell"),
        "plain": train_tiny(tmp, tiny_lm_plain, qa_rows(), "plain", steps=4),
        "sentiment": train_tiny(tmp, tiny_encoder, class_rows(), "sentiment", task="classification", steps=20),
    }


@pytest.fixture(scope="module")
def engine(adapters: dict[str, Path]) -> Engine:
    return load_engine([adapters["greeter"], adapters["farewell"], adapters["sentiment"]])


def reference_text(model: Any, tok: Any, prompt: str, chat: bool, max_new_tokens: int) -> str:
    """Plain `generate` (greedy) on a model loaded on its own, decoded the way the streamer decodes."""
    import torch

    from finetune.data.prompting import prompt_ids

    ids = prompt_ids(tok, prompt, chat=chat)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[tok.eos_token_id],
                             pad_token_id=tok.pad_token_id)
    return str(tok.decode(out[0, len(ids):], skip_special_tokens=True))


def test_picker_lists_base_then_adapters_in_order(engine: Engine) -> None:
    assert engine.names() == [BASE, "greeter", "farewell", "sentiment"]


@pytest.mark.parametrize("name", ["greeter", "farewell"])
def test_adapter_generation_equals_peft_loaded_alone(engine: Engine, adapters: dict[str, Path], name: str) -> None:
    from finetune.lifecycle.folder import load_adapter

    model, tok, info = load_adapter(adapters[name])
    expected = reference_text(model, tok, "name: carol", info.chat, GREEDY.max_new_tokens)
    assert last(engine.generate(name, "name: carol", GREEDY)) == expected


def test_base_entry_equals_the_plain_base_model(engine: Engine, tiny_lm: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    assert last(engine.generate(BASE, "name: carol", GREEDY)) == reference_text(model, tok, "name: carol", True, 12)


def test_switching_adapters_changes_output_and_switching_back_restores_it(engine: Engine) -> None:
    first = {n: last(engine.generate(n, "name: dave", GREEDY)) for n in ("greeter", "farewell", BASE)}
    assert first["greeter"].startswith("hello") and first["farewell"].startswith("bye")
    assert len(set(first.values())) == 3
    again = {n: last(engine.generate(n, "name: dave", GREEDY)) for n in (BASE, "farewell", "greeter")}
    assert again == first


def test_stream_grows_by_prefixes(engine: Engine) -> None:
    pieces = list(engine.generate("greeter", "name: erin", GREEDY))
    assert len(pieces) > 1 and all(b.startswith(a) for a, b in zip(pieces, pieces[1:], strict=False))


def test_sampling_is_reproducible_for_a_seed(engine: Engine) -> None:
    runs = [last(engine.generate(BASE, "name: bob", SAMPLED)) for _ in range(2)]
    other = last(engine.generate(BASE, "name: bob", GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8)))
    assert runs[0] == runs[1] and runs[0] != other


def test_compare_is_the_base_and_the_adapter_on_the_same_prompt_and_seed(engine: Engine) -> None:
    steps = list(engine.compare("farewell", "name: bob", SAMPLED))
    assert steps[-1] == (last(engine.generate(BASE, "name: bob", SAMPLED)), last(engine.generate("farewell", "name: bob", SAMPLED)))
    # one batch: both sides grow together (not the base to its end, then the adapter)
    assert any(base and adapter and (base, adapter) != steps[-1] for base, adapter in steps)
    with pytest.raises(InputError, match="Pick an adapter"):
        last(engine.compare(BASE, "name: bob", SAMPLED))


def test_chat_renders_messages_through_the_template(engine: Engine) -> None:
    messages = [{"role": "user", "content": "name: frank"}]
    assert last(engine.chat("greeter", messages, GREEDY)) == last(engine.generate("greeter", "name: frank", GREEDY))
    with pytest.raises(InputError, match="Type a message"):
        last(engine.chat("greeter", [{"role": "assistant", "content": "hi"}], GREEDY))


def test_plain_text_adapter_renders_without_template_and_refuses_chat(adapters: dict[str, Path]) -> None:
    from finetune.lifecycle.folder import load_adapter

    plain = load_engine([adapters["plain"]])
    model, tok, info = load_adapter(adapters["plain"])
    assert info.chat is False
    assert last(plain.generate("plain", "name: grace", GREEDY)) == reference_text(model, tok, "name: grace", False, 12)
    with pytest.raises(InputError, match="without a chat template"):
        last(plain.chat("plain", [{"role": "user", "content": "hi"}], GREEDY))


def test_classify_gives_label_probabilities_equal_to_the_reference(engine: Engine, adapters: dict[str, Path]) -> None:
    import torch

    from finetune.lifecycle.folder import load_adapter

    model, tok, info = load_adapter(adapters["sentiment"])
    with torch.inference_mode():
        expected = torch.softmax(model(**tok("awful movie", return_tensors="pt")).logits[0], -1).tolist()
    probs = engine.classify("sentiment", "awful movie")
    assert list(probs) == info.run["labels"] == ["neg", "pos"]
    assert list(probs.values()) == pytest.approx(expected, abs=1e-6)
    assert probs["neg"] > 0.5 and engine.classify("sentiment", "great movie")["pos"] > 0.5  # it learned the task


def test_tasks_are_kept_to_their_tabs(engine: Engine) -> None:
    with pytest.raises(InputError, match="Classify tab"):
        last(engine.generate("sentiment", "great movie", GREEDY))
    with pytest.raises(InputError, match="classification adapter"):
        engine.classify("greeter", "great movie")
    with pytest.raises(InputError, match="unknown adapter 'nope'"):
        last(engine.generate("nope", "x", GREEDY))


def test_limits_refuse_empty_and_long_input_with_a_message(engine: Engine) -> None:
    small = Engine(engine.entries, Limits(max_prompt_tokens=8, max_new_tokens=3))
    for empty in ("", "   \n"):
        with pytest.raises(InputError, match="empty"):
            last(small.generate("greeter", empty, GREEDY))
        with pytest.raises(InputError, match="empty"):
            small.classify("sentiment", empty)
    with pytest.raises(InputError, match=r"tokens; this server accepts at most 8"):
        last(small.generate("greeter", "name: alice " * 4, GREEDY))
    with pytest.raises(InputError, match="characters"):
        last(small.generate("greeter", "x" * 10_000, GREEDY))
    with pytest.raises(InputError, match="at most 8"):
        small.classify("sentiment", "great movie " * 8)


def test_max_new_tokens_is_capped_by_the_server(engine: Engine, adapters: dict[str, Path]) -> None:
    small = Engine(engine.entries, Limits(max_prompt_tokens=64, max_new_tokens=3))
    asked = GenerationParams(max_new_tokens=500, temperature=0.0)
    capped = last(small.generate(BASE, "name: heidi", asked))
    assert capped == last(engine.generate(BASE, "name: heidi", GenerationParams(max_new_tokens=3, temperature=0.0)))
    assert capped != last(engine.generate(BASE, "name: heidi", GenerationParams(max_new_tokens=12, temperature=0.0)))


@pytest.mark.parametrize("how", ["event", "close"])
def test_cancel_stops_the_model_at_the_next_token(engine: Engine, how: str, slow_no_eos) -> None:
    long = GenerationParams(max_new_tokens=300, temperature=1.0, seed=1)
    cancel = threading.Event()
    with slow_no_eos(engine) as probe:
        stream = engine.generate(BASE, "name: alice", long, cancel)
        for i, _ in enumerate(stream):
            if i == 2:
                cancel.set() if how == "event" else stream.close()  # type: ignore[attr-defined]
                break
        calls_at_cancel = probe.calls
        if how == "event":
            last(stream)
        time.sleep(0.2)
        assert probe.calls <= calls_at_cancel + 2 < 20  # stopped, nowhere near 300
    assert (engine.stats().running, engine.stats().waiting) == (0, 0)  # the row left the batch
    with slow_no_eos(engine, delay=0) as probe:  # without a cancel the same request runs its full length
        last(engine.generate(BASE, "name: alice", GenerationParams(max_new_tokens=40, temperature=1.0, seed=1)))
    assert probe.calls == 40


def test_requests_are_serialised_on_the_shared_model(engine: Engine) -> None:
    """Two threads asking for different adapters at once each get exactly their own adapter's answer."""
    expected = {n: last(engine.generate(n, "name: bob", GREEDY)) for n in ("greeter", "farewell")}
    results: dict[str, list[str]] = {"greeter": [], "farewell": []}

    def worker(name: str) -> None:
        for _ in range(3):
            results[name].append(last(engine.generate(name, "name: bob", GREEDY)))

    threads = [threading.Thread(target=worker, args=(n,)) for n in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {n: [expected[n]] * 3 for n in results}


def test_cards_come_from_run_json_and_adapter_config(engine: Engine) -> None:
    card = engine.card("greeter")
    assert (card.task, card.rank, card.alpha, card.chat, card.labels) == ("causal_lm", 4, 8.0, True, None)
    assert card.metrics["steps"] == 30 and card.metrics["train_loss"] > 0
    assert engine.card("sentiment").labels == ["neg", "pos"] and engine.card("sentiment").task == "classification"
    assert engine.card(BASE).base == card.base


def test_card_shows_eval_json_metrics(adapters: dict[str, Path], tmp_path: Path) -> None:
    import json
    import shutil

    folder = shutil.copytree(adapters["greeter"], tmp_path / "evaluated")
    report = {"metrics": {"exact_match": {"base": 0.0, "adapter": 0.75, "delta": 0.75, "better": "higher"},
                          "confusion_matrix": {"base": [[1]], "adapter": [[1]]}}}
    (folder / "eval.json").write_text(json.dumps(report))
    card = load_engine([folder]).card("evaluated")
    assert card.eval_metrics == {"exact_match": {"base": 0.0, "adapter": 0.75, "delta": 0.75}}


def test_base_alone(tiny_lm: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    alone = load_engine([], base=str(tiny_lm))
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    assert alone.names() == [BASE]
    assert last(alone.generate(BASE, "name: ivan", GREEDY)) == reference_text(model, tok, "name: ivan", True, 12)


def test_load_errors_say_what_to_do(adapters: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match="nothing to serve"):
        load_engine([])
    twin = shutil.copytree(adapters["greeter"], tmp_path / "x" / "greeter")
    with pytest.raises(FinetuneError, match="two adapters are named 'greeter'.*rename one"):
        load_engine([adapters["greeter"], twin])
    with pytest.raises(FinetuneError, match="different bases.*--base"):
        load_engine([adapters["greeter"], adapters["plain"]])
    with pytest.raises(FinetuneError, match="not an adapter folder"):
        load_engine([tmp_path])
