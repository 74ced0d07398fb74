"""The fast training paths are exact: padding-free batches with per-example attention, and the output layer run only
where there is loss, give the loss and every LoRA gradient of the plain path (padded batch, logits at every
position) in float64; the frozen bf16 base keeps the trained weights in float32; progress and the job echo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune.config.data import DataConfig
from finetune.data import build_data
from finetune.data.collate import PadCollator, PaddingFreeCollator
from finetune.testing import chat_rows, qa_rows, write_jsonl


def _as_chat(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in rows]


@pytest.fixture
def examples(tmp_path: Path, tiny_lm: Path) -> tuple[Any, list[dict[str, Any]], Path]:
    """Chat examples of mixed lengths (23 to 72 tokens): padding is a large share of a padded batch."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    f = write_jsonl(tmp_path / "d.jsonl", chat_rows(3) + _as_chat(qa_rows(5)))
    return tok, list(build_data(DataConfig(train=str(f), max_seq_len=96, cache=False), tok).train), f


def _lora64(tiny_lm: Path, attn: str = "sdpa") -> Any:
    """float64 tiny Llama with LoRA on every linear layer, B initialised non-zero so A gets gradients too."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float64, attn_implementation=attn)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def plain_loss(model: Any, batch: dict[str, Any]) -> Any:
    """The plain path: logits at every position of a padded batch, cross-entropy over the shifted labels."""
    import torch.nn.functional as F

    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")


def _loss_and_grads(model: Any, loss_fn: Any, batch: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    model.zero_grad()
    loss = loss_fn(model, batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got: tuple[float, dict[str, Any]], want: tuple[float, dict[str, Any]]) -> None:
    import torch

    assert got[0] == pytest.approx(want[0], rel=1e-10)
    assert got[1].keys() == want[1].keys() and len(want[1]) > 0
    for name, grad in want[1].items():
        assert float(grad.abs().max()) > 0, name
        torch.testing.assert_close(got[1][name], grad, rtol=1e-8, atol=1e-10, msg=name)


def test_padding_free_and_selected_logits_equal_the_plain_padded_path(tiny_lm: Path, examples: Any) -> None:
    from finetune.model.attention import SEGMENTS, restore_attention, use_segment_attention
    from finetune.training.loss import loss_sum

    tok, exs, _ = examples
    model = _lora64(tiny_lm)
    padded = PadCollator(tok.pad_token_id)(exs)
    want = _loss_and_grads(model, plain_loss, padded)
    _assert_same(_loss_and_grads(model, loss_sum, padded), want)  # logits only at the targets, padded batch
    free = PaddingFreeCollator(tok.pad_token_id)(exs)
    assert free["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in exs)) < padded["input_ids"].shape
    previous = use_segment_attention(model)
    assert model.get_base_model().config._attn_implementation == SEGMENTS
    _assert_same(_loss_and_grads(model, loss_sum, free), want)
    restore_attention(model, previous)
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_padding_free_packed_rows_equal_the_plain_path(tiny_lm: Path, examples: Any) -> None:
    from finetune.model.attention import use_segment_attention
    from finetune.training.loss import loss_sum

    tok, exs, f = examples
    packed = build_data(DataConfig(train=str(f), max_seq_len=96, cache=False, packing=True), tok).train
    assert len(packed) < len(exs)
    model = _lora64(tiny_lm)
    want = _loss_and_grads(model, plain_loss, PadCollator(tok.pad_token_id)(exs))
    use_segment_attention(model)
    _assert_same(_loss_and_grads(model, loss_sum, PaddingFreeCollator(tok.pad_token_id)(list(packed))), want)


def test_segment_attention_keeps_examples_apart_by_itself(tiny_lm: Path, examples: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5.23 builds a dense block mask for such rows when it recognises them from the position ids; the
    per-example kernel does not need it (nor pays for it), and without either the row's examples would mix."""
    import torch
    import transformers.masking_utils

    from finetune.model.attention import use_segment_attention
    from finetune.training.loss import loss_sum

    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    tok, exs, _ = examples
    model = _lora64(tiny_lm)
    free = PaddingFreeCollator(tok.pad_token_id)(exs)
    with torch.no_grad():
        want = float(plain_loss(model, PadCollator(tok.pad_token_id)(exs)))
        leaked = float(loss_sum(model, free))
        use_segment_attention(model)
        kept = float(loss_sum(model, free))
    assert abs(leaked - want) > 1e-3 and kept == pytest.approx(want, rel=1e-12)


