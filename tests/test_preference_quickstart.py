"""The quickstart's preference stage: the shipped pairs are what the seeded generator makes (rule-made pairs
byte for byte, on-policy pairs real misses on fresh sentences), the held-out split stays unseen, and the pairs load
through the data stage as a valid preference set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.testing import load_script

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "quickstart"


def _generator():  # type: ignore[no-untyped-def]
    return load_script(ROOT / "scripts" / "make_preference_data.py")


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def test_shipped_pairs_are_what_the_generator_makes() -> None:
    assert _generator().main(["--check"]) == 0


def test_pairs_are_mostly_on_policy_and_never_touch_the_test_split() -> None:
    train, held_out = _rows("preference.jsonl"), _rows("preference_test.jsonl")
    sources = [r["source"] for r in train]
    assert sources.count("on-policy") > len(sources) / 2
    assert {s for s in sources if s != "on-policy"} == {f"rule:{k}" for k in _generator().RULES}
    test_sentences = {json.loads(line)["messages"][1]["content"] for line in (DATA / "test.jsonl").read_text().splitlines()}
    assert not {r["prompt"][1]["content"] for r in train} & test_sentences
    assert {r["prompt"][1]["content"] for r in held_out} == test_sentences and len(held_out) == 100


def test_held_out_misses_are_real_misses_on_the_test_split() -> None:
    gen = _generator()
    answers = {i["sentence"]: i["answer"] for i in gen.test_sentences()}
    misses = _rows("preference_test_misses.jsonl")
    assert misses and all(r["source"] == "on-policy:greedy" for r in misses)
    for row in misses:
        answer = answers[row["prompt"][1]["content"]]
        assert row["chosen"][0]["content"] == gen.render(answer) and gen.is_miss(row["rejected"][0]["content"], answer)


def test_pairs_load_as_preference_data(tiny_lm: Path) -> None:
    from transformers import AutoTokenizer

    from finetune.config.data import DataConfig
    from finetune.data import build_data

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    for name in ("preference.jsonl", "preference_test.jsonl", "preference_test_misses.jsonl"):
        # 512: the tiny test tokenizer splits text into more tokens than SmolLM2's (the configs' 256 fits those)
        bundle = build_data(DataConfig(train=str(DATA / name), max_seq_len=512, cache=False), tok)
        assert bundle.format == "preference" and bundle.stats["bad_rows"] == 0
        assert len(bundle.train) == len(_rows(name)) and bundle.stats["truncated"] == 0


@pytest.mark.parametrize("name", ["quickstart-dpo.yaml", "quickstart-orpo.yaml"])
def test_shipped_preference_configs(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.config import load_config

    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / name, check_files=False)
    assert cfg.data.train == "data/quickstart/preference.jsonl" and cfg.train.objective in ("dpo", "orpo")
    assert (cfg.model.adapter == "adapters/quickstart") == (cfg.train.objective == "dpo")
