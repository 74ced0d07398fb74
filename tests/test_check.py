"""`finetune check`: the loading rules of each target, table-driven on small synthetic adapters, plus a real one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from finetune.config import load_config
from finetune.lifecycle.targets import RULES, TARGETS, check_adapter
from finetune.testing import qa_rows, write_jsonl

MODULES = ("self_attn.q_proj", "self_attn.v_proj")
GOOD_CONFIG: dict[str, Any] = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
    "base_model_name_or_path": "org/base", "bias": "none", "use_dora": False, "use_rslora": False,
    "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
}


def lora_tensors(r: int = 8, modules: tuple[str, ...] = MODULES, layers: int = 2) -> dict[str, np.ndarray]:
    out = {}
    for layer in range(layers):
        for m in modules:
            key = f"base_model.model.model.layers.{layer}.{m}"
            out[f"{key}.lora_A.weight"] = np.zeros((r, 32), np.float32)
            out[f"{key}.lora_B.weight"] = np.ones((32, r), np.float32)
    return out


def make_adapter(folder: Path, config: dict[str, Any] | None = None, tensors: dict[str, np.ndarray] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({**GOOD_CONFIG, **(config or {})}))
    save_file(tensors if tensors is not None else lora_tensors(), str(folder / "adapter_model.safetensors"))
    return folder


def _drop_b(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in t.items() if not k.endswith("layers.1.self_attn.v_proj.lora_B.weight")}


# (case, config changes, tensors or None, {target: expected rule ids}); a target not listed must pass.
CASES: list[tuple[str, dict[str, Any], dict[str, np.ndarray] | None, dict[str, set[str]]]] = [
    ("good", {}, None, {}),
    ("no lora_alpha", {"lora_alpha": None}, None, {t: {"required-keys"} for t in TARGETS}),
    ("no target_modules", {"target_modules": None}, None, {"peft": {"required-keys"}, "vllm": {"required-keys"}, "sglang": {"required-keys"},
                                                     "tgi": {"required-keys"}}),
    ("rank 32", {"r": 32}, lora_tensors(32), {"vllm": {"rank-limit"}}),
    ("rank 256", {"r": 256}, lora_tensors(256), {"vllm": {"rank-limit"}, "tgi": {"rank-limit"}}),
    ("modules_to_save", {"modules_to_save": ["lm_head"]},
     {**lora_tensors(), "base_model.model.lm_head.modules_to_save.default.weight": np.zeros((4, 4), np.float32)},
     {"vllm": {"modules-to-save", "embeddings"}, "sglang": {"modules-to-save", "embeddings"},
      "tgi": {"modules-to-save", "embeddings"}, "llama.cpp": {"modules-to-save", "embeddings"}}),
    ("dora", {"use_dora": True},
     {**lora_tensors(), "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.ones(32, np.float32)},
     {"vllm": {"dora"}, "sglang": {"dora"}, "tgi": {"dora"}, "llama.cpp": {"dora"}}),
    ("full embeddings", {},
     {**lora_tensors(), "base_model.model.model.embed_tokens.weight": np.zeros((8, 4), np.float32)},
     {"vllm": {"embeddings", "modules-to-save"}, "sglang": {"embeddings", "modules-to-save"},
      "tgi": {"embeddings", "modules-to-save"}, "llama.cpp": {"embeddings", "modules-to-save"}}),
    ("rslora", {"use_rslora": True}, None, {t: {"single-scale"} for t in ("sglang", "tgi", "llama.cpp")}),
    ("alpha_pattern", {"alpha_pattern": {"q_proj": 4}}, None, {t: {"single-scale"} for t in ("sglang", "tgi", "llama.cpp")}),
    ("classifier", {"task_type": "SEQ_CLS"}, None, {t: {"task"} for t in ("vllm", "sglang", "tgi", "llama.cpp")}),
    ("bias", {"bias": "lora_only"}, None, {t: {"bias"} for t in ("vllm", "sglang", "tgi", "llama.cpp")}),
    ("missing B", {}, _drop_b(lora_tensors()), {t: {"lora-pairs"} for t in TARGETS}),
    ("rank mismatch", {"r": 4}, None, {t: {"lora-pairs"} for t in TARGETS}),
    ("odd module for tgi", {"target_modules": ["q_proj", "fc_in"]}, lora_tensors(modules=("self_attn.q_proj", "mlp.fc_in")),
     {"tgi": {"tgi-modules"}, "sglang": {"sglang-modules"}}),
    ("regex target_modules", {"target_modules": ".*_proj"}, None, {"sglang": {"sglang-modules"}}),
    ("local base gone", {"base_model_name_or_path": "/nonexistent/base"}, None, {"peft": {"base-model"}, "llama.cpp": {"base-model"}}),
    ("not lora", {"peft_type": "IA3"}, None, {t: {"lora-only"} for t in TARGETS}),
    ("nan weights", {}, {**lora_tensors(), "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
                         np.full((32, 8), np.nan, np.float32)}, {t: {"weights-file"} for t in TARGETS}),
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("case", "config", "tensors", "expected"), CASES, ids=[c[0] for c in CASES])
def test_rules_table(tmp_path: Path, case: str, config: dict, tensors: Any, expected: dict, target: str) -> None:
    folder = make_adapter(tmp_path / "a", config, tensors)
    result = check_adapter(folder, target)
    assert {p.rule for p in result.problems} == expected.get(target, set())
    assert result.ok == (not expected.get(target))
    assert all(p.fix for p in result.problems)


def test_vllm_rank_limit_follows_max_lora_rank(tmp_path: Path) -> None:
    folder = make_adapter(tmp_path / "a", {"r": 32}, lora_tensors(32))
    assert not check_adapter(folder, "vllm", max_lora_rank=16).ok
    assert check_adapter(folder, "vllm", max_lora_rank=32).ok


def test_every_rule_is_exercised_by_the_table() -> None:
    fired = {rule for _, _, _, expected in CASES for rules in expected.values() for rule in rules}
    assert fired >= {r.id for r in RULES} - {"tensor-names"}  # tensor-names: covered below


def test_odd_tensor_name(tmp_path: Path) -> None:
    tensors = {k.replace("base_model.model.", "") if "layers.0.self_attn.q_proj" in k else k: v for k, v in lora_tensors().items()}
    result = check_adapter(make_adapter(tmp_path / "a", {}, tensors), "vllm")
    assert "tensor-names" in {p.rule for p in result.problems}


@pytest.fixture(scope="module")
def real_adapter(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory, write_job) -> Path:
    from finetune.pipeline import run_train

    tmp = tmp_path_factory.mktemp("check_run")
    job = write_job(tmp, tiny_lm, write_jsonl(tmp / "train.jsonl", qa_rows(8)), train={"max_steps": 2})
    return run_train(load_config(job))


@pytest.mark.parametrize("target", TARGETS)
def test_cli_passes_a_real_adapter(real_adapter: Path, target: str, capsys) -> None:
    from finetune.cli import main

    assert main(["check", str(real_adapter), "--target", target]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{target}: ok")


def test_tgi_is_labelled_legacy(real_adapter: Path, capsys) -> None:
    from finetune.cli import main

    assert main(["check", str(real_adapter), "--target", "tgi"]) == 0
    assert "maintenance mode since December 2025" in capsys.readouterr().out
    assert main(["check", str(real_adapter), "--target", "sglang"]) == 0
    assert "maintenance" not in capsys.readouterr().out


def test_cli_prints_one_line_per_problem_and_fails(tmp_path: Path, capsys) -> None:
    from finetune.cli import main

    folder = make_adapter(tmp_path / "a", {"r": 64, "use_dora": True}, lora_tensors(64))
    assert main(["check", str(folder), "--target", "vllm"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("]")[0] for line in lines[:-1]] == ["[rank-limit", "[dora"]
    assert all("-> fix:" in line for line in lines[:-1]) and lines[-1].startswith("vllm: 2 problems")


@pytest.mark.parametrize("target", TARGETS)
def test_truncated_weights_fail_every_target(tmp_path: Path, target: str) -> None:
    """The header of a cut-short file is intact: only reading the tensors' byte ranges shows the damage."""
    folder = make_adapter(tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    result = check_adapter(folder, target)
    assert [p.rule for p in result.problems] == ["weights-file"]
    assert "truncated" in result.problems[0].message
