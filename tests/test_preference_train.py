"""Preference training through the real loop: exact accumulation, DPO's frozen reference, continuing an adapter
(model.adapter), exact resume, eval on preference validation data, bf16 / QLoRA, and 2 processes = 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import load_config
from finetune.errors import ModelError
from finetune.testing import preference_rows, qa_rows, write_jsonl

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Any:
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _metrics(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _pairs(n: int) -> list[dict]:
    """Pairs whose answers differ in length from row to row (so per-micro-batch averaging would show)."""
    rows = preference_rows(n, chat=True)
    for i, row in enumerate(rows):
        row["rejected"][0]["content"] += " and more" * (i % 3)
    return rows


@pytest.fixture(scope="module")
def sft(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory, train_tiny: Callable[..., Path]) -> Path:
    """A trained SFT adapter (chat data) to continue from."""
    rows = [{"messages": p["prompt"] + p["chosen"]} for p in preference_rows(16, chat=True)]
    return train_tiny(tmp_path_factory.mktemp("sft"), tiny_lm, rows, "sft", steps=10)


def _dpo(tmp: Path, model: Path, name: str, rows: list[dict], write_job: Callable[..., Path], start: Path | None = None,
         data: dict[str, Any] | None = None, lora: dict[str, Any] | None = None, rows_file: str | None = None,
         **train: Any) -> Path:
    from finetune.pipeline import run_train

    tmp.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(tmp / f"{rows_file or name}.jsonl", rows)
    job = write_job(tmp, model, path, model={"adapter": str(start)} if start else {}, lora=lora or {}, data=data or {},
                    train={"objective": "dpo", "max_steps": 4, "micro_batch_size": 2, **train}, output={"run_name": name})
    return run_train(load_config(job))


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
def test_accumulation_1x4_2x2_4x1_give_the_same_gradient(tiny_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         objective: str) -> None:
    """As for SFT (tests/test_pipeline.py): the accumulated float64 gradient before the optimizer step. ORPO's NLL is
    normalised by the chosen answer tokens of the whole step, its odds ratio and DPO/SimPO by its pairs."""
    from finetune.config.data import DataConfig
    from finetune.config.lora import LoraConfig
    from finetune.config.model import ModelConfig
    from finetune.config.train import TrainConfig
    from finetune.data import build_data
    from finetune.model import load_model, wrap_lora
    from finetune.training import make_accelerator, train

    data_file = write_jsonl(tmp_path / "pairs.jsonl", _pairs(8))
    grads: list[list[torch.Tensor]] = []

    def record(self: torch.optim.Optimizer, *args: object, **kwargs: object) -> None:
        grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None])

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        base, tok, _ = load_model(ModelConfig(name_or_path=str(tiny_lm)))
        torch.manual_seed(0)
        net = wrap_lora(base.double(), LoraConfig(r=4, alpha=8, dropout=0.0))
        with torch.no_grad():  # a non-zero adapter, so the policy differs from DPO's reference
            for i, (name, param) in enumerate(net.named_parameters()):
                if "lora_B" in name:
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
        bundle = build_data(DataConfig(train=str(data_file), max_seq_len=64, cache=False), tok)
        cfg = TrainConfig(objective=objective, max_steps=1, micro_batch_size=micro, gradient_accumulation=accum,  # type: ignore[arg-type]
                          precision="fp32", max_grad_norm=None, plot=False)
        train(net, bundle, cfg, make_accelerator(cfg), tmp_path / f"work-{micro}")
    assert len(grads) == 3 and grads[0][0].dtype == torch.float64
    scale = max(float(g.abs().max()) for g in grads[0])
    assert scale > 0
    for other in grads[1:]:
        for want, got in zip(grads[0], other, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * scale)


def test_dpo_reference_is_the_frozen_starting_adapter(tiny_lm: Path, tmp_path: Path, sft: Path, write_job,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference log-probs of the same pairs are bit-identical at every step and equal those of the starting
    adapter loaded on its own with plain peft; the policy moves; the base weights stay bit-identical; the saved
    adapter holds only the trained LoRA weights (no reference copy) with the starting adapter's settings."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.training import preference

    seen: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
    real = preference.Dpo.reference_logps

    def spy(self: Any, model: Any, batch: dict[str, Any]) -> Any:
        out = real(self, model, batch)
        seen.append(({k: v.clone() for k, v in batch.items()}, out.detach().clone()))
        return out

    monkeypatch.setattr(preference.Dpo, "reference_logps", spy)
    rows = _pairs(2)
    folder = _dpo(tmp_path, tiny_lm, "dpo", rows, write_job, start=sft, micro_batch_size=2, learning_rate=5e-2)
    by_row = [{tuple(ids.tolist()): float(v) for ids, v in zip(batch["input_ids"], values, strict=True)}
              for batch, values in seen]
    assert len(by_row) == 4 and all(step == by_row[0] for step in by_row[1:])  # same 2 pairs each step, any order
    rewards = [m["rewards/chosen"] for m in _metrics(folder)]
    assert rewards[0] == 0.0 and rewards[-1] != 0.0  # step 1: policy == reference; then it moves away
    # the starting adapter on its own gives the same log-probs
    start = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32), str(sft)).eval()
    with torch.no_grad():
        independent = preference.sequence_logps(start, seen[0][0])[0]
    torch.testing.assert_close(independent, seen[0][1], rtol=0, atol=1e-5)
    # outputs
    original = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).state_dict()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32), str(folder))
    base = reloaded.get_base_model().state_dict()
    for name, weight in original.items():
        assert torch.equal(base.get(name, base.get(name.replace(".weight", ".base_layer.weight"))), weight), name
    saved, started = load_file(str(folder / "adapter_model.safetensors")), load_file(str(sft / "adapter_model.safetensors"))
    assert saved.keys() == started.keys() and not any("reference" in k for k in saved)
    assert any(not torch.equal(saved[k], started[k]) for k in saved)
    assert not (folder / "reference").exists()
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == json.loads((sft / "adapter_config.json").read_text())["r"]
    run = json.loads((folder / "run.json").read_text())
    assert run["objective"]["name"] == "dpo" and str(sft) in run["objective"]["reference"]
    assert run["started_from"] == str(sft.resolve())


def test_continuing_an_adapter_starts_from_its_weights(tiny_lm: Path, tmp_path: Path, sft: Path, write_job) -> None:
    """More SFT from an adapter: the first step's loss is the starting adapter's own loss on that step's examples."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.config.data import DataConfig
    from finetune.data import build_data
    from finetune.pipeline import run_train
    from finetune.training.loss import loss_sum, target_count
    from finetune.training.processes import DataPlan

    data = write_jsonl(tmp_path / "more.jsonl", qa_rows(8))
    job = write_job(tmp_path, tiny_lm, data, model={"adapter": str(sft)}, lora={}, train={"max_steps": 2},
                    output={"run_name": "more"})
    folder = run_train(load_config(job))
    first = _metrics(folder)[0]["loss"]
    start = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32), str(sft)).eval()
    from transformers import AutoTokenizer

    bundle = build_data(DataConfig(train=str(data), max_seq_len=64, cache=False), AutoTokenizer.from_pretrained(tiny_lm))
    batch = bundle.collator([bundle.train[i] for i in DataPlan(len(bundle.train), 42).take(4)])
    with torch.no_grad():
        expected = float(loss_sum(start, batch)) / target_count(batch)
    assert first == pytest.approx(expected, abs=1e-5)
    assert json.loads((folder / "run.json").read_text())["started_from"] == str(sft.resolve())


