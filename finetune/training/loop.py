"""The training loop on accelerate: we own it (no transformers.Trainer) so the loss normalisation, the data order
and resuming are exact. Process setup and data order: finetune.training.processes; checkpoints: finetune.training.checkpoint;
metrics and trackers: finetune.training.trackers."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.config.train import TrainConfig
from finetune.errors import FinetuneError
from finetune.model.attention import restore_attention, use_segment_attention
from finetune.model.lora import autocast_lora_inputs
from finetune.training import checkpoint as ckpt
from finetune.training.loss import loss_sum, target_count, to_device
from finetune.training.modes import eval_mode as _eval_mode
from finetune.training.preference import Preference, evaluate_objective, make_objective, reduced_sums
from finetune.training.processes import DataPlan, rank_share, step_examples, stream_from, validation_share
from finetune.training.processes import make_accelerator as _make_accelerator
from finetune.training.profiling import PROFILE, StepProfiler
from finetune.training.progress import ProgressBar, StopSignal
from finetune.training.trackers import MetricsLog, tracker_setup

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn

    from finetune.data import DataBundle


@dataclass
class TrainResult:
    """What a run did: steps, targets trained and throughput counters, time, losses, the best step and early stop,
    the objective, and the model as accelerate prepared it (what save must gather)."""

    steps: int = 0
    tokens: int = 0  # target tokens (examples for classification), the whole run
    input_tokens: int = 0  # tokens the model read (padding excluded), this process's session
    positions: int = 0  # positions computed (padding included), this process's session
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    peak_memory_mb: float = 0.0
    best_step: int | None = None
    stopped_early: bool = False
    resumed_from: str | None = None
    model: Any = field(default=None, repr=False)  # as prepared by accelerate (DDP/FSDP-wrapped): what save must gather
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "sft"})  # name, coefficients, DPO's reference
    last: dict[str, float] = field(default_factory=dict)  # preference metrics of the last step and evaluation
    unit: str = "tokens"  # what `tokens` counts: target tokens, or examples for a classifier (one label each)

    def metrics(self) -> dict[str, Any]:
        """run.json's "metrics": last train loss, steps, targets trained (tokens, or examples for a classifier), the
        last preference metrics, eval loss (and perplexity for sft), and the best step when validation picked one."""
        out: dict[str, Any] = {"train_loss": self.losses[-1] if self.losses else None, "steps": self.steps,
                               self.unit: self.tokens, **self.last}
        if self.eval_loss is not None:
            out.update(eval_loss=self.eval_loss)
            if self.objective["name"] == "sft":
                out.update(eval_perplexity=math.exp(min(self.eval_loss, 50)))
        if self.best_step is not None:
            out.update(best_step=self.best_step, stopped_early=self.stopped_early)
        return out


def make_accelerator(cfg: TrainConfig, work: Path | None = None) -> Accelerator:
    """The Accelerator for train.precision and train.trackers, trackers writing under `work`. Raises FinetuneError for
    a precision this machine cannot run, or when not every launched process joined."""
    if cfg.trackers and work is not None:
        tracker_setup(list(cfg.trackers), work)
    return _make_accelerator(cfg.precision, list(cfg.trackers), str(work) if work else None)


def train(model: nn.Module, data: DataBundle, cfg: TrainConfig, accelerator: Accelerator, out_dir: Path,
          hparams: dict[str, Any] | None = None, start_adapter: str | None = None,
          start_files: dict[str, str] | None = None) -> TrainResult:
    """Train `model` in place; `out_dir` (the run's work folder) receives metrics, checkpoints and the profile, and
    `start_files` (name -> text, e.g. the resolved job) once the run has started: a run refused before its first step
    (a checkpoint that does not match) writes nothing. `start_adapter`: the adapter folder the model's LoRA weights
    were loaded from (DPO's reference is then that adapter, frozen, instead of the base)."""
    return _Loop(model, data, cfg, accelerator, out_dir, hparams or {}, start_adapter, start_files or {}).run()


def total_steps(cfg: TrainConfig, size: int | None, world: int) -> int:
    """Optimizer steps of the run: train.max_steps, else epochs over `size` examples at the effective batch (micro
    batch x accumulation x `world` processes), at least 1. FinetuneError for a stream (size None) without max_steps."""
    if cfg.max_steps:
        return cfg.max_steps
    if size is None:
        raise FinetuneError("train.max_steps is required with a streaming dataset (its length is unknown)")
    return max(1, math.ceil(cfg.epochs * size / (cfg.micro_batch_size * cfg.gradient_accumulation * world)))


def is_sized(dataset: Any) -> bool:
    """Map-style (indexable, with a length) as opposed to a stream, whose __len__ may exist only to raise."""
    from torch.utils.data import IterableDataset

    return not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


def setup_model(model: Any, cfg: TrainConfig) -> None:
    """Turn on gradient checkpointing when train.gradient_checkpointing asks (non-reentrant; KV cache off)."""
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing gives gradients to LoRA weights even though the frozen inputs need none.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False


class _Sft:
    """The SFT objective in the preference objectives' shape (finetune.training.preference): the summed loss over
    target tokens divided by the step's target tokens."""

    name, size = "sft", 1

    def counts(self, batch: dict[str, Any]) -> list[int]:
        return [target_count(batch)]

    def loss(self, model: Any, batch: dict[str, Any], totals: list[int], world: int) -> tuple[Any, dict[str, Any]]:
        return loss_sum(model, batch) * (world / max(totals[0], 1)), {}

    def summary(self, sums: dict[str, float], totals: list[int]) -> dict[str, float]:
        return {}


class _Loop:
    def __init__(self, model: Any, data: Any, cfg: TrainConfig, acc: Any, work: Path, hparams: dict[str, Any],
                 start_adapter: str | None = None, start_files: dict[str, str] | None = None):
        import torch
        from transformers import get_scheduler

        self.cfg, self.acc, self.data, self.work = cfg, acc, data, work
        self.start_files = start_files or {}  # written into `work` when the run starts (see train)
        if cfg.eval_every and not data.validation:
            raise FinetuneError("train.eval_every needs validation data: set data.validation (or data.val_size)")
        setup_model(model, cfg)
        self.preference = make_objective(cfg, start_adapter)
        self.objective: Preference | _Sft = self.preference or _Sft()
        if self.preference is not None:
            self.preference.attach(model)  # before the optimizer collects the trainable parameters
        self.last: dict[str, float] = {}
        self.collate, self.attention = self._batching(model, data.collator)
        self.seen = [0, 0, 0]  # this session: target tokens, input tokens, positions (rates survive a resume)
        sized = is_sized(data.train)
        self.plan = DataPlan(len(data.train) if sized else None, cfg.seed)
        self.total = total_steps(cfg, self.plan.size, acc.num_processes)
        self.per_step = cfg.micro_batch_size * cfg.gradient_accumulation * acc.num_processes
        self.state = ckpt.LoopState(micro_batch_size=cfg.micro_batch_size, gradient_accumulation=cfg.gradient_accumulation)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        # Not passed to accelerate.prepare: its wrapper steps the schedule once per process, so 2 processes would
        # decay the learning rate twice as fast as 1.
        self.scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=int(cfg.warmup_ratio * self.total),
                                       num_training_steps=self.total)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.inner = acc.unwrap_model(self.model)
        self.prepared = self.model  # what save gathers from: a compiled wrapper would prefix every key with _orig_mod.
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.best: dict[str, Any] | None = None
        self.ckpt_dir = work / "checkpoints"
        effective = cfg.micro_batch_size * cfg.gradient_accumulation * acc.num_processes
        self.job = ckpt.job_record(hparams, getattr(data, "fingerprint", ""), str(acc.mixed_precision), effective,
                                   self.total)
        self.resumed = self._resume()
        if self.resumed is None and acc.is_main_process:
            ckpt.clear_checkpoints(self.ckpt_dir)
        # A classifier's loss has one target per example: its counts are examples, not tokens.
        self.unit = "examples" if getattr(data, "labels", None) is not None else "tokens"
        self.log = MetricsLog(acc, work, work.name, hparams, list(cfg.trackers), self.unit)
        self.stream = None if sized else stream_from(data.train, self.plan.cursor)

    def _batching(self, model: Any, collator: Any) -> tuple[Any, str | None]:
        """Padding-free batches need attention that keeps their examples apart; other kernels get padded batches."""
        if not getattr(collator, "padding_free", False):
            return collator, None
        try:
            return collator, use_segment_attention(model)
        except ValueError as exc:
            self.acc.print(f"padded batches: {exc} (padding-free batches need model.attn_implementation auto, sdpa or "
                           "flash_attention_2)")
            return collator.padded, None

    def _resume(self) -> Path | None:
        found = ckpt.resume_from(self.cfg.resume, self.ckpt_dir, self.inner, self.job, self.total, self.acc.print)
        if found is None:
            return None
        ckpt.apply_checkpoint(found, self.inner, self.optimizer, self.scheduler)
        self.state, self.best = found.state, found.best
        self.plan.cursor = self.state.cursor
        self.acc.print(f"resumed from {found.path} at step {self.state.step} (example {self.state.cursor})")
        planned = found.job.get("total steps")
        if planned not in (None, self.total):
            self.acc.print(f"note: this run now has {self.total} steps where the checkpoint's run planned {planned}: "
                           f"from step {self.state.step} on, the learning rate follows the schedule over {self.total}")
        return found.path

    def run(self) -> TrainResult:
        result, start = TrainResult(resumed_from=str(self.resumed) if self.resumed else None, unit=self.unit), time.perf_counter()
        self.log.start(self.state.step if self.resumed else None)
        if self.acc.is_main_process:
            for name, text in self.start_files.items():
                (self.work / name).write_text(text, encoding="utf-8")
        self.model.train()
        with self._fast_paths():
            self._steps(result, start)
            self._finish(result, start)
        return result

    @contextmanager
    def _fast_paths(self) -> Iterator[None]:
        """Per-example attention for padding-free batches and, under autocast, LoRA inputs kept in bf16; both undone
        afterwards, so the trained model runs as plain transformers + peft (the save verification, later use)."""
        casting = autocast_lora_inputs(self.inner) if self.acc.mixed_precision != "no" else nullcontext()
        try:
            with casting:
                yield
        finally:
            restore_attention(self.inner, self.attention)

    def _steps(self, result: TrainResult, start: float) -> None:
        profiler = StepProfiler(self.cfg.profile_steps, self.work / PROFILE, self.acc.is_main_process, self.state.step + 1)
        unit = "examples" if self.unit == "examples" else "target tokens"
        with ProgressBar(self.acc, self.total, self.state.step, self.cfg.log_every, unit) as progress, StopSignal() as stop:
            while self.state.step < self.total:
                row = self._step(start)
                progress(self.state.step, row)
                profiler.step_done(self.state.step)
                early = self._maybe_evaluate(row)
                if self._log_due() or "eval_loss" in row:
                    self.log.log(row)
                if self._stop_requested(stop):
                    path = self._checkpoint()
                    raise FinetuneError(f"interrupted at step {self.state.step}: checkpoint saved to {path}; resume with "
                                        "train.resume=auto (same job file)")
                if self.cfg.checkpoint_every and self.state.step % self.cfg.checkpoint_every == 0:
                    self._checkpoint()
                if early:
                    result.stopped_early = True
                    self.acc.print(f"early stopping at step {self.state.step}: no better eval loss in "
                                   f"{self.cfg.early_stopping_patience} evaluations (best at step {self.state.best_step})")
                    break
        profiler.finish()

    def _step(self, start: float) -> dict[str, Any]:
        rows = step_examples(self.data.train, self.plan, self.stream, self.per_step)
        step = self.state.step + 1
        loss, tokens, inputs, positions, extra = self._optimizer_step_with_oom_retry(rows, step)
        s = self.state
        s.step, s.cursor, s.tokens = step, self.plan.cursor, s.tokens + tokens
        s.losses.append(loss)
        self.last.update(extra)
        self.seen = [self.seen[0] + tokens, self.seen[1] + inputs, self.seen[2] + positions]
        elapsed = max(time.perf_counter() - start, 1e-9)
        return {"step": step, "loss": loss, **extra, "lr": self.scheduler.get_last_lr()[0], "tokens": s.tokens,
                "tokens_per_s": round(self.seen[1] / elapsed, 1), "targets_per_s": round(self.seen[0] / elapsed, 1),
                "elapsed_s": round(elapsed, 2)}

    def _optimizer_step_with_oom_retry(self, rows: list[Any], step: int) -> tuple[float, int, int, int, dict[str, float]]:
        import torch

        while True:
            try:
                return self._optimizer_step(rows, step)
            except torch.OutOfMemoryError:
                self._halve_micro_batch(step)

    def _halve_micro_batch(self, step: int) -> None:
        """Same effective batch, half the activation memory: the step is retried on the same examples."""
        import torch

        s = self.state
        if not self.cfg.oom_retry or s.micro_batch_size == 1 or self.acc.num_processes > 1:
            raise FinetuneError(f"out of memory at step {step} with micro_batch_size={s.micro_batch_size}: lower "
                                "train.micro_batch_size (raise gradient_accumulation to keep the effective batch), "
                                "or set train.gradient_checkpointing=true")
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        s.micro_batch_size, s.gradient_accumulation = math.ceil(s.micro_batch_size / 2), s.gradient_accumulation * 2
        self.acc.print(f"out of memory at step {step}: micro_batch_size -> {s.micro_batch_size}, gradient_accumulation"
                       f" -> {s.gradient_accumulation} (same effective batch); retrying the step")

    def _optimizer_step(self, rows: list[Any], step: int) -> tuple[float, int, int, int, dict[str, float]]:
        """One optimizer step over this rank's micro-batches; each micro loss is divided by the target tokens (the
        objective's counts: pairs for preference losses) of the whole step on all processes, so w processes x k
        micro-batches of b give the gradient of one batch of w*k*b. DDP averages gradients over processes, hence the
        factor num_processes. Returns the loss, the step's target count (all processes), this rank's input tokens and
        positions, and the objective's metrics."""
        import torch

        acc, s, objective = self.acc, self.state, self.objective
        shares = [m for m in rank_share(rows, s.micro_batch_size, s.gradient_accumulation, acc.process_index,
                                        acc.num_processes) if m]
        micro = [self.collate(m) for m in shares]
        inputs = sum(_input_tokens(r) for m in shares for r in m)
        local = torch.tensor([sum(c) for c in zip(*(objective.counts(b) for b in micro), strict=True)] or [0] * objective.size)
        totals = [int(t) for t in acc.reduce(local.to(acc.device), reduction="sum").tolist()]
        running = torch.zeros((), device=acc.device)
        sums: dict[str, Any] = {}
        for i, batch in enumerate(micro):
            batch = to_device(batch, acc.device)
            sync = nullcontext() if i == len(micro) - 1 else acc.no_sync(self.model)
            with sync, acc.autocast():
                loss, stats = objective.loss(self.model, batch, totals, acc.num_processes)
            acc.backward(loss)
            running += loss.detach()
            sums = {k: sums.get(k, 0) + v for k, v in stats.items()}
        mean = float(acc.reduce(running, reduction="sum").item()) / acc.num_processes
        if not math.isfinite(mean):
            self.optimizer.zero_grad(set_to_none=True)
            last = ckpt.list_checkpoints(self.ckpt_dir)
            raise FinetuneError(f"loss is {mean} at step {step}; the weights were not updated. Last good checkpoint: "
                                f"{last[-1] if last else 'none'}. Lower train.learning_rate, use fp32/bf16, or check the data.")
        if self.cfg.max_grad_norm:
            acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (mean, totals[0], inputs, sum(int(b["input_ids"].numel()) for b in micro),
                objective.summary(reduced_sums(acc, sums), totals))

    def _log_due(self) -> bool:
        return self.state.step % self.cfg.log_every == 0 or self.state.step == self.total

    def _maybe_evaluate(self, row: dict[str, Any]) -> bool:
        """Evaluate when due; returns True when early stopping says stop."""
        every, step = self.cfg.eval_every, self.state.step
        # The last step is always evaluated (into its own metrics row) when there is validation data.
        if not (self.data.validation and ((every and step % every == 0) or step == self.total)):
            return False
        self._record_eval(row)
        patience = self.cfg.early_stopping_patience
        return bool(patience and self.state.bad_evals >= patience)

    def _record_eval(self, row: dict[str, Any]) -> None:
        if self.preference is None:
            loss = evaluate_loss(self.inner, self.data, self.state.micro_batch_size, self.acc, self.collate)
            row.update(eval_loss=loss, eval_perplexity=math.exp(min(loss, 50)))
        else:
            loss, extra = evaluate_objective(self.preference, self.inner, self.data, self.state.micro_batch_size, self.acc)
            row.update(eval_loss=loss, **extra)
            self.last.update(extra)
        s = self.state
        s.evals.append({"step": s.step, "eval_loss": loss})
        if s.best_loss is None or loss < s.best_loss:
            s.best_loss, s.best_step, s.bad_evals = loss, s.step, 0
            self.best = ckpt.trainable_state(self.inner) if self.cfg.keep_best else None
        else:
            s.bad_evals += 1

    def _stop_requested(self, stop: StopSignal) -> bool:
        """A signal may reach only some processes; all must agree to stop at the same step."""
        import torch

        flag = torch.tensor(1.0 if stop.received else 0.0, device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    def _checkpoint(self) -> Path:
        path = self.ckpt_dir / f"step-{self.state.step:08d}"
        if self.acc.is_main_process:
            ckpt.save_checkpoint(self.ckpt_dir, self.inner, self.optimizer, self.scheduler, self.state, self.best,
                                 self.cfg.keep_last, self.job)
        self.acc.wait_for_everyone()
        return path

    def _finish(self, result: TrainResult, start: float) -> None:
        s = self.state
        if self.data.validation and (not s.evals or s.evals[-1]["step"] != s.step):
            row = {"step": s.step}
            self._record_eval(row)
            self.log.log(row)
        if self.cfg.keep_best and self.best is not None and s.best_step != s.step:
            ckpt.load_trainable(self.inner, self.best)
            self.acc.print(f"keeping the best adapter: step {s.best_step} (eval loss {s.best_loss:.4f})")
        self.log.close()
        if self.preference is not None:
            self.preference.detach(self.inner)  # DPO's frozen reference adapter is not part of the result
            result.objective, result.last = self.preference.describe(), dict(self.last)
        result.steps, result.tokens, result.losses, result.model = s.step, s.tokens, list(s.losses), self.prepared
        result.input_tokens, result.positions = self.seen[1], self.seen[2]
        result.eval_loss, result.best_step = s.best_loss, s.best_step
        result.seconds = time.perf_counter() - start
        result.peak_memory_mb = _peak_memory_mb()
        counted = "examples" if self.unit == "examples" else "target tokens"
        self.acc.print(f"trained {s.step} steps in {result.seconds:.1f}s: {result.input_tokens:,} input tokens "
                       f"({result.input_tokens / max(result.seconds, 1e-9):,.0f}/s), {s.tokens:,} {counted}, "
                       f"peak memory {result.peak_memory_mb:,.0f} MB")


def evaluate_loss(model: Any, data: DataBundle, batch_size: int, accelerator: Any, collate: Any = None) -> float:
    """Mean loss per target token over the validation set; rank r evaluates examples r, r+w, ... (no repeats).
    `collate`: how batches are formed (default the bundle's collator)."""
    import torch

    assert data.validation is not None
    rows = validation_share(data.validation, accelerator.process_index, accelerator.num_processes)
    was_training = model.training
    _eval_mode(model)
    totals = torch.zeros(2, device=accelerator.device)
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = to_device((collate or data.collator)(rows[i: i + batch_size]), accelerator.device)
            with accelerator.autocast():
                totals[0] += loss_sum(model, batch)
            totals[1] += target_count(batch)
    model.train(was_training)
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1].clamp(min=1))


def _input_tokens(row: dict[str, Any]) -> int:
    """The tokens the model reads for one example (both answers of a preference pair)."""
    if "input_ids" in row:
        return len(row["input_ids"])
    return sum(len(v) for k, v in row.items() if k.endswith("input_ids"))


def _peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
