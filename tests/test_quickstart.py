"""The quickstart: its task data (deterministic, held-out split truly unseen), its config, and scripts/quickstart.sh
end to end on a tiny GGUF model (default run) and on the real SmolLM2 (marked slow)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.testing import load_script, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "quickstart"


def _load_generator():  # type: ignore[no-untyped-def]
    return load_script(ROOT / "scripts" / "make_task_data.py")


def _rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_shipped_data_is_what_the_seeded_generator_makes(tmp_path: Path) -> None:
    gen = _load_generator()
    assert gen.main(["--check"]) == 0
    assert gen.main(["--out", str(tmp_path)]) == 0  # a second generation is byte-identical
    assert (tmp_path / "train.jsonl").read_bytes() == (DATA / "train.jsonl").read_bytes()
    assert (tmp_path / "test.jsonl").read_bytes() == (DATA / "test.jsonl").read_bytes()


def test_rows_are_chat_with_the_json_answer_of_the_sentence() -> None:
    for row in _rows("train")[:50] + _rows("test")[:50]:
        system, user, assistant = row["messages"]
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        answer = json.loads(assistant["content"])
        assert list(answer) == ["name", "age", "city"] and isinstance(answer["age"], int)
        for value in (answer["name"], str(answer["age"]), answer["city"]):
            assert value in user["content"]


def test_test_split_shares_no_value_and_no_sentence_pattern_with_train() -> None:
    gen = _load_generator()
    train, test = _rows("train"), _rows("test")

    def values(rows: list[dict], key: str) -> set:
        return {json.loads(r["messages"][2]["content"])[key] for r in rows}

    for key in ("name", "age", "city"):
        assert not values(train, key) & values(test, key), key
    train_first = {n.split()[0] for n in values(train, "name")}
    train_last = {n.split()[1] for n in values(train, "name")}
    for name in values(test, "name"):
        first, last = name.split()
        assert first not in train_first and last not in train_last

    def pattern(row: dict) -> str:  # the sentence with its values blanked out
        answer = json.loads(row["messages"][2]["content"])
        text = row["messages"][1]["content"]
        for key in ("name", "city", "age"):
            text = text.replace(str(answer[key]), "{" + key + "}")
        return re.sub(r"\b\d+\b", "{n}", text)

    assert {pattern(r) for r in test} <= set(gen.TEST_TEMPLATES)
    assert not {pattern(r) for r in test} & {pattern(r) for r in train}
    assert len({pattern(r) for r in test}) == len(gen.TEST_TEMPLATES)


def test_quickstart_config_points_at_the_shipped_data() -> None:
    from finetune.config import load_config

    # The model folder exists only after the quickstart imported it (not on a fresh clone): files are checked
    # by the end-to-end test below; this one checks the job's fields.
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", check_files=False)
    assert (ROOT / cfg.data.train).is_file()
    assert cfg.data.train == "data/quickstart/train.jsonl" and cfg.data.format == "chat"
    assert cfg.train.precision == "auto" and cfg.output.run_name == "quickstart"
    hub = load_config(ROOT / "configs" / "quickstart.yaml", ["model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct"],
                      check_files=False)
    assert hub.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct" and hub.model.gguf_file is None


def _run_quickstart(env: dict[str, str], *overrides: str, timeout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh"), *overrides], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_quickstart_script_end_to_end_on_a_tiny_gguf(tiny_lm: Path, tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tiny_lm, tmp_path / "tiny.gguf")
    env = {"QUICKSTART_GGUF": str(gguf), "QUICKSTART_MODEL_DIR": str(tmp_path / "model"),
           "QUICKSTART_OUT": str(tmp_path / "adapters"), "QUICKSTART_EVAL_ARGS": "--max-samples 4"}
    tiny = ["data.max_seq_len=512", "train.max_steps=2", "train.micro_batch_size=2", "lora.r=4", "train.precision=fp32"]
    done = _run_quickstart(env, *tiny, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    adapter = tmp_path / "adapters" / "quickstart"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "model").resolve())  # the imported GGUF
    assert (adapter / "eval.md").is_file() and json.loads((adapter / "eval.json").read_text())
    out = done.stdout
    assert f"adapter: {adapter}" in out and f"report:  {adapter}/eval.md" in out
    assert f"finetune demo {adapter}" in out
    again = _run_quickstart(env, *tiny, timeout=300)  # a second run reuses the imported model
    assert again.returncode == 0 and f"already imported: {(tmp_path / 'model').resolve()}" in again.stdout


def test_quickstart_script_says_what_to_do_without_the_model(tmp_path: Path) -> None:
    done = _run_quickstart({"QUICKSTART_GGUF": str(tmp_path / "missing.gguf")}, timeout=60)
    assert done.returncode == 1 and "run 'bash scripts/setup.sh'" in done.stderr


@pytest.mark.slow
def test_real_quickstart_gains_60_points_on_held_out_sentences(tmp_path: Path) -> None:
    """The README's promise, measured: the real SmolLM2 + LoRA on 2 CPU cores, base vs adapter exact match."""
    done = _run_quickstart({"QUICKSTART_OUT": str(tmp_path / "adapters")}, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "adapters" / "quickstart" / "eval.json").read_text())
    base, tuned = _json_exact_match(report, "base"), _json_exact_match(report, "adapter")
    print(f"json exact match: base {base:.2%}, adapter {tuned:.2%}", file=sys.stderr)
    assert tuned - base >= 0.60


def _json_exact_match(report: dict, side: str) -> float:
    """eval.json's json_exact_match for `side` (base or adapter): metrics -> name -> {base, adapter, delta}."""
    return float(report["metrics"]["json_exact_match"][side])