def test_output_layer_runs_only_on_target_positions(tiny_lm: Path, examples: Any) -> None:
    """Evaluation (no gradients): the model's output layer sees the target positions only. Training: it sees one
    position (the check that the model applies nothing after it); the rest runs in chunks outside the model."""
    import torch

    from finetune.training.loss import loss_sum, target_count

    tok, exs, _ = examples
    model = _lora64(tiny_lm)
    rows: list[int] = []
    head = model.get_base_model().lm_head
    hook = head.register_forward_hook(lambda mod, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    batch = PadCollator(tok.pad_token_id)(exs)
    with torch.no_grad():
        loss_sum(model, batch)
    loss_sum(model, batch)
    hook.remove()
    assert rows == [target_count(batch), 1] and rows[0] < batch["input_ids"].numel() / 2


@pytest.mark.parametrize("trained_head", [False, True])
def test_chunked_output_layer_equals_the_plain_path(tiny_lm: Path, examples: Any, monkeypatch: pytest.MonkeyPatch,
                                                    trained_head: bool) -> None:
    """Chunks of 7 rows (so the targets span several, the last one partial); with lm_head trained too, its
    gradient as well. No (targets x vocabulary) logits tensor exists on this path."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.training import head_loss
    from finetune.training.loss import loss_sum

    monkeypatch.setattr(head_loss, "CHUNK", 7)
    tok, exs, _ = examples
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float64)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False, modules_to_save=["lm_head"] if trained_head else None))
    batch = PadCollator(tok.pad_token_id)(exs)
    want = _loss_and_grads(model, plain_loss, batch)
    assert any("lm_head" in n for n in want[1]) == trained_head
    calls: list[int] = []
    real = head_loss._forward_chunks
    monkeypatch.setattr(head_loss, "_forward_chunks", lambda *a: calls.append(1) or real(*a))
    _assert_same(_loss_and_grads(model, loss_sum, batch), want)
    assert calls == [1]  # the chunked path ran (not the logits fallback)


def test_a_model_that_rescales_its_logits_keeps_the_logits_path(tiny_lm: Path, examples: Any) -> None:
    """A logit scale or soft-capping after the output layer (here a hook halving the logits) is noticed by the
    probe position, and the loss stays the model's own."""
    from finetune.training import head_loss
    from finetune.training.loss import loss_sum

    tok, exs, _ = examples
    model = _lora64(tiny_lm)
    model.get_base_model().lm_head.register_forward_hook(lambda mod, args, out: out * 0.5)
    batch = PadCollator(tok.pad_token_id)(exs)
    _assert_same(_loss_and_grads(model, loss_sum, batch), _loss_and_grads(model, plain_loss, batch))
    assert head_loss._PLAIN[model.get_base_model()] is False


def test_target_logits_name_each_targets_example(tiny_lm: Path, examples: Any) -> None:
    """Per-example sums (what preference objectives need) equal each example's own loss, padded or padding-free."""
    import torch
    import torch.nn.functional as F

    from finetune.model.attention import use_segment_attention
    from finetune.training.loss import target_logits

    tok, exs, _ = examples
    model = _lora64(tiny_lm)
    use_segment_attention(model)
    with torch.no_grad():
        alone = torch.stack([F.cross_entropy(*_pair(target_logits(model, PadCollator(tok.pad_token_id)([e]))),
                                             reduction="sum") for e in exs])
        for collate in (PadCollator(tok.pad_token_id), PaddingFreeCollator(tok.pad_token_id)):
            out = target_logits(model, collate(exs))
            each = F.cross_entropy(out.logits, out.targets, reduction="none")
            per_example = torch.zeros(len(exs), dtype=each.dtype).index_add_(0, out.example, each)
            torch.testing.assert_close(per_example, alone, rtol=1e-10, atol=1e-10)


def _pair(out: Any) -> tuple[Any, Any]:
    return out.logits, out.targets


def test_evaluate_loss_is_the_same_padding_free(tiny_lm: Path, examples: Any) -> None:
    import types

    import torch

    from finetune.model.attention import use_segment_attention
    from finetune.training.loop import evaluate_loss

    tok, exs, _ = examples
    model = _lora64(tiny_lm)
    acc = types.SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"), autocast=_null,
                                reduce=lambda t, reduction: t)
    free = PaddingFreeCollator(tok.pad_token_id)
    data = types.SimpleNamespace(validation=exs, collator=free)
    want = evaluate_loss(model, data, 3, acc, free.padded)
    use_segment_attention(model)
    assert evaluate_loss(model, data, 3, acc) == pytest.approx(want, rel=1e-12)


