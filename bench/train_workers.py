"""The contenders of bench/bench_train.py, each run in a process of its own by `run_worker`.

Every worker trains on spec["train"] in finetune's data order, for spec["steps"] optimizer steps of spec["batch"]
examples, then scores the trained model with `eval_loss` (one function for all). It reports the wall time of the
training steps (model load excluded), the tokens it read (padding excluded), the positions it computed (padding
included), the target tokens, the peak RSS at the end of training (CUDA: peak allocated) and the base dtype."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

# name -> (worker, options): options are finetune job overrides, or a TRL batching mode
CONTENDERS: dict[str, tuple[str, list[str]]] = {
    "finetune": ("finetune", []),
    "tutorial": ("tutorial", []),
    "trl-padding-free": ("trl", ["padding_free"]),
    "trl-packing": ("trl", ["packing"]),
    # the ablation ladder: the path before issue 14 (padded, float32 base, logits at every position), then each change
    "finetune-v0": ("finetune", ["data.padding_free=false", "model.dtype=float32", "all_logits"]),
    "finetune-v0+targets": ("finetune", ["data.padding_free=false", "model.dtype=float32"]),
    "finetune-v0+targets+padding-free": ("finetune", ["model.dtype=float32"]),
    "finetune+compile": ("finetune", ["train.compile=true"]),
}


def run_worker(name: str, spec: dict[str, Any], result: Path) -> int:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if name == "matmul":
        out = {**matmul_peak(spec["device"]), "params": count_params(spec["model"])}
    else:
        kind, options = CONTENDERS[name]
        out = {"finetune": run_finetune, "tutorial": run_tutorial, "trl": run_trl}[kind](spec, options)
        out.update(name=name, eval_loss=eval_loss(out.pop("model"), spec))
    result.write_text(json.dumps(out))
    return 0


def data_order(size: int, count: int, seed: int) -> list[int]:
    """finetune's global example order (finetune.training.processes.DataPlan), which every contender follows."""
    from finetune.training.processes import DataPlan

    return DataPlan(size, seed).take(count)


# --- finetune -----------------------------------------------------------------------------------------------------

def run_finetune(spec: dict[str, Any], options: list[str]) -> dict[str, Any]:
    """The real `finetune train` pipeline (data, model, loop, save and verification); timings from its run.json."""
    import yaml

    from finetune.config import load_config_text
    from finetune.lifecycle.folder import load_adapter
    from finetune.pipeline import run_train

    job = {"model": {"name_or_path": spec["model"]},
           "data": {"train": spec["train"], "format": "instruction", "max_seq_len": spec["max_len"], "cache": False},
           "lora": {"r": spec["r"], "alpha": spec["alpha"], "dropout": 0.0, "target_modules": "all-linear"},
           "train": {"max_steps": spec["steps"], "micro_batch_size": spec["batch"], "learning_rate": spec["lr"],
                     "precision": "bf16", "seed": spec["seed"], "warmup_ratio": spec["warmup_ratio"], "plot": False},
           "output": {"dir": str(Path(spec["work"]) / "adapters"), "run_name": f"bench-{os.getpid()}", "overwrite": True}}
    if "all_logits" in options:
        _use_the_old_loss()
    cpu = _clock_the_steps()
    if spec["device"] == "cuda" and _flash_attention():
        job["model"]["attn_implementation"] = "flash_attention_2"  # varlen: reads the padding-free boundaries
    cfg = load_config_text(yaml.safe_dump(job), overrides=[o for o in options if "=" in o])
    folder = run_train(cfg)
    run = json.loads((folder / "run.json").read_text())
    model, _, _ = load_adapter(folder)
    return {"seconds": run["timings"]["train_s"], "cpu_seconds": cpu[0], "peak_mb": run["timings"]["peak_memory_mb"],
            "input_tokens": run["throughput"]["input_tokens"], "positions": run["throughput"]["positions"],
            "target_tokens": run["metrics"]["tokens"], "base_dtype": run["params"]["frozen_dtype"],
            "train_loss": run["metrics"]["train_loss"], "model": model}