def test_a_conflicting_lora_section_or_another_base_is_refused(tiny_lm: Path, tmp_path: Path, sft: Path, write_job) -> None:
    from finetune.pipeline import run_train
    from finetune.testing import make_causal_lm

    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(4))
    conflict = write_job(tmp_path, tiny_lm, data, model={"adapter": str(sft)}, lora={"r": 8, "alpha": 8},
                         train={"objective": "dpo"})
    with pytest.raises(ModelError, match=r"lora.r: the job sets 8, the adapter has 4[\s\S]*remove these keys"):
        run_train(load_config(conflict))
    other = make_causal_lm(tmp_path / "wide", hidden=64)
    wrong_base = write_job(tmp_path, other, data, model={"adapter": str(sft)}, lora={}, train={"objective": "dpo"})
    with pytest.raises(ModelError, match="does not fit the base model"):
        run_train(load_config(wrong_base))


def test_resumed_dpo_run_equals_the_uninterrupted_one(tiny_lm: Path, tmp_path: Path, sft: Path, write_job) -> None:
    """The reference is rebuilt from model.adapter on resume; the trained weights come from the checkpoint."""
    rows = _pairs(8)
    # one data file for both: resume checks that the checkpoint's job read the same data (its path included)
    ref = _dpo(tmp_path, tiny_lm, "ref", rows, write_job, start=sft, rows_file="pairs", checkpoint_every=2)
    checkpoint = ref.parent / ".work" / "ref" / "checkpoints" / "step-00000002"
    resumed = _dpo(tmp_path, tiny_lm, "resumed", rows, write_job, start=sft, rows_file="pairs", resume=str(checkpoint))
    a, b = load_file(str(ref / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(resumed) == [{**m, **{k: n[k] for k in ("elapsed_s", "tokens_per_s", "targets_per_s")}}
                                 for m, n in zip(_metrics(ref)[2:], _metrics(resumed), strict=True)]


def test_eval_during_training_reports_preference_metrics(tiny_lm: Path, tmp_path: Path, write_job) -> None:
    val = write_jsonl(tmp_path / "val.jsonl", _pairs(4))
    folder = _dpo(tmp_path, tiny_lm, "ev", _pairs(8), write_job, data={"validation": str(val)}, eval_every=2,
                  learning_rate=5e-2)
    evals = [m for m in _metrics(folder) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert all({"eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen"} <= set(m) for m in evals)
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"] > 0  # learning to prefer "hello"
    metrics = json.loads((folder / "run.json").read_text())["metrics"]
    assert metrics["eval_loss"] == min(m["eval_loss"] for m in evals) and "eval_perplexity" not in metrics
    assert metrics["eval_rewards/accuracies"] == evals[-1]["eval_rewards/accuracies"] and "rewards/margins" in metrics


@pytest.mark.parametrize("setup", ["qlora-4bit", "bf16"])
def test_bf16_and_qlora_dpo_runs_verify(tmp_path: Path, write_job, setup: str) -> None:
    from finetune.testing import make_causal_lm
    from finetune.training.processes import cpu_bf16

    if setup == "bf16" and not cpu_bf16():
        pytest.skip("this CPU has no bf16")
    model = make_causal_lm(tmp_path / "m64", hidden=64)  # bnb's CPU 4-bit kernels need rows of >= 64 values
    lora, train = ({"quantization": "4bit"}, {}) if setup == "qlora-4bit" else ({}, {"precision": "bf16"})
    folder = _dpo(tmp_path, model, setup, _pairs(8), write_job, lora=lora, learning_rate=5e-2, **train)
    run = json.loads((folder / "run.json").read_text())
    assert run["verification"]["max_logit_diff"] <= run["verification"]["tolerance"]
    losses = [m["loss"] for m in _metrics(folder)]
    assert losses[-1] < losses[0]


def test_two_processes_equal_one_with_double_micro_batch(tiny_lm: Path, tmp_path: Path, sft: Path, write_job) -> None:
    """DPO from an adapter under real DDP (gloo): every process builds its reference copy, the pair counts are summed
    over processes; losses, rewards and weights agree with one process up to float32 summation order."""
    from accelerate.state import AcceleratorState

    from finetune.pipeline import run_train

    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(16))
    job = str(write_job(tmp_path, tiny_lm, data, model={"adapter": str(sft)}, lora={},
                        train={"objective": "dpo", "max_steps": 4, "gradient_accumulation": 2, "learning_rate": 5e-2}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--num_processes", "2", "-m", "finetune", "train", job,
           "train.micro_batch_size=1", "output.run_name=ddp"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "starting 2 synchronised ones" in done.stdout
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_train(load_config(job, ["train.micro_batch_size=2", "output.run_name=one"]))
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
    ddp = tmp_path / "adapters" / "ddp"
    rows = {name: _metrics(folder) for name, folder in (("ddp", ddp), ("one", one))}
    assert [r["step"] for r in rows["ddp"]] == [1, 2, 3, 4]
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        diffs = [abs(a[key] - b[key]) for a, b in zip(rows["ddp"], rows["one"], strict=True)]
        assert max(diffs) < 1e-5, (key, diffs)  # measured: <= 7.5e-7
    a, b = load_file(str(ddp / "adapter_model.safetensors")), load_file(str(one / "adapter_model.safetensors"))
    delta = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # as tests/test_train_processes.py: nearly every element to 1e-5 (measured: all, largest 5.2e-7), every element
    # within Adam's bound of 2 * lr * steps
    assert float((delta > 1e-5).float().mean()) < 1e-3 and float(delta.max()) <= 2 * 5e-2 * 4
