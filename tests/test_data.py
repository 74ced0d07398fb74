"""Data pipeline: sources, formats, length policy, bad data, cache, mixing, validation hold-out, streaming, preview."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from finetune.config.data import DataConfig
from finetune.data import build_data
from finetune.errors import DataError, FinetuneError
from finetune.testing import chat_rows, qa_rows, write_jsonl

IGNORE = -100


@pytest.fixture(scope="module")
def tok(tiny_lm: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm)


@pytest.fixture(scope="module")
def plain_tok(tiny_lm_plain: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm_plain)


def cfg(tmp_path: Path, train: Any, **kw: Any) -> DataConfig:
    return DataConfig(train=train, cache_dir=str(tmp_path / "cache"), **{"max_seq_len": 64, **kw})


def trained(tok: Any, ex: dict[str, Any]) -> str:
    return str(tok.decode([t for t in ex["labels"] if t != IGNORE]))


# --- formats ---------------------------------------------------------------------------------------------------


def test_prompt_completion_plain_masks_prompt_and_trains_eos(tmp_path: Path, plain_tok: Any) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(4))
    b = build_data(cfg(tmp_path, str(f)), plain_tok)
    assert (b.format, b.chat) == ("prompt_completion", False)
    p = plain_tok("name: alice")["input_ids"]
    c = plain_tok("hello alice", add_special_tokens=False)["input_ids"] + [plain_tok.eos_token_id]
    assert b.train[0] == {"input_ids": p + c, "labels": [IGNORE] * len(p) + c}


def test_instruction_alpaca_with_input_and_custom_columns(tmp_path: Path, tok: Any) -> None:
    rows = [{"q": "Translate", "ctx": "bonjour", "a": "hello"}, {"q": "Say hi", "ctx": "", "a": "hi"}]
    f = tmp_path / "a.json"
    f.write_text(json.dumps(rows))
    c = cfg(tmp_path, str(f), format="instruction", columns={"instruction": "q", "input": "ctx", "output": "a"})
    b = build_data(c, tok)
    first = tok.decode(b.train[0]["input_ids"])
    assert "<|im_start|>user\nTranslate\n\nbonjour<|im_end|>" in first
    assert "<|im_start|>user\nSay hi<|im_end|>" in tok.decode(b.train[1]["input_ids"])
    assert trained(tok, b.train[0]) == "hello<|im_end|>\n"


def test_sharegpt_with_system_field_matches_openai_messages(tmp_path: Path, tok: Any) -> None:
    share = [{"system": "be brief", "conversations": [{"from": "human", "value": "who is bob?"},
                                                       {"from": "gpt", "value": "bob is a friend"}]}]
    openai = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who is bob?"},
                            {"role": "assistant", "content": "bob is a friend"}]}]
    a = build_data(cfg(tmp_path, str(write_jsonl(tmp_path / "s.jsonl", share))), tok)
    b = build_data(cfg(tmp_path, str(write_jsonl(tmp_path / "o.jsonl", openai))), tok)
    assert a.format == b.format == "chat"
    assert a.train[0] == b.train[0]
    assert trained(tok, a.train[0]) == "bob is a friend<|im_end|>\n"


def test_text_format_chunks_every_token_trained(tmp_path: Path, tok: Any) -> None:
    text = "the quick brown fox jumps over the lazy dog. " * 4
    f = tmp_path / "corpus.txt"
    f.write_text(text + "\n\nhello world\n")
    b = build_data(cfg(tmp_path, str(f), max_seq_len=16), tok)
    assert b.format == "text"
    ids = tok(text.rstrip("\n"))["input_ids"] + [tok.eos_token_id]
    chunks = [ex["input_ids"] for ex in b.train]
    assert [t for ch in chunks[: -(-len(ids) // 16)] for t in ch] == ids
    assert all(ex["labels"] == ex["input_ids"] and len(ex["input_ids"]) <= 16 for ex in b.train)


def test_classification_names_pairs_and_label_map(tmp_path: Path, tok: Any) -> None:
    rows = [{"text": "good day", "label": "pos"}, {"text": "bad day", "label": "neg"}, {"text": "fine", "label": "pos"}]
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    b = build_data(cfg(tmp_path, str(f)), tok, task="classification")
    assert b.labels == ["neg", "pos"] and [ex["label"] for ex in b.train] == [1, 0, 1]
    assert b.train[0]["input_ids"] == tok("good day")["input_ids"]
    mapped = build_data(cfg(tmp_path, str(f), labels=["pos", "neg"]), tok, task="classification")
    assert mapped.labels == ["pos", "neg"] and [ex["label"] for ex in mapped.train] == [0, 1, 0]
    with pytest.raises(DataError, match="task: classification"):
        build_data(cfg(tmp_path, str(f)), tok)


def test_classification_needs_no_eos_token(tmp_path: Path, tiny_encoder: Path) -> None:
    """Encoders such as BERT/MiniLM have no EOS; only generation formats need one."""
    from transformers import AutoTokenizer

    enc_tok = AutoTokenizer.from_pretrained(tiny_encoder)
    enc_tok.eos_token = None
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "good day", "label": 1}, {"text": "bad day", "label": 0}])
    assert [ex["label"] for ex in build_data(cfg(tmp_path, str(f)), enc_tok, task="classification").train] == [1, 0]
    g = write_jsonl(tmp_path / "p.jsonl", qa_rows(2))
    with pytest.raises(DataError, match="no EOS token"):
        build_data(cfg(tmp_path, str(g), use_chat_template="never"), enc_tok)


# --- sources ---------------------------------------------------------------------------------------------------


def test_csv_parquet_folder_and_glob_give_the_same_examples(tmp_path: Path, tok: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = qa_rows(6)
    ref = build_data(cfg(tmp_path, str(write_jsonl(tmp_path / "ref.jsonl", rows))), tok).train
    folder = tmp_path / "many"
    folder.mkdir()
    with (folder / "a.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["prompt", "completion"])
        w.writeheader()
        w.writerows(rows[:3])
    pq.write_table(pa.Table.from_pylist(rows[3:]), folder / "b.parquet")
    for source in (str(folder), str(folder / "*.*")):
        assert list(build_data(cfg(tmp_path, source), tok).train) == list(ref)


def test_mixing_by_weight_with_own_formats(tmp_path: Path, tok: Any) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", qa_rows(200))
    b = write_jsonl(tmp_path / "b.jsonl", chat_rows(200))
    c = cfg(tmp_path, [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}], max_seq_len=128)
    bundle = build_data(c, tok)
    used = [s["used"] for s in bundle.stats["sources"]]
    assert used[0] == 200 and 40 < used[1] < 100  # stops when the first source runs out, at ~3:1
    assert bundle.format == "mixed" and len(bundle.train) == sum(used)
    assert list(build_data(c, tok).train) == list(bundle.train)  # deterministic


# --- length policy, bad data -----------------------------------------------------------------------------------


def test_truncate_and_drop_are_counted(tmp_path: Path, tok: Any) -> None:
    rows = qa_rows(2) + [{"prompt": "name: " + "alice " * 30, "completion": "hello"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    t = build_data(cfg(tmp_path, str(f), max_seq_len=24, use_chat_template="never"), tok)
    assert (t.stats["truncated"], t.stats["dropped_no_target"], len(t.train)) == (1, 1, 2)
    d = build_data(cfg(tmp_path, str(f), max_seq_len=24, overlong="drop", use_chat_template="never"), tok)
    assert (d.stats["dropped_too_long"], len(d.train)) == (1, 2)
    with pytest.raises(DataError, match="no training example left"):
        build_data(cfg(tmp_path, str(f), max_seq_len=8, overlong="drop"), tok)


def test_bad_jsonl_line_names_file_and_line_or_is_skipped(tmp_path: Path, tok: Any) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(3))
    f.write_text(f.read_text() + '{"prompt": "oops\n' + json.dumps(qa_rows(1)[0]) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:4: not valid JSON"):
        build_data(cfg(tmp_path, str(f)), tok)
    b = build_data(cfg(tmp_path, str(f), on_bad_rows="skip"), tok)
    assert (b.stats["bad_rows"], len(b.train)) == (1, 4)


def test_missing_field_names_field_row_and_columns(tmp_path: Path, tok: Any) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(2) + [{"prompt": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"d\.jsonl:3: missing field 'completion'; the row has columns \['answer', 'prompt'\]"):
        build_data(cfg(tmp_path, str(f)), tok)


def test_empty_dataset_fails_before_any_model(tmp_path: Path, tok: Any) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(DataError, match="holds no rows"):
        build_data(cfg(tmp_path, str(f)), tok)


def test_template_without_end_of_turn_token_is_refused(tmp_path: Path, tiny_lm: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant:\n{% endif %}")
    f = write_jsonl(tmp_path / "d.jsonl", chat_rows(2))
    with pytest.raises(DataError, match="never learn to stop"):
        build_data(cfg(tmp_path, str(f)), tok)


# --- cache, hold-out, streaming --------------------------------------------------------------------------------


def test_second_run_is_a_cache_hit_with_equal_examples(tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.data.encode import Encoder

    c = cfg(tmp_path, str(write_jsonl(tmp_path / "d.jsonl", chat_rows(10))))
    first = build_data(c, tok)

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(Encoder, "encode", boom)
    second = build_data(c, tok)
    assert (first.stats["cache"], second.stats["cache"]) == ("miss", "hit")
    assert second.fingerprint == first.fingerprint and list(second.train) == list(first.train)
    monkeypatch.undo()
    assert build_data(c.model_copy(update={"max_seq_len": 128}), tok).stats["cache"] == "miss"  # config is in the key


def test_val_size_is_deterministic_and_disjoint(tmp_path: Path, tok: Any) -> None:
    c = cfg(tmp_path, str(write_jsonl(tmp_path / "d.jsonl", qa_rows(40))), val_size=0.25, cache=False)
    a, b = build_data(c, tok), build_data(c, tok)
    assert len(a.validation) == 10 and len(a.train) == 30
    assert list(a.validation) == list(b.validation)


def test_streaming_equals_eager_and_holds_out_the_same_way(tmp_path: Path, tok: Any) -> None:
    f = str(write_jsonl(tmp_path / "d.jsonl", chat_rows(30)))
    eager = build_data(cfg(tmp_path, f, cache=False, max_seq_len=128), tok)
    stream = build_data(cfg(tmp_path, f, streaming=True, shuffle_buffer=1, max_seq_len=128), tok)
    assert list(stream.train) == list(eager.train)
    assert stream.train[:2] == eager.train[:2]
    assert stream.stats["examples"] == 30
    with pytest.raises(FinetuneError, match="train.max_steps"):
        len(stream.train)
    held = cfg(tmp_path, f, streaming=True, shuffle_buffer=1, val_size=0.3)
    one, two = build_data(held, tok), build_data(held, tok)
    val = [json.dumps(e) for e in one.validation]
    assert val == [json.dumps(e) for e in two.validation] and 0 < len(val) < 30
    assert len(val) + len(list(one.train)) == 30


# --- preview ---------------------------------------------------------------------------------------------------


def test_preview_marks_trained_tokens_and_prints_stats(tmp_path: Path, tiny_lm: Path, capsys: pytest.CaptureFixture[str], write_job) -> None:
    from finetune.cli import main

    f = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    job = write_job(tmp_path, tiny_lm, f)
    assert main(["data", "preview", str(job), "data.packing=true", "data.max_seq_len=160",
                 f"data.cache_dir={tmp_path / 'c'}", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>assistant\n«" in out and " is a friend<|im_end|>\n»" in out and "«the end<|im_end|>\n»" in out
    assert "«who is" not in out  # user turns are not trained
    assert "│" in out  # packed row: examples separated
    assert "packing_efficiency:" in out and "length histogram" in out and "rows: 8" in out


def test_train_streaming_end_to_end_and_needs_max_steps(tmp_path: Path, tiny_lm: Path, capsys: pytest.CaptureFixture[str], write_job) -> None:
    from finetune.cli import main

    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(40))
    job = write_job(tmp_path, tiny_lm, f, data={"streaming": True, "val_size": 8, "packing": True},
                    train={"max_steps": 3, "micro_batch_size": 2})
    assert main(["train", str(job)]) == 0
    run = json.loads((tmp_path / "adapters" / "tiny" / "run.json").read_text())
    assert run["data"]["streaming"] is True and run["data"]["examples"] > 0
    assert main(["train", str(job), "train.max_steps=null", "output.run_name=again"]) == 2  # refused by the config check, before any model loads
    assert "max_steps" in capsys.readouterr().err


def test_hub_source_goes_through_load_dataset(tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network in tests: load_dataset is replaced, and we check what it is asked and that its rows flow."""
    import datasets

    calls: list[tuple[Any, ...]] = []

    def fake(name: str, subset: str | None, split: str, streaming: bool) -> Any:
        calls.append((name, subset, split, streaming))
        ds = datasets.Dataset.from_list(qa_rows(6))
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", fake)
    src = [{"hub": "org/qa", "subset": "en", "split": "train[:6]"}]
    eager = build_data(cfg(tmp_path, src), tok)
    stream = build_data(cfg(tmp_path, src, streaming=True, shuffle_buffer=1), tok)
    assert ("org/qa", "en", "train[:6]", False) in calls and ("org/qa", "en", "train[:6]", True) in calls
    assert len(eager.train) == 6 and list(stream.train) == list(eager.train)


def test_source_list_config_is_strict() -> None:
    from finetune.config import load_config_text
    from finetune.config.errors import ConfigError

    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        load_config_text("model: {name_or_path: m}\ndata: {train: [{weight: 2}]}\n")
    with pytest.raises(ConfigError, match="wieght"):
        load_config_text("model: {name_or_path: m}\ndata: {train: [{hub: x, wieght: 2}]}\n")


def test_source_list_is_shown_resolved() -> None:
    from finetune.config import dump_config, load_config_text

    cfg = load_config_text("model: {name_or_path: m}\ndata: {train: [{hub: org/x, weight: 2}]}\n")
    line = next(x for x in dump_config(cfg, comments=False).splitlines() if x.strip().startswith("train:"))
    assert "hub: org/x" in line and "weight: 2.0" in line
