"""GGUF import: a tiny Llama written as GGUF (as llama.cpp's converter would) comes back as an HF folder with the same
logits, the same tokenizer ids and its chat template; the import is cached by file identity and atomic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finetune.config.model import ModelConfig
from finetune.errors import ModelError
from finetune.testing import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tiny_lm, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _logits(folder: Path, ids: list[int]):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_import_matches_the_original_model_and_tokenizer(tiny_lm: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from finetune.model.gguf_import import STAMP, import_gguf

    out = import_gguf(tiny_gguf, tmp_path / "hf", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    original, imported = AutoTokenizer.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Extract the name and age as JSON: Alice is 31 years old."}]
    ids = original.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert imported.chat_template == original.chat_template
    assert imported.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == ids
    assert imported.eos_token == original.eos_token
    assert (_logits(out, ids) - _logits(tiny_lm, ids)).abs().max().item() < 1e-4
    assert json.loads((out / STAMP).read_text())["file"] == str(tiny_gguf.resolve())


def test_model_gguf_file_converts_once_then_reuses_the_cache(tiny_gguf: Path, cache: Path) -> None:
    from finetune.model import resolve_source

    cfg = ModelConfig(name_or_path=str(tiny_gguf.parent), gguf_file=tiny_gguf.name)  # a name inside the folder
    first = resolve_source(cfg)
    assert Path(first.folder).parent == cache / "gguf" and first.ref == first.folder
    weights = Path(first.folder) / "model.safetensors"
    written = weights.stat().st_mtime_ns
    again = resolve_source(cfg.model_copy(update={"name_or_path": "ignored", "gguf_file": str(tiny_gguf)}))
    assert again == first and weights.stat().st_mtime_ns == written  # not converted a second time
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]  # no temporary folder left behind


def test_a_changed_gguf_file_gets_a_new_cache_entry(tiny_gguf: Path, cache: Path, tmp_path: Path) -> None:
    import shutil

    from finetune.model import resolve_source

    copy = Path(shutil.copy2(tiny_gguf, tmp_path / "tiny.gguf"))
    first = resolve_source(ModelConfig(name_or_path=".", gguf_file=str(copy)))
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))  # "edited" a second later
    second = resolve_source(ModelConfig(name_or_path=".", gguf_file=str(copy)))
    assert second.folder != first.folder and Path(second.folder).is_dir()


def test_import_refuses_to_overwrite_a_foreign_folder(tiny_gguf: Path, tmp_path: Path) -> None:
    from finetune.model.gguf_import import import_gguf

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    with pytest.raises(ModelError, match="already exists"):
        import_gguf(tiny_gguf, taken)
    assert (taken / "mine.txt").read_text() == "keep me"


def test_missing_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    from finetune.model import resolve_source

    with pytest.raises(ModelError, match=r"model.gguf_file: 'nope.gguf' is neither a file"):
        resolve_source(ModelConfig(name_or_path=str(tmp_path), gguf_file="nope.gguf"))


def test_cli_import_gguf_is_cached(tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.cli import main

    out = tmp_path / "model"
    assert main(["import-gguf", str(tiny_gguf), str(out)]) == 0
    assert "imported" in capsys.readouterr().out
    assert main(["import-gguf", str(tiny_gguf), str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"already imported: {out.resolve()}"
    assert main(["import-gguf", str(tmp_path / "missing.gguf"), str(out)]) == 1
    assert "GGUF file not found" in capsys.readouterr().err
