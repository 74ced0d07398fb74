"""The adapter folder's README.md is finetune's model card: written at save, refreshed by eval, used by publish."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from finetune.evaluation import EvalOptions, run_eval
from finetune.lifecycle.folder import read_adapter
from finetune.lifecycle.modelcard import CardInput, card_for_publish, hub_id, write_card
from finetune.testing import qa_rows, write_jsonl

SYSTEM = "reply with a greeting"


def front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.fixture(scope="module")
def adapter(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory, train_tiny) -> Path:
    tmp = tmp_path_factory.mktemp("card")
    val = write_jsonl(tmp / "val.jsonl", qa_rows(4))
    return train_tiny(tmp, tiny_lm, qa_rows(16), "card", steps=4, data={"system_prompt": SYSTEM, "validation": str(val)})


def test_card_written_at_save_replaces_peft_template(adapter: Path) -> None:
    text = (adapter / "README.md").read_text()
    assert "More Information Needed" not in text and "Model Card for Model ID" not in text
    meta, body = front_matter(text)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"finetune", "lora", "peft"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder is no hub id; publish --base-model names it
    assert "model-index" not in meta and "Not evaluated yet" in body
    info = read_adapter(adapter)
    assert f"| data fingerprint | {info.run['data']['fingerprint']} |" in body
    assert "| LoRA rank r | 4 |" in body and "| training examples | 16 |" in body and "| training time |" in body
    assert "**Chat template on.**" in body and f"```text\n{SYSTEM}\n```" in body  # the prompt format it expects
    assert "PeftModel.from_pretrained" in body and "vllm serve" in body and "--enable-lora" in body
    assert f'"content": "{SYSTEM}"' in body  # the usage snippets send the recorded system prompt
    assert "name: alice" not in text  # example rows stay out of the card


def test_eval_refreshes_its_section_and_keeps_the_rest(adapter: Path, tmp_path: Path) -> None:
    folder = tmp_path / "card"
    shutil.copytree(adapter, folder)
    before = (folder / "README.md").read_text()
    meta, body = front_matter(before)
    meta["license"] = "mit"  # a user's own edits: a front matter key and a paragraph
    edited = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body + "\nMy own notes about this adapter.\n"
    (folder / "README.md").write_text(edited)

    report = run_eval(EvalOptions(str(folder))).report
    after = (folder / "README.md").read_text()
    meta_after, body_after = front_matter(after)
    assert "My own notes about this adapter." in body_after and meta_after["license"] == "mit"
    for section in ("summary", "prompt", "training", "usage"):  # untouched by eval
        assert _section(after, section) == _section(edited, section)
    # The card's metrics are eval.json's: the model-index and the table.
    indexed = {m["name"]: m["value"] for r in meta_after["model-index"][0]["results"] for m in r["metrics"]}
    scalars = {k: m for k, m in report["metrics"].items() if "delta" in m}
    assert indexed == {k: m["adapter"] for k, m in scalars.items()} == {
        k: m["adapter"] for k, m in json.loads((folder / "eval.json").read_text())["metrics"].items() if "delta" in m}
    assert "| exact_match |" in _section(after, "evaluation") and "Not evaluated yet" not in after
    assert "`eval.json`" in _section(after, "files")


def _section(text: str, name: str) -> str:
    return text.split(f"<!-- finetune:{name} -->")[1].split(f"<!-- /finetune:{name} -->")[0]


def test_a_readme_finetune_did_not_write_is_left_alone(adapter: Path, tmp_path: Path) -> None:
    folder = tmp_path / "theirs"
    shutil.copytree(adapter, folder)
    (folder / "README.md").write_text("# Our adapter\n\nWritten by hand.\n")
    assert write_card(read_adapter(folder)) is None
    assert (folder / "README.md").read_text() == "# Our adapter\n\nWritten by hand.\n"


def test_publish_uses_the_same_card_with_hub_ids(adapter: Path, tmp_path: Path) -> None:
    from finetune.lifecycle.publish import build_hub_folder

    folder = tmp_path / "pub"
    shutil.copytree(adapter, folder)
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nKept when published.\n")
    info = read_adapter(folder)
    card = CardInput("me/tiny", "org/tiny-base", "apache-2.0", ["org/qa"])
    build_hub_folder(info, tmp_path / "hub", card)
    published = (tmp_path / "hub" / "README.md").read_text()
    assert published == card_for_publish(info, card)
    meta, body = front_matter(published)
    assert (meta["base_model"], meta["license"], meta["datasets"]) == ("org/tiny-base", "apache-2.0", ["org/qa"])
    assert 'adapter = "me/tiny"' in body and 'base = "org/tiny-base"' in body and "Kept when published." in body
    assert "vllm serve org/tiny-base --enable-lora --lora-modules tiny=me/tiny" in body


@pytest.mark.parametrize(("ref", "want"), [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("gpt2", "gpt2"),
    ("/root/.cache/huggingface/hub/models--org--name/snapshots/abc123", "org/name"),
    ("/work/models/local-copy", None),
    ("./relative/folder", None),
    ("", None),
])
def test_hub_id_of_a_recorded_base(ref: str, want: str | None) -> None:
    assert hub_id(ref) == want
