"""Behaviours of issue "Reliability and security" that are not a bad input: adapters usable from any directory (one
base rule, absolute paths recorded), the fit check's one line per module, classification runs counting examples
and explaining their new head, secret redaction, and LoRA wrapping errors that name the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from finetune.errors import ModelError
from finetune.testing import class_rows, qa_rows, write_jsonl


def test_an_adapter_trained_with_relative_paths_works_from_any_directory(tiny_lm: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.cli import main

    project = tmp_path / "project"
    shutil.copytree(tiny_lm, project / "models" / "tiny")
    write_jsonl(project / "data" / "train.jsonl", qa_rows(8))
    (project / "job.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": "models/tiny"}, "data": {"train": "data/train.jsonl", "validation": "data/train.jsonl",
                                                        "max_seq_len": 64, "cache": False},
        "lora": {"r": 4, "alpha": 8}, "train": {"max_steps": 2, "precision": "fp32"},
        "output": {"dir": "adapters", "run_name": "rel"}}))
    monkeypatch.chdir(project)
    assert main(["train", "job.yaml"]) == 0
    adapter = project / "adapters" / "rel"
    saved = yaml.safe_load((adapter / "finetune.yaml").read_text())
    assert saved["model"]["name_or_path"] == str(project / "models" / "tiny")
    assert saved["data"]["train"] == str(project / "data" / "train.jsonl")
    assert saved["output"]["dir"] == str(project / "adapters")
    assert json.loads((adapter / "run.json").read_text())["base_model"] == str(project / "models" / "tiny")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(adapter), "--max-samples", "2", "--out", "ev"]) == 0  # the job's own validation data
    assert main(["merge", str(adapter), "--out", "merged", "--dtype", "fp32"]) == 0
    assert main(["export", str(adapter), "--format", "gguf", "--out", "a.gguf"]) == 0


def test_the_base_comes_from_adapter_config_and_a_missing_one_suggests_base(tiny_lm: Path, tmp_path: Path,
                                                                             train_tiny) -> None:  # type: ignore[no-untyped-def]
    from finetune.lifecycle.folder import base_source, read_adapter

    adapter = train_tiny(tmp_path, tiny_lm, qa_rows(8), "b", steps=1)
    copy = tmp_path / "base-copy"
    shutil.copytree(tiny_lm, copy)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(copy)}))
    assert base_source(read_adapter(adapter))[0].folder == str(copy)  # the field `finetune check` tells users to edit
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/base"}))
    with pytest.raises(ModelError, match="Pass --base") as err:
        base_source(read_adapter(adapter))
    assert "/gone/base" in str(err.value)
    assert base_source(read_adapter(adapter), str(tiny_lm))[0].folder == str(tiny_lm)


def test_fit_check_names_each_module_once(tiny_lm: Path, tiny_encoder: Path, tmp_path: Path, train_tiny) -> None:  # type: ignore[no-untyped-def]
    from finetune.lifecycle.fit import check_adapter_fits
    from finetune.lifecycle.folder import base_source, read_adapter

    info = read_adapter(train_tiny(tmp_path, tiny_lm, qa_rows(8), "fit", steps=1))
    source, model_cfg = base_source(info, str(tiny_encoder))
    with pytest.raises(ModelError) as err:
        check_adapter_fits(info, source, model_cfg)
    lines = [line.strip() for line in str(err.value).splitlines() if "proj" in line]
    modules = [line.split(":")[0] for line in lines]
    assert len(modules) == len(set(modules)) == 6  # none twice (once for lora_A, once for lora_B)
    # model_type, architectures and the 14 adapted modules: 16 problems, 8 shown (it was 30: each module twice)
    assert "... and 8 more" in str(err.value)


def test_classification_counts_examples_and_explains_its_head(tiny_encoder: Path, tmp_path: Path, train_tiny,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    adapter = train_tiny(tmp_path, tiny_encoder, class_rows(8), "cls", "classification", steps=2,
                         train={"micro_batch_size": 4})
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "classification head: classifier is new (2 labels: neg, pos)" in text
    assert "trained in full next to the LoRA matrices and saved inside the adapter (66 parameters)" in text
    assert "MISSING" not in text and "LOAD REPORT" not in text
    assert "8 examples" in text and "target tokens" not in text
    metrics = json.loads((adapter / "run.json").read_text())["metrics"]
    assert metrics["examples"] == 8 and "tokens" not in metrics
    rows = [json.loads(x) for x in (adapter / "metrics.jsonl").read_text().splitlines()]
    assert "examples_per_s" in rows[0] and "targets_per_s" not in rows[0] and "tokens" not in rows[0]
    assert rows[0]["tokens_per_s"] > 0  # the input tokens the encoder read, for either kind of run


@pytest.mark.parametrize(("text", "hidden", "kept"), [
    ("system_prompt: log in with hf_abcdefghijklmnopqrstuvwxyz012345 please", "hf_abcdefghij", "system_prompt: log in"),
    ("note: key sk-proj-abcdefghijklmnopqrstuvwxyz", "sk-proj-abcdef", "note: key"),
    ("hub_token: abc123", "abc123", "hub_token:"),
    ('"api_key": "zzz-secret",', "zzz-secret", '"api_key": "***",'),
    ("url: https://bob:hunter2@example.com/x", "hunter2", "https://bob:***@example.com/x"),
    ("Authorization: Bearer abcdefghijklmnop", "abcdefghijklmnop", "Bearer ***"),
    ("token: ghp_abcdefghijklmnopqrstuvwxyz0123456789", "ghp_abcdef", "token:"),
])
def test_redact_hides_token_shaped_values_in_any_field(text: str, hidden: str, kept: str) -> None:
    from finetune.config.redact import find_secret, redact

    assert hidden not in redact(text) and kept in redact(text)
    assert find_secret(text) is None or hidden not in str(find_secret(text))


def test_redact_keeps_ordinary_values() -> None:
    from finetune.config.redact import redact

    text = ("max_new_tokens: 12\ntokenizer: x\ntoken: null\ntrained_tokens: 40\n"
            "git_commit: 0123456789abcdef0123456789abcdef01234567\nname_or_path: HuggingFaceTB/SmolLM2-135M\n")
    assert redact(text) == text


def test_target_modules_that_match_nothing_list_the_layers(tiny_lm: Path) -> None:
    from finetune.config.lora import LoraConfig
    from finetune.config.model import ModelConfig
    from finetune.model import load_model, wrap_lora

    base, _, _ = load_model(ModelConfig(name_or_path=str(tiny_lm)))
    with pytest.raises(ModelError, match=r"names no module of this model\. Its linear layers are called: .*q_proj"):
        wrap_lora(base, LoraConfig(target_modules=["qkv"]))


def test_a_rank_that_cannot_be_allocated_says_so(tiny_lm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import peft

    from finetune.config.lora import LoraConfig
    from finetune.config.model import ModelConfig
    from finetune.model import load_model, wrap_lora

    def no_memory(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(peft, "get_peft_model", no_memory)
    base, _, _ = load_model(ModelConfig(name_or_path=str(tiny_lm)))
    with pytest.raises(ModelError, match=r"lora.r=4096: the LoRA matrices need [\d,]+ parameters .* lower lora.r"):
        wrap_lora(base, LoraConfig(r=4096))
