"""`finetune merge`: float32 merge, sharded save, verification that catches a bad merge, QLoRA into the de-quantized base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import load_config
from finetune.errors import FinetuneError, VerificationError
from finetune.testing import make_causal_lm, qa_rows, write_jsonl


@pytest.fixture(scope="module")
def adapter(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory, train_tiny) -> Path:
    """A real adapter from the pipeline; lr high enough that it visibly moves the logits."""
    return train_tiny(tmp_path_factory.mktemp("merge_run"), tiny_lm, qa_rows(16), "tiny", steps=6, train={"learning_rate": 3e-2})


@pytest.fixture(scope="module")
def merged_fp32(adapter: Path, tmp_path_factory: pytest.TempPathFactory):
    from finetune.lifecycle.merge import merge_adapter

    out = tmp_path_factory.mktemp("merged") / "fp32"
    return out, merge_adapter(adapter, out, dtype="fp32", max_shard_size="100KB")


def test_fp32_merge_reproduces_base_plus_adapter(merged_fp32) -> None:
    out, report = merged_fp32
    assert report.max_logit_diff <= report.tolerance <= 1e-3 and report.merge_diff <= report.tolerance
    assert report.max_logit_diff < report.adapter_effect / 100  # the check is meaningful: the adapter moves logits
    assert report.greedy_identical == report.prompts >= 4  # 3 default prompts + in-domain ones from the data
    recorded = json.loads((out / "merge.json").read_text())["verification"]
    assert recorded["max_logit_diff"] == report.max_logit_diff


def test_merged_folder_is_a_complete_sharded_checkpoint(merged_fp32, adapter: Path) -> None:
    out, report = merged_fp32
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "model.safetensors.index.json"} <= names
    assert len(report.shards) > 1 and all(s in names for s in report.shards)  # 100KB shards of a ~190KB model
    assert (out / "chat_template.jinja").read_text() == (adapter / "chat_template.jinja").read_text()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_merged_weight_equals_w_plus_scaled_ba(merged_fp32, adapter: Path, tiny_lm: Path) -> None:
    """Independent of peft: W_merged = W + (alpha/r) * B @ A for a wrapped layer; unwrapped layers unchanged."""
    out, _ = merged_fp32
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    merged = {k: v for shard in set(index.values()) for k, v in load_file(str(out / shard)).items()}
    base = load_file(str(tiny_lm / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    name = "model.layers.1.self_attn.q_proj"
    a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
    want = base[f"{name}.weight"] + cfg["lora_alpha"] / cfg["r"] * b @ a
    assert torch.allclose(merged[f"{name}.weight"], want, atol=1e-6)
    assert not torch.equal(merged[f"{name}.weight"], base[f"{name}.weight"])
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])


def test_corrupted_merge_is_caught_and_nothing_is_left(adapter: Path, tmp_path: Path, monkeypatch) -> None:
    """The 'merged twice' bug: every update applied two times. Verification must refuse it and leave no output."""
    from finetune.lifecycle import merge

    def merge_twice(model):
        for module in model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module.base_layer.weight.data += module.get_delta_weight("default")
        return model.merge_and_unload()

    monkeypatch.setattr(merge, "_merge", merge_twice)
    out = tmp_path / "bad"
    with pytest.raises(VerificationError, match="float32 merge does not reproduce base \\+ adapter"):
        merge.merge_adapter(adapter, out, dtype="bf16")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_corrupted_checkpoint_on_disk_is_caught(adapter: Path, tmp_path: Path, monkeypatch) -> None:
    """A save that damages the written weights (here: one layer's weight scaled) fails the reload check."""
    from safetensors.torch import save_file

    from finetune.lifecycle import merge

    original_save = merge._save

    def save_then_damage(merged, tok, folder, max_shard_size):
        shards = original_save(merged, tok, folder, max_shard_size)
        tensors = load_file(str(folder / "model.safetensors"))
        tensors["model.layers.0.mlp.down_proj.weight"] *= 1.5
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return shards

    monkeypatch.setattr(merge, "_save", save_then_damage)
    with pytest.raises(VerificationError, match="reloaded from disk does not match"):
        merge.merge_adapter(adapter, tmp_path / "bad", dtype="fp32")
    assert list(tmp_path.iterdir()) == []


def test_bf16_merge_via_cli(adapter: Path, tmp_path: Path, capsys) -> None:
    from finetune.cli import main

    assert main(["merge", str(adapter), "--out", str(tmp_path / "m"), "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "saved as bf16" in printed and "greedy outputs identical" in printed
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    check = json.loads((tmp_path / "m" / "merge.json").read_text())["verification"]
    assert 0 < check["max_logit_diff"] <= check["tolerance"]  # bf16 rounding shows, within its measured tolerance
    assert check["merge_diff"] < 1e-4 < check["max_logit_diff"]  # the float32 merge itself was exact


def test_refuses_existing_output(adapter: Path, tmp_path: Path) -> None:
    from finetune.lifecycle.merge import merge_adapter

    (tmp_path / "taken").mkdir()
    with pytest.raises(FinetuneError, match="exists"):
        merge_adapter(adapter, tmp_path / "taken")


def test_greedy_divergence_only_forgiven_at_a_near_tie() -> None:
    from finetune.lifecycle.merge import _compare_greedy

    assert _compare_greedy([1, 2, 3], [1, 2, 3], [5.0, 5.0, 5.0], 1e-4) == "same"
    assert _compare_greedy([1, 2, 3], [1, 9, 3], [5.0, 1e-5, 5.0], 1e-4) == "tie"
    assert _compare_greedy([1, 2, 3], [1, 9, 3], [5.0, 0.5, 5.0], 1e-4) == "different"


def test_qlora_adapter_merges_into_the_dequantized_base(tmp_path: Path, train_tiny) -> None:
    """Merged weight = dequant(nf4(W)) + delta: the weights the adapter was trained against, not the fp32 originals."""
    pytest.importorskip("bitsandbytes")
    from finetune.lifecycle.merge import merge_adapter

    base = make_causal_lm(tmp_path / "base64", hidden=64)  # bnb's CPU 4-bit kernels need rows of >= 64 values
    adapter = train_tiny(tmp_path, base, qa_rows(16), "tiny", steps=3, lora={"quantization": "4bit"})
    report = merge_adapter(adapter, tmp_path / "merged", dtype="fp32")
    assert report.quantized_base and report.max_logit_diff <= report.tolerance and report.greedy_identical == report.prompts
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    delta = 2.0 * lora[f"base_model.model.{name}.lora_B.weight"] @ lora[f"base_model.model.{name}.lora_A.weight"]
    on_original = original[f"{name}.weight"] + delta
    assert (merged[f"{name}.weight"] - on_original).abs().max() > 1e-3  # not into the original fp32 weights ...
    dequantized = _dequantized_weight(base, name)
    assert torch.allclose(merged[f"{name}.weight"], dequantized + delta, atol=1e-5)  # ... but into dequant(nf4(W))
    assert not any(k.endswith((".absmax", ".quant_map")) or "quant_state" in k for k in merged)  # ... nor stay 4-bit
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config


def _dequantized_weight(base: Path, name: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from finetune.model.loading import _bnb_config

    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=_bnb_config("4bit"), dtype=torch.float32)
    return model.dequantize().get_submodule(name).weight.detach().float()


def test_classifier_adapter_merges_with_its_trained_head(tiny_encoder: Path, tmp_path: Path, write_job) -> None:
    """SEQ_CLS: the classifier head trained in full (modules_to_save) must survive the merge."""
    from finetune.lifecycle.merge import merge_adapter
    from finetune.pipeline import run_train

    rows = [{"text": f"{w} is {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
            for i, w in enumerate(["alice", "bob", "carol", "dave"] * 4)]
    train = write_jsonl(tmp_path / "cls.jsonl", rows)
    job = write_job(tmp_path, tiny_encoder, train, train={"max_steps": 3})
    job.write_text("task: classification\n" + job.read_text())
    adapter = run_train(load_config(job))
    report = merge_adapter(adapter, tmp_path / "merged", dtype="fp32", prompts=["alice is good", "bob is bad"])
    assert report.max_logit_diff <= report.tolerance and report.greedy_identical == 2
    assert "predicted classes identical 2/2" in report.describe()
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}