def _clock_the_steps() -> list[float]:
    """The process CPU time of the loop's steps (on a shared machine, the work done, whatever the waiting)."""
    from finetune.training import loop

    spent: list[float] = []
    steps = loop._Loop._steps

    def timed(self: Any, *args: Any) -> None:
        start = time.process_time()
        steps(self, *args)
        spent.append(time.process_time() - start)

    loop._Loop._steps = timed  # type: ignore[method-assign]
    return spent


def _use_the_old_loss() -> None:
    """Before issue 14 the loss ran the output layer and its float32 copy at every position."""
    import torch
    import torch.nn.functional as F

    from finetune.training import loop

    def old_loss_sum(model: Any, batch: dict[str, Any]) -> Any:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.to(torch.float32)
        targets = batch["labels"][:, 1:]
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")

    loop.loss_sum = old_loss_sum  # type: ignore[attr-defined]


# --- the tutorial recipe and TRL ----------------------------------------------------------------------------------

def _ordered_rows(spec: dict[str, Any]) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines() if line]
    return [rows[i] for i in spec["order"]]


def _user(row: dict[str, str]) -> str:
    """As finetune renders an alpaca row: the instruction, then the input after a blank line."""
    return f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]


def run_tutorial(spec: dict[str, Any], options: list[str]) -> dict[str, Any]:
    """transformers Trainer + peft, chat template, answer-only labels, DataCollatorForSeq2Seq padding."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def encode(row: dict[str, str]) -> dict[str, list[int]]:
        prompt = [{"role": "user", "content": _user(row)}]
        head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": row["output"]}], tokenize=True,
                                       return_dict=False)[: spec["max_len"]]
        labels = ([-100] * len(head) + full[len(head):])[: len(full)]
        return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}

    data = Dataset.from_list([encode(r) for r in _ordered_rows(spec)])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(spec["model"]), _lora(spec, LoraConfig))
    counter = _Counting(DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer = Trainer(model=model, args=_hf_args(spec), train_dataset=data, data_collator=counter)
    return _train_hf(trainer, counter, model, spec)


def run_trl(spec: dict[str, Any], options: list[str]) -> dict[str, Any]:
    """TRL's SFTTrainer with completion-only loss, padding-free or packed (best-fit) batches; TRL loads the model."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = _ordered_rows(spec)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": _user(r)}],
                               "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows])
    packing = "packing" in options
    batch = spec["batch"]
    if packing:  # rows of max_len tokens: about as many tokens per step as `batch` examples
        batch = max(1, round(spec["batch"] * _mean_length(spec) / spec["max_len"]))
    # padding-free without packing: TRL wants max_length None (it would not truncate); alpaca rows fit in 512 anyway
    args = _hf_args(spec, SFTConfig, max_length=spec["max_len"] if packing else None, completion_only_loss=True,
                    packing=packing, padding_free=not packing, per_device_train_batch_size=batch)
    if spec["device"] == "cuda" and _flash_attention():
        args.model_init_kwargs = {**(args.model_init_kwargs or {}), "attn_implementation": "flash_attention_2"}
    trainer = SFTTrainer(model=spec["model"], args=args, train_dataset=data, peft_config=_lora(spec, LoraConfig))
    counter = _Counting(trainer.data_collator)
    trainer.data_collator = counter
    return {**_train_hf(trainer, counter, trainer.model, spec), "batch_rows": batch}


def _flash_attention() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _mean_length(spec: dict[str, Any]) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    rows = _ordered_rows(spec)
    return sum(len(tok(_user(r) + r["output"])["input_ids"]) for r in rows) / len(rows) + 30  # + the template's tokens


