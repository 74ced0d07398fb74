"""prompt.json: the prompt format training used (chat template, shared system prompt, example prompts), recorded at
save time, read back by every later command, reconstructed for adapters saved before it existed, never published
with its examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.data.prompt_record import PROMPT_FILE, PromptRecord
from finetune.lifecycle.folder import read_adapter
from finetune.testing import chat_rows, qa_rows, write_jsonl

SYSTEM = "Answer in one short sentence."


@pytest.fixture(scope="module")
def chat_adapter(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory, train_tiny) -> Path:
    tmp = tmp_path_factory.mktemp("prompt_chat")
    val = write_jsonl(tmp / "val.jsonl", [{"prompt": f"val question {i}", "completion": f"answer {i}"} for i in range(8)])
    return train_tiny(tmp, tiny_lm, qa_rows(16), "sys", steps=2, data={"system_prompt": SYSTEM, "validation": str(val)})


def test_saved_record_has_the_system_prompt_and_validation_examples(chat_adapter: Path) -> None:
    record = json.loads((chat_adapter / PROMPT_FILE).read_text())
    assert record["chat_template"] is True
    assert (record["system_prompt"], record["system_prompt_source"]) == (SYSTEM, "data.system_prompt")
    assert record["examples_source"] == "validation" and len(record["examples"]) == 5
    first = record["examples"][0]
    assert (first["prompt"], first["reference"]) == ("val question 0", "answer 0")
    assert first["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "val question 0"}]
    assert read_adapter(chat_adapter).prompt == PromptRecord.from_dict(record)


def test_chat_rows_sharing_a_system_message_are_recorded(tiny_lm: Path, tmp_path: Path, train_tiny) -> None:
    folder = train_tiny(tmp_path, tiny_lm, chat_rows(8), "chat", steps=1)
    record = read_adapter(folder).prompt
    assert (record.system_prompt, record.system_prompt_source, record.examples_source) == ("be brief", "training rows", "train")
    assert record.examples[0].prompt == "and then?" and record.examples[0].reference == "the end"
    assert record.messages("hi") == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_rows_with_different_system_prompts_record_none(tiny_lm: Path, tmp_path: Path, train_tiny) -> None:
    rows = chat_rows(8)
    rows[1]["messages"][0]["content"] = "be long"
    record = read_adapter(train_tiny(tmp_path, tiny_lm, rows, "mixed", steps=1)).prompt
    assert (record.system_prompt, record.system_prompt_source) == (None, "varies")


def test_plain_text_adapter_has_no_system_prompt(tiny_lm_plain: Path, tmp_path: Path, train_tiny) -> None:
    record = read_adapter(train_tiny(tmp_path, tiny_lm_plain, qa_rows(8), "plain", steps=1,
                                     data={"system_prompt": SYSTEM})).prompt
    assert (record.chat_template, record.system_prompt) == (False, None)  # plain prompts never carried it
    assert record.examples[0].prompt == "name: alice" and record.examples[0].messages is None


def test_adapter_saved_before_the_record_gets_it_from_its_job(chat_adapter: Path, tmp_path: Path) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(chat_adapter, old)
    (old / PROMPT_FILE).unlink()
    record = read_adapter(old).prompt
    assert record.system_prompt == SYSTEM and record.examples[0].reference == "answer 0"
    job = (old / "finetune.yaml").read_text()
    (old / "finetune.yaml").write_text(job.replace(str(tmp_path.parent), "/nonexistent"))  # data files gone
    gone = read_adapter(old).prompt
    assert (gone.system_prompt, gone.system_prompt_source, gone.examples) == (SYSTEM, "data.system_prompt", [])


def test_publish_keeps_the_system_prompt_but_not_the_examples(chat_adapter: Path, tmp_path: Path) -> None:
    from finetune.lifecycle.modelcard import CardInput
    from finetune.lifecycle.publish import build_hub_folder

    build_hub_folder(read_adapter(chat_adapter), tmp_path / "hub", CardInput("me/sys", None))
    published = json.loads((tmp_path / "hub" / PROMPT_FILE).read_text())
    assert published["system_prompt"] == SYSTEM and published["examples"] == []
    assert "val question" not in "".join(p.read_text(errors="ignore") for p in (tmp_path / "hub").iterdir())
