"""The training engine in one process: data order and sharding, exact resume, eval/early stopping/best, NaN,
out-of-memory retry, trackers, plot, profile, precision, gradient checkpointing, classification."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import load_config
from finetune.errors import FinetuneError
from finetune.testing import qa_rows, write_jsonl


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Any:
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def run(write_job: Callable[..., Path]) -> Callable[..., Path]:
    """run(tmp, model, name, lora=None, data=None, **train): a 6-step tiny job with validation data, trained."""
    from finetune.pipeline import run_train

    def _run(tmp: Path, model: Path, name: str, lora: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
             **train: Any) -> Path:
        rows = write_jsonl(tmp / "train.jsonl", qa_rows(24))
        val = write_jsonl(tmp / "val.jsonl", qa_rows(8)[::-1])
        job = write_job(tmp, model, rows, train={"max_steps": 6, **train}, data={"validation": str(val), **(data or {})},
                        output={"run_name": name}, lora=lora or {})
        return run_train(load_config(job))

    return _run


def _metrics(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _losses(folder: Path) -> list[float]:
    return [m["loss"] for m in _metrics(folder) if "loss" in m]


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


# --- data order -------------------------------------------------------------------------------------------------

def test_sharding_covers_every_example_once_and_matches_one_big_batch() -> None:
    from finetune.training.processes import DataPlan, rank_share, step_examples

    n, b, k = 10, 2, 2
    two, one = DataPlan(n, seed=3), DataPlan(n, seed=3)
    seen: list[int] = []
    for _ in range(5):  # 5 steps x 8 examples = 4 epochs of 10
        rows = step_examples(list(range(n)), two, None, b * k * 2)
        assert step_examples(list(range(n)), one, None, 2 * b * k) == rows  # same examples per step
        shares = [rank_share(rows, b, k, r, 2) for r in range(2)]
        mine = [x for r in range(2) for m in shares[r] for x in m]
        assert sorted(mine) == sorted(rows)  # no example dropped or doubled between ranks
        big = rank_share(rows, 2 * b, k, 0, 1)
        for i in range(k):  # micro-batch i of 2 ranks x b holds micro-batch i of 1 process x 2b
            assert sorted(shares[0][i] + shares[1][i]) == sorted(big[i])
        seen += rows
    for epoch in range(4):
        assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert seen[:n] != list(range(n)), "not shuffled"


def test_streaming_order_resumes_from_the_cursor() -> None:
    from finetune.training.processes import DataPlan, step_examples, stream_from

    class Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            return iter(range(7))

    plan = DataPlan(None, seed=0)
    whole = step_examples(Stream(), plan, stream_from(Stream(), 0), 12)
    assert whole == list(range(7)) + list(range(5)) and plan.cursor == 12
    assert step_examples(Stream(), DataPlan(None, 0), stream_from(Stream(), 5), 7) == whole[5:]


def test_accelerate_parent_command_is_read() -> None:
    from finetune.training.processes import requested_processes

    assert requested_processes(["/v/bin/python", "/v/bin/accelerate", "launch", "--num_processes", "2", "-m", "finetune"]) == 2
    assert requested_processes(["/v/bin/accelerate", "launch", "--num_processes=3", "-m", "finetune"]) == 3
    assert requested_processes(["/bin/bash", "-c", "--num_processes 2"]) == 1


def test_unsynchronised_processes_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import accelerate

    from finetune.training import processes as distributed

    class Alone:  # what a CPU process started by torchrun gets without CPU mode: a group of one
        num_processes = 1

        def __init__(self, **kwargs: Any):
            pass

    monkeypatch.setattr(accelerate, "Accelerator", Alone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FinetuneError, match="unsynchronised"):
        distributed.make_accelerator("fp32")


# --- precision --------------------------------------------------------------------------------------------------

def test_precision_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.training import processes as distributed

    with pytest.raises(FinetuneError, match="fp16 needs a CUDA GPU; on CPU use bf16"):
        distributed.resolve_precision("fp16")
    assert distributed.resolve_precision("fp32") == "no"
    monkeypatch.setattr(distributed, "cpu_bf16", lambda: True)
    assert distributed.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(distributed, "cpu_bf16", lambda: False)
    assert distributed.resolve_precision("auto") == "no"
    with pytest.raises(FinetuneError, match="no bf16 support"):
        distributed.resolve_precision("bf16")


# --- the loop ---------------------------------------------------------------------------------------------------

def test_resume_from_checkpoint_is_bitwise_exact(tiny_lm: Path, tmp_path: Path, run) -> None:
    ref = run(tmp_path, tiny_lm, "ref", checkpoint_every=2, keep_last=2)
    ckpts = sorted((ref.parent / ".work" / "ref" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-00000004", "step-00000006"]  # keep_last=2
    resumed = run(tmp_path, tiny_lm, "ref2", resume=str(ckpts[0]))
    _same_tensors(ref, resumed)
    losses = [[m["loss"] for m in _metrics(f) if "loss" in m] for f in (ref, resumed)]
    assert len(losses[0]) == 6 and losses[1] == losses[0][4:]  # the resumed run logs steps 5 and 6, bitwise equal
    assert json.loads((resumed / "run.json").read_text())["metrics"]["eval_loss"] == json.loads(
        (ref / "run.json").read_text())["metrics"]["eval_loss"]


def test_streaming_resume_is_exact(tiny_lm: Path, tmp_path: Path, run) -> None:
    stream = {"streaming": True, "shuffle_buffer": 5}
    ref = run(tmp_path, tiny_lm, "sref", data=stream, checkpoint_every=2, keep_last=3)
    first = ref.parent / ".work" / "sref" / "checkpoints" / "step-00000002"
    assert json.loads((first / "trainer_state.json").read_text())["cursor"] == 8  # 2 steps x micro-batch 4
    resumed = run(tmp_path, tiny_lm, "sres", data=stream, resume=str(first))
    _same_tensors(ref, resumed)
    assert _losses(resumed) == _losses(ref)[2:]


def test_resume_path_that_is_not_a_checkpoint_is_named(tiny_lm: Path, tmp_path: Path, run) -> None:
    with pytest.raises(FinetuneError, match="not a checkpoint folder"):
        run(tmp_path, tiny_lm, "x", resume=str(tmp_path))


def test_early_stopping_keeps_the_best_adapter(tiny_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run) -> None:
    from finetune.training import loop as train

    scripted = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    monkeypatch.setattr(train, "evaluate_loss", lambda *a: next(scripted))
    folder = run(tmp_path, tiny_lm, "es", eval_every=1, early_stopping_patience=2, checkpoint_every=1, keep_last=9)
    rows = _metrics(folder)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["eval_loss"] for r in rows] == [3.0, 2.0, 2.5, 2.6]
    run = json.loads((folder / "run.json").read_text())["metrics"]
    assert run["best_step"] == 2 and run["stopped_early"] and run["eval_loss"] == 2.0
    best = load_file(str(folder.parent / ".work" / "es" / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    saved = load_file(str(folder / "adapter_model.safetensors"))
    for name, value in best.items():  # peft drops the adapter name when saving
        assert torch.equal(saved[name.replace(".default", "")], value), name


def test_nan_loss_stops_naming_the_step(tiny_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run) -> None:
    from finetune.training import loop as train

    real, calls = train.loss_sum, {"n": 0}

    def poisoned(model: Any, batch: Any) -> Any:
        calls["n"] += 1
        return real(model, batch) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(train, "loss_sum", poisoned)
    with pytest.raises(FinetuneError, match=r"loss is nan at step 3.*step-00000002"):
        run(tmp_path, tiny_lm, "nan", checkpoint_every=2)
    assert not (tmp_path / "adapters" / "nan").exists()


def test_out_of_memory_halves_the_micro_batch(tiny_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str], run) -> None:
    from finetune.training import loop as train

    real = train.loss_sum

    def small_only(model: Any, batch: Any) -> Any:  # pretend a batch of 4 does not fit
        examples = len(batch["cu_seq_lens_q"]) - 1 if "cu_seq_lens_q" in batch else batch["input_ids"].shape[0]
        if examples > 2:  # padding-free batches hold their examples in one row
            raise torch.OutOfMemoryError("simulated")
        return real(model, batch)

    ref = run(tmp_path, tiny_lm, "mb2", micro_batch_size=2, gradient_accumulation=2)
    monkeypatch.setattr(train, "loss_sum", small_only)
    oom = run(tmp_path, tiny_lm, "oom", micro_batch_size=4, gradient_accumulation=1)
    assert "micro_batch_size -> 2, gradient_accumulation -> 2" in capsys.readouterr().out
    assert _losses(oom) == _losses(ref)
    _same_tensors(ref, oom)


def test_gradient_checkpointing_gives_the_same_training(tiny_lm: Path, tmp_path: Path, run) -> None:
    plain = run(tmp_path, tiny_lm, "plain", max_steps=3)
    ckpt = run(tmp_path, tiny_lm, "gc", max_steps=3, gradient_checkpointing=True)
    assert all(abs(x - y) < 1e-5 for x, y in zip(_losses(plain), _losses(ckpt), strict=True))


def test_trackers_plot_and_profile(tiny_lm: Path, tmp_path: Path, run) -> None:
    from mlflow.tracking import MlflowClient
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = run(tmp_path, tiny_lm, "tr", max_steps=4, eval_every=2, trackers=["tensorboard", "mlflow"], profile_steps=2)
    rows = _metrics(folder)
    work = folder.parent / ".work" / "tr"
    events = EventAccumulator(str(work / "tr"))
    events.Reload()
    assert [round(e.value, 5) for e in events.Scalars("loss")] == [round(x, 5) for x in _losses(folder)]
    client = MlflowClient(tracking_uri=(work / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = sorted(client.get_metric_history(run.info.run_id, "eval_loss"), key=lambda m: m.step)
    assert [(m.step, round(m.value, 5)) for m in history] == [(r["step"], round(r["eval_loss"], 5)) for r in rows if "eval_loss" in r]
    assert Image.open(folder / "loss.png").size == (700, 400)
    assert "Self CPU" in (folder / "profile.txt").read_text() and "aten::" in (folder / "profile.txt").read_text()


# --- classification ---------------------------------------------------------------------------------------------

def _class_bundle(tok: Any) -> Any:
    """Sentiment-like rows straight as token ids (the data module's classification format is tested there)."""
    from finetune.data.collate import PadCollator

    words = {0: ["bad", "awful", "poor"], 1: ["good", "great", "fine"]}
    rows = [{"input_ids": tok(f"{w} {w} day", add_special_tokens=False)["input_ids"], "label": label}
            for label, ws in words.items() for w in ws] * 4
    return SimpleNamespace(train=rows, validation=rows[:6], collator=PadCollator(tok.pad_token_id), labels=["neg", "pos"])


def test_classification_trains_the_head_with_lora(tiny_encoder: Path, tmp_path: Path) -> None:
    from finetune import model
    from finetune.config.lora import LoraConfig
    from finetune.config.model import ModelConfig
    from finetune.config.train import TrainConfig
    from finetune.model import lora
    from finetune.training import loop as train

    mcfg, lcfg = ModelConfig(name_or_path=str(tiny_encoder)), LoraConfig(r=4, alpha=8, dropout=0.0)
    base, tok, _ = model.load_model(mcfg, "classification", lcfg.quantization, ["neg", "pos"])
    net = lora.wrap_lora(base, lcfg, "classification")
    head = {n: p.detach().clone() for n, p in net.named_parameters() if "classifier" in n and p.requires_grad}
    assert head, "the classification head must be trained (modules_to_save)"
    bundle = _class_bundle(tok)
    cfg = TrainConfig(max_steps=30, micro_batch_size=8, learning_rate=2e-2, precision="fp32", warmup_ratio=0)
    result = train.train(net, bundle, cfg, train.make_accelerator(cfg), tmp_path / "work")
    assert result.losses[-1] < 0.2 < result.losses[0]
    assert result.metrics()["examples"] == 30 * 8 and "tokens" not in result.metrics()  # one label per example
    assert any(not torch.equal(p, dict(net.named_parameters())[n]) for n, p in head.items())
    batch = bundle.collator(bundle.train)
    with torch.no_grad():
        pred = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    assert float((pred == batch["label"]).float().mean()) == 1.0


# --- shipped accelerate configs ---------------------------------------------------------------------------------

ACCEL = sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCEL, ids=[p.name for p in ACCEL])
def test_shipped_accelerate_configs_load_in_accelerate(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type is not None and path.read_text().startswith("# accelerate launch --config_file")


def test_all_accelerate_setups_are_shipped() -> None:
    assert {p.stem for p in ACCEL} >= {"one_gpu", "multi_gpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "cpu_multi_process"}


# --- save under FSDP / ZeRO-3 and full fine-tuning --------------------------------------------------------------

@pytest.mark.parametrize("gathered", ["empty", "zeros", "nothing"])
def test_save_refuses_an_adapter_that_was_not_gathered(tiny_lm: Path, tmp_path: Path, gathered: str, write_job) -> None:
    """ZeRO-3/FSDP without a gather hands back 0-element tensors; a wrong gather, zeros or no keys at all."""
    from finetune import model
    from finetune.config import load_config
    from finetune.errors import VerificationError
    from finetune.lifecycle import save
    from finetune.model import lora
    from finetune.training.loop import make_accelerator

    job = load_config(write_job(tmp_path, tiny_lm, write_jsonl(tmp_path / "d.jsonl", qa_rows(4))))
    base, tok, source = model.load_model(job.model, "causal_lm", job.lora.quantization)
    net = lora.wrap_lora(base, job.lora)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)  # "trained"
    acc = make_accelerator(job.train)
    fake = {"empty": lambda m: {k: torch.empty(0) for k in m.state_dict()},
            "zeros": lambda m: {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in m.state_dict().items()},
            "nothing": lambda m: {}}[gathered]
    acc.get_state_dict = fake  # type: ignore[method-assign]
    probe = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(VerificationError, match="LoRA"):
        save.save_adapter(net, tok, save.SaveRequest(job, source, {}, probe), acc)
    assert not list((tmp_path / "adapters").glob("*")), "nothing may be left behind"


def test_full_fine_tuning_saves_a_whole_verified_model(tiny_lm: Path, tmp_path: Path, write_job) -> None:
    from transformers import AutoModelForCausalLM

    from finetune.pipeline import run_train

    data = write_jsonl(tmp_path / "train.jsonl", qa_rows(16))
    job = write_job(tmp_path, tiny_lm, data, lora={"enabled": False}, train={"max_steps": 4, "learning_rate": 1e-3},
                    output={"run_name": "full"})
    folder = run_train(load_config(job))
    run = json.loads((folder / "run.json").read_text())
    assert run["verification"]["full_model"] and run["params"]["trainable"] == run["params"]["total"]
    before = AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict()
    after = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) - 1, changed  # every weight trained (a rotary buffer may not be saved)


