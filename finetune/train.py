"""The training loop on accelerate: we own it (no transformers.Trainer) so the loss normalisation is exact."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.config.train import TrainConfig
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from torch import nn

    from finetune.data import DataBundle


@dataclass
class TrainResult:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    peak_memory_mb: float = 0.0

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"train_loss": self.losses[-1] if self.losses else None, "steps": self.steps,
                               "tokens": self.tokens}
        if self.eval_loss is not None:
            out.update(eval_loss=self.eval_loss, eval_perplexity=math.exp(min(self.eval_loss, 50)))
        return out


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    from accelerate import Accelerator

    return Accelerator(mixed_precision=resolve_precision(cfg.precision))


def resolve_precision(precision: str) -> str:
    """accelerate's mixed_precision value; fp16 on CPU is refused (accelerate would silently ignore it)."""
    import torch

    cuda = torch.cuda.is_available()
    if precision == "fp16" and not cuda:
        raise FinetuneError("train.precision=fp16 needs a CUDA GPU; on CPU use bf16 (if supported) or fp32")
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if _cpu_bf16() else "no"
    return {"fp32": "no"}.get(precision, precision)


def _cpu_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def loss_sum(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Summed (not averaged) loss of a micro-batch, so the caller can normalise over the whole accumulated batch."""
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
    logits = model(**inputs).logits.float()
    if "label" in batch:
        return F.cross_entropy(logits, batch["label"], reduction="sum")
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")


def target_count(batch: dict[str, Any]) -> int:
    if "label" in batch:
        return int(batch["label"].numel())
    return int((batch["labels"][:, 1:] != -100).sum())


def train(model: nn.Module, data: DataBundle, cfg: TrainConfig, accelerator: Accelerator, out_dir: Path) -> TrainResult:
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(data.train, batch_size=cfg.micro_batch_size, shuffle=True, collate_fn=data.collator,
                        generator=generator, num_workers=cfg.num_workers)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(loader) / cfg.gradient_accumulation))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total), num_training_steps=total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    result, start = TrainResult(), time.perf_counter()
    batches = _cycle(loader)
    with _progress(accelerator, total) as progress, _metrics_file(accelerator, out_dir) as log:
        for step in range(1, total + 1):
            loss, tokens = _optimizer_step(model, [next(batches) for _ in range(cfg.gradient_accumulation)], cfg, accelerator, optimizer, scheduler)
            if not math.isfinite(loss):
                raise FinetuneError(f"loss is {loss} at step {step}; lower train.learning_rate or check the data")
            result.steps, result.tokens = step, result.tokens + tokens
            result.losses.append(loss)
            elapsed = time.perf_counter() - start
            row = {"step": step, "loss": round(loss, 6), "lr": scheduler.get_last_lr()[0], "tokens": result.tokens,
                   "tokens_per_s": round(result.tokens / elapsed, 1), "elapsed_s": round(elapsed, 2)}
            if step % cfg.log_every == 0 or step == total:
                log(row)
            progress(step, row)
    result.seconds = time.perf_counter() - start
    if data.validation:
        result.eval_loss = evaluate_loss(model, data, cfg, accelerator)
    result.peak_memory_mb = _peak_memory_mb()
    return result


def _optimizer_step(model: Any, micro: list[dict[str, Any]], cfg: TrainConfig, accelerator: Any, optimizer: Any, scheduler: Any) -> tuple[float, int]:
    """One optimizer step over k micro-batches; each micro loss is divided by the target tokens of all k (on all
    processes), so k x batch b gives the same gradient as one batch of k*b. DDP averages gradients over processes,
    hence the factor num_processes."""
    import torch

    local = sum(target_count(b) for b in micro)
    total = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum").item())
    scale = accelerator.num_processes / max(total, 1)
    running = 0.0
    for i, batch in enumerate(micro):
        sync = nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            loss = loss_sum(model, batch) * scale
        accelerator.backward(loss)
        running += loss.detach().item()
    if cfg.max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    mean = accelerator.reduce(torch.tensor(running, device=accelerator.device), reduction="sum").item() / accelerator.num_processes
    return mean, total


def evaluate_loss(model: Any, data: DataBundle, cfg: TrainConfig, accelerator: Any) -> float:
    """Mean loss per target token over the validation set."""
    import torch
    from torch.utils.data import DataLoader

    assert data.validation is not None
    loader = accelerator.prepare(DataLoader(data.validation, batch_size=cfg.micro_batch_size, collate_fn=data.collator))
    model.eval()
    totals = torch.zeros(2, device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            with accelerator.autocast():
                totals[0] += loss_sum(model, batch)
            totals[1] += target_count(batch)
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1].clamp(min=1))


def _cycle(loader: Any) -> Iterator[dict[str, Any]]:
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _metrics_file:
    """Append one JSON line per logged step to <out_dir>/metrics.jsonl (main process only)."""

    def __init__(self, accelerator: Any, out_dir: Path):
        self.path = out_dir / "metrics.jsonl" if accelerator.is_main_process else None

    def __enter__(self) -> Any:
        if self.path is None:
            return lambda row: None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = self.path.open("a", encoding="utf-8")
        return lambda row: (self.f.write(json.dumps(row) + "\n"), self.f.flush())

    def __exit__(self, *exc: Any) -> None:
        if self.path is not None:
            self.f.close()


class _progress:
    """A rich progress bar with step/total, loss, lr, tokens/s and ETA, on the main process only."""

    def __init__(self, accelerator: Any, total: int):
        self.enabled, self.total = accelerator.is_main_process, total

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda step, row: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), transient=False)
        self.bar.start()
        task = self.bar.add_task("train", total=self.total, info="")

        def update(step: int, row: dict[str, Any]) -> None:
            info = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s"
            self.bar.update(task, completed=step, info=info)

        return update

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.stop()
