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

EXPECTED_FILES = {
    "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
    "chat_template.jinja", "finetune.yaml", "run.json", "metrics.jsonl", "README.md", "loss.png", ".finetune-output.json", "prompt.json",
}


@pytest.fixture(scope="module")
def trained(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory, write_job) -> tuple[Path, Path]:
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


def test_gradient_accumulation_equals_big_batch(tiny_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_job) -> None:
    """4 micro-batches of 1, 2 of 2 and 1 of 4 give the same gradient: each micro loss is divided by the target tokens
    of the whole step, not averaged per micro-batch (unequal target counts per micro-batch make the difference
    visible). Compared where the claim lives, the accumulated gradient before the optimizer step, in float64 with a
    tolerance from float64 rounding (~1e-16 per operation): the same check passes on any CPU. Adam's first update
    would not do: it divides a near-zero gradient by its own magnitude, amplifying float32 summation order."""
    from finetune.config.data import DataConfig
    from finetune.config.train import TrainConfig
    from finetune.data import build_data
    from finetune.model import load_model, wrap_lora
    from finetune.training import make_accelerator, train

    rows = qa_rows(16)
    rows[3]["completion"] += " and a much longer answer than the others"
    data_file = write_jsonl(tmp_path / "train.jsonl", rows)
    grads: list[list[torch.Tensor]] = []

    def record(self: torch.optim.Optimizer, *args: object, **kwargs: object) -> None:
        grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None])

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    job = load_config(write_job(tmp_path, tiny_lm, data_file))
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        base, tok, _ = load_model(job.model)
        torch.manual_seed(0)  # the same LoRA initialisation for all three
        net = wrap_lora(base.double(), job.lora)
        bundle = build_data(DataConfig(train=str(data_file), max_seq_len=64, cache=False), tok)
        cfg = TrainConfig(max_steps=1, micro_batch_size=micro, gradient_accumulation=accum, precision="fp32",
                          max_grad_norm=None, plot=False)
        train(net, bundle, cfg, make_accelerator(cfg), tmp_path / f"work-{micro}")
    assert len(grads) == 3 and all(g.dtype == torch.float64 for g in grads[0])
    scale = max(float(g.abs().max()) for g in grads[0])
    for other in grads[1:]:
        for want, got in zip(grads[0], other, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * scale)


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


def test_cli_missing_data_file_named(tiny_lm: Path, tmp_path: Path, write_job) -> None:
    job = write_job(tmp_path, tiny_lm, tmp_path / "absent.jsonl")
    out = subprocess.run([sys.executable, "-m", "finetune", "train", str(job)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and str(tmp_path / "absent.jsonl") in out.stderr
