"""The demo shows what eval measured: the same rows rendered the demo's way (the user's text behind the System prompt
box as pre-filled from prompt.json) and decoded greedily by the demo engine give eval's outputs, on the tiny model
and (slow) on the real quickstart adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finetune.serving.demo.runs import prompt_for
from finetune.serving.engine import BASE, GenerationParams, load_engine
from finetune.testing import last

ROOT = Path(__file__).resolve().parents[1]
# The adapter scripts/quickstart.sh trains (another checkout's may be given, e.g. a shared one).
QUICKSTART = Path(os.environ.get("FINETUNE_QUICKSTART_ADAPTER", ROOT / "adapters" / "quickstart"))


def user_text(prompt: list[dict[str, str]]) -> str:
    """What a person types in the demo for an eval prompt: its last user message."""
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def test_demo_output_equals_eval_output(json_adapter: Path) -> None:
    report = json.loads((json_adapter / "eval.json").read_text())
    assert report["decoding"]["strategy"] == "greedy" and len(report["examples"]) == 8
    engine = load_engine([json_adapter])
    card = engine.card(json_adapter.name)
    params = GenerationParams(max_new_tokens=report["decoding"]["max_new_tokens"], temperature=0.0)
    for example in report["examples"]:
        prompt = prompt_for(card, None, user_text(example["prompt"]))
        assert prompt == example["prompt"]  # the same conversation eval generated from
        demo = {side: (last(engine.generate(name, prompt, params)) or "").strip()
                for side, name in (("adapter", card.name), ("base", BASE))}
        assert demo == {"adapter": example["adapter"], "base": example["base"]}


@pytest.mark.slow
@pytest.mark.timeout(3600)  # eval on both sides, then the demo engine: ~10 minutes on a busy 2-core CPU
def test_quickstart_demo_reaches_the_json_exact_match_of_eval(tmp_path: Path) -> None:
    """20 held-out rows of the real quickstart: eval's json_exact_match equals the demo engine's."""
    from finetune.evaluation.runner import EvalOptions, run_eval
    from finetune.metrics import load_metric

    if not (QUICKSTART / "adapter_config.json").is_file():
        pytest.skip(f"no quickstart adapter at {QUICKSTART}: run scripts/quickstart.sh (or set FINETUNE_QUICKSTART_ADAPTER)")
    rows = ROOT / "data" / "quickstart" / "test.jsonl"
    report = run_eval(EvalOptions(adapter=str(QUICKSTART), data=str(rows), max_samples=20, out=str(tmp_path))).report
    engine = load_engine([QUICKSTART])
    card = engine.card(QUICKSTART.name)
    params = GenerationParams(max_new_tokens=report["decoding"]["max_new_tokens"], temperature=0.0)
    examples = report["examples"]
    outputs = [(last(engine.generate(card.name, prompt_for(card, None, user_text(e["prompt"])), params)) or "").strip()
               for e in examples]
    metric = load_metric("json_exact_match")
    demo_score = metric.compute(predictions=outputs, references=[e["reference"] for e in examples])["json_exact_match"]
    eval_score = report["metrics"]["json_exact_match"]["adapter"]
    same_text = sum(o == e["adapter"] for o, e in zip(outputs, examples, strict=True))
    print(f"quickstart, {len(examples)} held-out rows: json_exact_match eval {eval_score:.2f}, demo engine "
          f"{demo_score:.2f}; identical answers {same_text}/{len(examples)}")
    (tmp_path / "demo_vs_eval.json").write_text(json.dumps({"eval": eval_score, "demo": demo_score,
                                                            "identical": same_text, "rows": len(examples)}))
    assert len(examples) == 20 and demo_score == eval_score
