"""`finetune publish`: the exact Hub folder (dry run reloads with peft), and a real upload to a local fake Hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from finetune.config import load_config
from finetune.testing import qa_rows, write_jsonl
from tests.hub_server import FakeHub

TOKEN = "hf_" + "Zq3" * 12  # shaped like a real token, so the secret scan would notice it anywhere
EXPECTED = {"README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "finetune.yaml",
            "metrics.jsonl", "prompt.json", "run.json", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def trained(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory, write_job) -> Path:
    from finetune.pipeline import run_train

    tmp = tmp_path_factory.mktemp("publish_run")
    job = write_job(tmp, tiny_lm, write_jsonl(tmp / "train.jsonl", qa_rows(8)), train={"max_steps": 3})
    return run_train(load_config(job))


@pytest.fixture
def adapter(trained: Path, tmp_path: Path) -> Path:
    """A copy with the clutter a real run leaves around: checkpoints, optimizer state, an eval result, a GGUF."""
    folder = tmp_path / "adapters" / "tiny"
    shutil.copytree(trained, folder)
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"\0" * 64)
    (folder / "tiny-lora-f32.gguf").write_bytes(b"GGUF")
    (folder / "eval.json").write_text(json.dumps({"metrics": {  # the shape `finetune eval` writes
        "accuracy": {"base": 0.25, "adapter": 0.875, "delta": 0.625, "better": "higher"},
        "examples": [{"prompt": "private user data"}]}}))
    return folder


@pytest.fixture
def no_login(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no saved login either
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, no_login: None):
    server = FakeHub(TOKEN).start()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # conftest sets offline mode for everything else
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


def test_dry_run_writes_the_exact_folder_and_it_reloads_with_peft(adapter: Path, tiny_lm: Path, tmp_path: Path, no_login, capsys) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.cli import main
    from finetune.lifecycle.folder import load_adapter

    out = tmp_path / "hub"
    args = ["publish", str(adapter), "--repo-id", "me/tiny-lora", "--dry-run", "--out", str(out),
            "--base-model", "org/tiny-base", "--dataset", "org/qa"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == EXPECTED
    assert "would upload 10 files" in printed and "checkpoint-2/" in printed and "tiny-lora-f32.gguf" in printed
    assert "eval.json" in printed.split("left out")[1]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-base"

    want, tok, _ = load_adapter(adapter)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_lm), dtype=torch.float32), str(out))
    x = torch.tensor([tok("name: alice")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=x).logits, want(input_ids=x).logits)


def test_model_card_metadata_and_content(adapter: Path, tmp_path: Path, no_login) -> None:
    from finetune.lifecycle.publish import PublishRequest, publish

    out = tmp_path / "hub"
    publish(PublishRequest(adapter, "me/tiny-lora", dry_run=True, out=out, base_model="org/tiny-base", datasets=["org/qa"]))
    text = (out / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    index = meta.pop("model-index")
    assert meta == {"base_model": "org/tiny-base", "library_name": "peft", "pipeline_tag": "text-generation",
                    "license": "apache-2.0", "tags": ["finetune", "lora", "peft", "transformers"], "datasets": ["org/qa"]}
    assert index[0]["results"][0]["metrics"] == [{"name": "accuracy", "type": "accuracy", "value": 0.875}]
    assert "| accuracy | 0.25 | 0.875 | 0.625 |" in body and "| LoRA rank r | 4 |" in body and "| train_loss |" in body
    assert "private user data" not in text  # eval examples stay home; only the numbers go in the card
    assert 'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)' in body
    assert 'base = "org/tiny-base"' in body and 'adapter = "me/tiny-lora"' in body and "apply_chat_template" in body


def test_publish_uploads_to_the_hub_without_leaking_the_token(adapter: Path, hub: FakeHub, monkeypatch, tmp_path: Path, capsys) -> None:
    from finetune.cli import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    built = tmp_path / "sent"
    args = ["publish", str(adapter), "--repo-id", "me/tiny-lora", "--private", "--base-model", "org/tiny-base", "--out", str(built)]
    assert main(args) == 0
    captured = capsys.readouterr()
    repo = hub.repos["me/tiny-lora"]
    assert repo["private"] is True
    assert set(repo["files"]) == EXPECTED
    assert all(repo["files"][name] == (built / name).read_bytes() for name in EXPECTED)  # exactly the folder built
    assert f"uploaded to {hub.url}/me/tiny-lora" in captured.out
    paths = [path.split("?")[0] for _, path, _ in hub.requests]
    assert paths == ["/api/repos/create", "/api/validate-yaml", "/api/models/me/tiny-lora/preupload/main",
                     "/api/models/me/tiny-lora/commit/main"]
    assert all(headers.get("authorization") == f"Bearer {TOKEN}" for _, _, headers in hub.requests)
    assert TOKEN not in captured.out + captured.err
    assert not any(TOKEN.encode() in data for data in repo["files"].values())


def test_wrong_token_fails_cleanly_and_never_echoes_it(adapter: Path, hub: FakeHub, monkeypatch, capsys) -> None:
    from finetune.cli import main

    wrong = "hf_" + "Wr0ng" * 8
    monkeypatch.setenv("HF_TOKEN", wrong)
    assert main(["publish", str(adapter), "--repo-id", "me/x", "--base-model", "org/b"]) == 1
    err = capsys.readouterr().err
    assert "publishing to me/x failed" in err and wrong not in err
    assert hub.repos == {}


def test_refusals_before_any_network(adapter: Path, no_login, monkeypatch) -> None:
    from finetune.errors import FinetuneError
    from finetune.lifecycle.publish import PublishRequest, publish

    with pytest.raises(FinetuneError, match="USER/NAME"):
        publish(PublishRequest(adapter, "not a repo id", dry_run=True))
    with pytest.raises(FinetuneError, match="--base-model"):  # the recorded base is a local folder
        publish(PublishRequest(adapter, "me/x"))
    with pytest.raises(FinetuneError, match="no Hugging Face token"):
        publish(PublishRequest(adapter, "me/x", base_model="org/b"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(FinetuneError, match="HF_HUB_OFFLINE"):
        publish(PublishRequest(adapter, "me/x", base_model="org/b"))


def test_a_token_inside_the_adapter_folder_blocks_the_upload(adapter: Path, tmp_path: Path, no_login) -> None:
    from finetune.errors import FinetuneError
    from finetune.lifecycle.publish import PublishRequest, publish

    run = json.loads((adapter / "run.json").read_text())
    (adapter / "run.json").write_text(json.dumps({**run, "note": f"token={'hf_' + 'L3ak' * 9}"}))
    with pytest.raises(FinetuneError, match="run.json contains a value shaped like a credential"):
        publish(PublishRequest(adapter, "me/x", dry_run=True, out=tmp_path / "hub"))
    assert not (tmp_path / "hub").exists()  # a refused publish leaves nothing staged