def _lora(spec: dict[str, Any], cls: Any) -> Any:
    return cls(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _hf_args(spec: dict[str, Any], cls: Any = None, **extra: Any) -> Any:
    """The same schedule and optimizer as finetune's defaults; examples read in order (already in finetune's)."""
    from transformers import TrainingArguments

    values = dict(output_dir=str(Path(spec["work"]) / f"hf-{os.getpid()}"), per_device_train_batch_size=spec["batch"],
                  gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=spec["lr"],
                  lr_scheduler_type="cosine", warmup_steps=int(spec["warmup_ratio"] * spec["steps"]), weight_decay=0.0,
                  max_grad_norm=1.0, optim="adamw_torch", bf16=True, use_cpu=spec["device"] == "cpu", logging_steps=1,
                  save_strategy="no", report_to="none", seed=spec["seed"], train_sampling_strategy="sequential",
                  dataloader_num_workers=0, disable_tqdm=True)
    values.update(extra)
    return (cls or TrainingArguments)(**values)


class _Counting:
    """Wraps a data collator: tokens read (attention mask, or every position of a padding-free row), positions."""

    def __init__(self, inner: Any):
        self.inner, self.input_tokens, self.positions, self.targets = inner, 0, 0, 0

    def __call__(self, features: Any) -> Any:
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.positions += int(batch["input_ids"].numel())
        self.input_tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        self.targets += int((batch["labels"][:, 1:] != -100).sum())
        return batch


def _train_hf(trainer: Any, counter: _Counting, model: Any, spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import TrainerCallback

    clock: dict[str, float] = {}

    class Clock(TrainerCallback):  # the steps only: from the first step's start to the end of training
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.setdefault("start", time.perf_counter())
            clock.setdefault("cpu_start", time.process_time())

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock["end"], clock["cpu_end"] = time.perf_counter(), time.process_time()

    trainer.add_callback(Clock())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    dtype = next(p.dtype for p in model.parameters() if not p.requires_grad)
    return {"seconds": clock["end"] - clock["start"], "cpu_seconds": clock["cpu_end"] - clock["cpu_start"],
            "peak_mb": _peak_mb(spec), "input_tokens": counter.input_tokens,
            "positions": counter.positions, "target_tokens": counter.targets, "base_dtype": str(dtype).split(".")[-1],
            "train_loss": losses[-1] if losses else None, "model": model}


def _peak_mb(spec: dict[str, Any]) -> float:
    import torch

    if spec["device"] == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- shared measures ----------------------------------------------------------------------------------------------

def eval_loss(model: Any, spec: dict[str, Any]) -> float:
    """Mean loss per answer token on the held-out rows, the same way for every contender: finetune's tokenization
    and masks, padded batches of 8, full logits cast to float32, under bf16 autocast."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from finetune.config.data import DataConfig
    from finetune.data import build_data
    from finetune.data.collate import PadCollator
    from finetune.model.loading import set_pad_token

    tok = AutoTokenizer.from_pretrained(spec["model"])
    set_pad_token(tok)
    rows = list(build_data(DataConfig(train=spec["eval"], format="instruction", max_seq_len=spec["max_len"], cache=False,
                                      padding_free=False), tok).train)
    model = model.to(spec["device"]).eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(spec["device"], dtype=torch.bfloat16):
        for i in range(0, len(rows), 8):
            batch = {k: v.to(spec["device"]) for k, v in PadCollator(tok.pad_token_id)(rows[i: i + 8]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            targets = batch["labels"][:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum"))
            count += int((targets != -100).sum())
    return total / count


def count_params(model: str) -> int:
    """Parameters stored in the checkpoint's safetensors files (tied embeddings are stored once)."""
    from math import prod

    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            total += sum(prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not iterable)
    return total


def matmul_peak(device: str, size: int = 2048, repeats: int = 8) -> dict[str, Any]:
    """Best GFLOP/s of a size^3 matmul in bf16 and fp32 (the peak MFU is measured against)."""
    import torch

    if device == "cuda":
        size = 8192
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "size": size}
    for dtype in (torch.bfloat16, torch.float32):
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        best = float("inf")
        for _ in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        out[f"gflops_{str(dtype).split('.')[-1].replace('bfloat16', 'bf16').replace('float32', 'fp32')}"] = (
            2 * size**3 / best / 1e9)
    return out
