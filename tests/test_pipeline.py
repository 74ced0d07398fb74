"""The core path on a tiny model: train -> verified adapter-only save -> reload reproduces logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import load_config
from finetune.testing import qa_rows, write_jsonl
from tests.conftest import write_job

EXPECTED_FILES = {
    "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
    "chat_template.jinja", "finetune.yaml", "run.json", "metrics.jsonl", "README.md", "loss.png",
}


@pytest.fixture(scope="module")
def trained(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One real run through the pipeline: returns (job file, adapter folder)."""
    from finetune.pipeline import run_train

    tmp = tmp_path_factory.mktemp("run")
    train = write_jsonl(tmp / "train.jsonl", qa_rows(32))
    job = write_job(tmp, tiny_lm, train, train={"max_steps": 30, "learning_rate": 1e-2}, data={"validation": str(train)})
    return job, run_train(load_config(job))


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_leaves_exactly_the_adapter_files(trained: tuple[Path, Path]) -> None:
    _, folder = trained
    assert {p.name for p in folder.iterdir()} == EXPECTED_FILES
    assert not list(folder.parent.glob(".tiny.tmp*")), "temporary folder left behind"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).is_absolute()
    run = json.loads((folder / "run.json").read_text())
    assert run["verification"]["max_logit_diff"] <= run["verification"]["tolerance"]
    assert {"torch", "transformers", "peft"} <= set(run["packages"]) and run["data"]["fingerprint"]


def test_loss_decreases(trained: tuple[Path, Path]) -> None:
    losses = [m["loss"] for m in metrics(trained[1]) if "loss" in m]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_adapter_changed_and_base_bit_identical(trained: tuple[Path, Path], tiny_lm: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tensors = load_file(str(trained[1] / "adapter_model.safetensors"))
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # B starts at zero: it moved
    original = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).state_dict()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32), trained[1])
    base = model.get_base_model().state_dict()
    for name, weight in original.items():
        loaded = base.get(name, base.get(name.replace(".weight", ".base_layer.weight")))
        assert loaded is not None and torch.equal(loaded, weight), name


def test_plain_peft_reload_reproduces_logits(trained: tuple[Path, Path], tiny_lm: Path) -> None:
    """Independent of our own verification: merge by hand (W + scale * B A) and compare with peft's reload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7, 2]])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32), trained[1]).eval()
    tensors = load_file(str(trained[1] / "adapter_model.safetensors"))
    cfg = json.loads((trained[1] / "adapter_config.json").read_text())
    manual = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    state = manual.state_dict()
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        target = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
        state[target] += (cfg["lora_alpha"] / cfg["r"]) * b @ a
    manual.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, manual(ids).logits, atol=1e-5)


def test_gradient_accumulation_equals_big_batch(tiny_lm: Path, tmp_path: Path) -> None:
    """2 micro-batches of 2 (or 4 of 1) give the same update as 1 batch of 4: the loss is normalised by the target
    tokens of the whole step, not averaged per micro-batch. One step: later Adam steps amplify float rounding."""
    from finetune.pipeline import run_train

    rows = qa_rows(16)
    rows[3]["completion"] += " and a much longer answer than the others"  # unequal target counts per micro-batch
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    outs, losses = [], []
    for name, micro, accum in (("big", 4, 1), ("accum", 2, 2), ("accum1", 1, 4)):
        job = write_job(tmp_path, tiny_lm, train, train={"max_steps": 1, "micro_batch_size": micro, "gradient_accumulation": accum},
                        output={"run_name": name})
        folder = run_train(load_config(job))
        outs.append(load_file(str(folder / "adapter_model.safetensors")))
        losses.append(metrics(folder)[0]["loss"])
    assert max(losses) - min(losses) < 1e-5, losses
    for other in outs[1:]:
        for key, value in outs[0].items():
            assert torch.allclose(value, other[key], atol=1e-7, rtol=0), key


def test_shipped_tiny_config_end_to_end(tmp_path: Path) -> None:
    """The README's try-it path: generate the tiny model and data, then `finetune train configs/tiny.yaml`."""
    root = Path(__file__).resolve().parents[1]
    run = {"capture_output": True, "text": True, "timeout": 300, "cwd": tmp_path}
    made = subprocess.run([sys.executable, "-m", "finetune.testing", ".cache/tiny"], **run)  # type: ignore[call-overload]
    assert made.returncode == 0, made.stderr[-2000:]
    job = str(root / "configs" / "tiny.yaml")
    out = subprocess.run([sys.executable, "-m", "finetune", "train", job, "output.overwrite=false"], **run)  # type: ignore[call-overload]
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trainable" in out.stdout and "sum r*(d+k)" in out.stdout
    folder = tmp_path / "adapters" / "tiny"
    assert {p.name for p in folder.iterdir()} == EXPECTED_FILES
    again = subprocess.run([sys.executable, "-m", "finetune", "train", job, "output.overwrite=false"], **run)  # type: ignore[call-overload]
    assert again.returncode == 1 and "exists" in again.stderr


def test_cli_missing_data_file_named(tiny_lm: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path, tiny_lm, tmp_path / "absent.jsonl")
    out = subprocess.run([sys.executable, "-m", "finetune", "train", str(job)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and str(tmp_path / "absent.jsonl") in out.stderr