def _null() -> Any:
    from contextlib import nullcontext

    return nullcontext()


def test_training_padding_free_matches_padded(tmp_path: Path, tiny_lm: Path, run_job: Any) -> None:
    """Through the real pipeline (fp32): the same per-step losses and the same adapter, fewer positions computed."""
    free = run_job(tmp_path, tiny_lm, "free", {})
    padded = run_job(tmp_path, tiny_lm, "padded", {"padding_free": False})
    assert [m["loss"] for m in free[0]] == pytest.approx([m["loss"] for m in padded[0]], rel=1e-5)
    assert free[1]["metrics"]["eval_loss"] == pytest.approx(padded[1]["metrics"]["eval_loss"], rel=1e-5)
    assert free[1]["verification"]["max_logit_diff"] == 0.0
    done, pad = free[1]["throughput"], padded[1]["throughput"]
    assert done["input_tokens"] == pad["input_tokens"] == done["positions"] < pad["positions"]
    job = tmp_path / "adapters" / ".work" / "free" / "job.yaml"  # the resolved job, written at the start
    assert job.read_text() == (tmp_path / "adapters" / "free" / "finetune.yaml").read_text()


def test_eager_attention_falls_back_to_padded_batches(tmp_path: Path, tiny_lm: Path, run_job: Any,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    eager = run_job(tmp_path, tiny_lm, "eager", {}, model={"attn_implementation": "eager"})
    assert "padded batches:" in capsys.readouterr().out
    padded = run_job(tmp_path, tiny_lm, "sdpa", {"padding_free": False})
    assert [m["loss"] for m in eager[0]] == pytest.approx([m["loss"] for m in padded[0]], rel=1e-4)


@pytest.fixture
def run_job(write_job: Any) -> Any:
    """run_job(tmp, base, name, data_overrides, **sections) -> (metrics rows, run.json) of a 4-step tiny run."""
    from finetune.config import load_config
    from finetune.pipeline import run_train

    def _run(tmp: Path, base: Path, name: str, data: dict[str, Any], **sections: Any) -> tuple[list[Any], Any]:
        rows = write_jsonl(tmp / "train.jsonl", chat_rows(6) + _as_chat(qa_rows(10)))
        val = write_jsonl(tmp / "val.jsonl", _as_chat(qa_rows(4)))
        (tmp / name).mkdir(parents=True, exist_ok=True)
        job = write_job(tmp / name, base, rows, data={"validation": str(val), "max_seq_len": 96, "cache": False, **data},
                        train={"max_steps": 4, "micro_batch_size": 4}, output={"run_name": name,
                                                                               "dir": str(tmp / "adapters")}, **sections)
        folder = run_train(load_config(job))
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [m for m in metrics if "loss" in m], json.loads((folder / "run.json").read_text())

    return _run


def test_progress_prints_plain_lines_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    import types

    from finetune.training.progress import ProgressBar

    acc = types.SimpleNamespace(is_main_process=True)
    row = {"loss": 1.25, "lr": 1e-3, "tokens_per_s": 412.4, "targets_per_s": 280.2}
    with ProgressBar(acc, total=7, every=3, terminal=False) as progress:
        for step in range(1, 8):
            progress(step, row)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["3/7", "6/7", "7/7"]  # every 3rd step and the last
    assert "loss 1.2500  lr 1.00e-03  412 tok/s  280 target/s" in lines[0] and "ETA" in lines[0]
    with ProgressBar(acc, total=1, unit="examples", terminal=False) as progress:
        progress(1, row)
    assert "280.2 examples/s" in capsys.readouterr().out


def test_job_echo_lists_what_differs_from_the_defaults(tmp_path: Path) -> None:
    from finetune.config import load_config_text
    from finetune.config.redact import redact
    from finetune.pipeline import describe_job

    cfg = load_config_text("model:\n  name_or_path: m\ndata:\n  train: t.jsonl\n  max_seq_len: 256\n"
                           "train:\n  max_steps: 40\n  seed: 42\n", check_files=False)
    text = describe_job(cfg, tmp_path / "job.yaml")
    assert text.splitlines() == [f"job: 4 settings differ from the defaults; the full resolved job is in {tmp_path / 'job.yaml'}",
                                 "  model.name_or_path: m", "  data.train: t.jsonl", "  data.max_seq_len: 256",
                                 "  train.max_steps: 40"]  # seed 42 is the default
    assert redact("  output.hub_token: abc\n  data.train: t") == "  output.hub_token: '***'\n  data.train: t"
    secret = load_config_text("model:\n  name_or_path: m\ndata:\n  train: t.jsonl\n  system_prompt: "
                              "use hf_abcdefghijklmnopqrstuvwxyz0123 now\n", check_files=False)
    echoed = redact(describe_job(secret, tmp_path / "job.yaml"))
    assert "hf_abcdefghij" not in echoed and "data.system_prompt: use *** now" in echoed


def test_bf16_runs_keep_the_frozen_base_in_bf16_and_train_in_float32(tiny_lm: Path) -> None:
    import torch

    from finetune.config.lora import LoraConfig
    from finetune.config.model import ModelConfig
    from finetune.model import load_model, training_dtype, wrap_lora

    auto = ModelConfig(name_or_path=str(tiny_lm))
    assert training_dtype(auto, "bf16", trains_base=False).dtype == "bfloat16"
    assert training_dtype(auto, "no", trains_base=False).dtype == "auto"  # fp32 runs stay float32
    assert training_dtype(auto, "bf16", trains_base=True).dtype == "auto"  # full fine-tuning: float32 weights
    assert training_dtype(auto, "bf16", trains_base=False, quantization="4bit").dtype == "auto"
    assert training_dtype(auto.model_copy(update={"dtype": "float32"}), "bf16", trains_base=False).dtype == "float32"
    base, _, _ = load_model(training_dtype(auto, "bf16", trains_base=False))
    net = wrap_lora(base, LoraConfig(r=4, alpha=8, modules_to_save=["lm_head"]))
    trained = {n: p.dtype for n, p in net.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in net.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and set(trained.values()) == {torch.float32}
    assert any("lm_head" in n for n in trained)


def test_lora_inputs_kept_in_bf16_under_autocast_change_nothing(tiny_lm: Path, examples: Any) -> None:
    """peft copies each LoRA layer's input to float32; under autocast the matmul casts it straight back, so skipping
    the copy gives bit-identical losses and gradients."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.model import autocast_lora_inputs
    from finetune.model.lora import _trained_in_float32
    from finetune.training.loss import loss_sum

    tok, exs, _ = examples
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.bfloat16)
    model = _trained_in_float32(get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                 init_lora_weights=False)))
    batch = PadCollator(tok.pad_token_id)(exs)

    def under_autocast(model: Any, batch: dict[str, Any]) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_sum(model, batch)

    want = _loss_and_grads(model, under_autocast, batch)
    with autocast_lora_inputs(model):
        assert any(getattr(m, "cast_input_dtype_enabled", True) is False for m in model.modules())
        got = _loss_and_grads(model, under_autocast, batch)
    assert got[0] == want[0]
    assert all(torch.equal(got[1][n], g) for n, g in want[1].items())
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in model.modules())  # restored


def test_classification_progress_counts_examples(tmp_path: Path, tiny_encoder: Path, train_tiny: Any,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.testing import class_rows

    train_tiny(tmp_path, tiny_encoder, class_rows(16), "cls", task="classification", steps=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("step ", "trained "))]
    assert len(lines) == 3 and all("examples" in line and "target" not in line for line in lines)
    assert "8 examples" in lines[-1]  # 2 steps x micro-batch 4