def test_qlora_4bit_trains_evaluates_and_verifies(tmp_path: Path, run) -> None:
    """nf4 base through bitsandbytes with peft's k-bit preparation; eval mid-run must not corrupt later steps
    (bnb's CPU weight repacking did: the reloaded adapter then disagreed with the trained one)."""
    from finetune.testing import make_causal_lm

    model = make_causal_lm(tmp_path / "m64", hidden=64)  # bnb's CPU 4-bit kernels need rows of >= 64 values
    folder = run(tmp_path, model, "q4", lora={"quantization": "4bit"}, max_steps=4, eval_every=2)
    run = json.loads((folder / "run.json").read_text())
    assert run["verification"]["max_logit_diff"] <= run["verification"]["tolerance"]
    losses = _losses(folder)
    assert losses[-1] < losses[0]


def test_bf16_autocast_run_verifies_in_full_precision(tiny_lm: Path, tmp_path: Path, run) -> None:
    """accelerate patches an autocast forward into the model; the save verification must compare without it."""
    from finetune.training.processes import cpu_bf16

    if not cpu_bf16():
        pytest.skip("this CPU has no bf16")
    folder = run(tmp_path, tiny_lm, "bf", max_steps=2, precision="bf16")
    run = json.loads((folder / "run.json").read_text())
    assert run["precision"] == "bf16" and run["verification"]["max_logit_diff"] == 0.0


@pytest.mark.slow  # the first torch.compile costs 15-60 s on CPU
def test_compiled_training_matches_and_saves_the_adapter(tiny_lm: Path, tmp_path: Path, run) -> None:
    """A compiled wrapper prefixes state-dict keys with _orig_mod.; the save must gather from the plain model."""
    plain = run(tmp_path, tiny_lm, "plain", max_steps=3)
    compiled = run(tmp_path, tiny_lm, "compiled", max_steps=3, compile=True)
    assert all(abs(x - y) < 1e-5 for x, y in zip(_losses(plain), _losses(compiled), strict=True))
    assert json.loads((compiled / "run.json").read_text())["verification"]["tensors"] > 0
