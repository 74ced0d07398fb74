"""`finetune eval` on preference pairs: preference accuracy and margin for base and adapter, checked against the
log-probabilities computed independently, besides the generation metrics against the chosen answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.cli import main
from finetune.testing import preference_rows, write_jsonl


@pytest.fixture(scope="module")
def report(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory, write_job) -> tuple[dict[str, Any], Path, Path]:
    tmp = tmp_path_factory.mktemp("pref_eval")
    train = write_jsonl(tmp / "train.jsonl", preference_rows(16, chat=True))
    val = write_jsonl(tmp / "val.jsonl", preference_rows(8, chat=True)[::-1])
    job = write_job(tmp, tiny_lm, train, data={"validation": str(val)},
                    train={"objective": "orpo", "max_steps": 12, "learning_rate": 2e-2})
    assert main(["train", str(job)]) == 0
    adapter = tmp / "adapters" / "tiny"
    assert main(["eval", str(adapter), "--out", str(tmp / "out")]) == 0
    return json.loads((tmp / "out" / "eval.json").read_text()), adapter, val


def _independent_logps(model: Any, tok: Any, messages: list[dict[str, str]], answer: str) -> float:
    """Sum of log p(answer tokens) by plain next-token softmax over the chat template's rendering."""
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=True, return_dict=False)
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    return float(sum(logp[i - 1, full[i]] for i in range(len(prompt), len(full))))


def test_preference_accuracy_and_margin_for_base_and_adapter(report: tuple[dict[str, Any], Path, Path]) -> None:
    from finetune.lifecycle.folder import load_adapter

    data, adapter, val = report
    metrics = data["metrics"]
    for name in ("preference_accuracy", "preference_margin", "preference_accuracy_per_token", "exact_match", "loss"):
        assert {"base", "adapter", "delta"} <= set(metrics[name]), name
    assert data["data"]["format"] == "preference" and data["data"]["evaluated"] == 8
    assert metrics["preference_accuracy"]["adapter"] == 1.0 and metrics["preference_margin"]["delta"] > 0
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    model, tok, _ = load_adapter(adapter)
    for side in ("base", "adapter"):
        context = model.disable_adapter() if side == "base" else torch.no_grad()
        with context:
            margins = [_independent_logps(model, tok, r["prompt"], r["chosen"][0]["content"])
                       - _independent_logps(model, tok, r["prompt"], r["rejected"][0]["content"]) for r in rows]
        assert metrics["preference_margin"][side] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
        assert metrics["preference_accuracy"][side] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert [e["reference"] for e in data["examples"]] == [r["chosen"][0]["content"] for r in rows]


def test_an_sft_adapter_with_an_explicit_format_is_scored_on_pairs(tiny_lm: Path, tmp_path: Path, write_job) -> None:
    """The SFT stage before DPO (data.format: chat in its job) evaluated on preference pairs: read as pairs."""
    rows = [{"messages": p["prompt"] + p["chosen"]} for p in preference_rows(8, chat=True)]
    job = write_job(tmp_path, tiny_lm, write_jsonl(tmp_path / "sft.jsonl", rows), data={"format": "chat"},
                    train={"max_steps": 4})
    assert main(["train", str(job)]) == 0
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(4, chat=True))
    assert main(["eval", str(tmp_path / "adapters" / "tiny"), "--data", str(pairs), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["data"]["format"] == "preference" and "preference_accuracy" in report["metrics"]
