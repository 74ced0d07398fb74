"""Resumable checkpoints: <work>/checkpoints/step-00000042/, written through finetune.files.atomic_dir, so a crash
mid-write leaves the previous checkpoint as the newest complete one.

A checkpoint holds the trainable weights, the optimizer and scheduler states, every RNG state, the step, the data
cursor, the loop's bookkeeping (loss history, best eval, patience) and what of the job decides the math: resuming
from it replays the exact run. Nothing in it runs code when loaded: weights are safetensors, the optimizer /
scheduler / RNG states a torch file of plain tensors, numbers and strings read with `weights_only=True`, the rest
JSON. Resuming reads and checks everything before the model is touched; a damaged newest checkpoint falls back to
the previous one, and a checkpoint of another job (other LoRA shape, learning rate, data...) is refused by name.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.files import atomic_dir, remove_output, write_json

STATE_FILE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
BEST = "best.safetensors"
OPTIMIZER = "optimizer.pt"  # optimizer, scheduler and RNG states: loaded with weights_only=True
KIND = "checkpoint"
FORMAT = 2  # 1: pickled optim.pt (loading it could run code), refused
# The job settings that change what training computes: a checkpoint resumes only under the same values.
MATH = ("task", "model.name_or_path", "model.revision", "model.gguf_file", "model.dtype", "lora.enabled", "lora.r",
        "lora.alpha", "lora.dropout", "lora.target_modules", "lora.use_rslora", "lora.use_dora", "lora.modules_to_save",
        "lora.quantization", "train.seed", "train.learning_rate", "train.schedule", "train.warmup_ratio",
        "train.weight_decay", "train.max_grad_norm")


class CheckpointUnreadable(FinetuneError):
    """A checkpoint that cannot be read (damaged, incomplete, or in the old pickled format)."""


class CheckpointMismatch(FinetuneError):
    """A readable checkpoint that does not belong to this job."""


@dataclass
class LoopState:
    """Everything of the loop that is not a tensor; saved as JSON next to the tensors."""

    step: int = 0
    cursor: int = 0  # examples consumed from the global stream (see distributed.DataPlan)
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    micro_batch_size: int = 0  # after out-of-memory halving
    gradient_accumulation: int = 0


@dataclass
class Checkpoint:
    """A checkpoint read whole into memory (nothing applied yet)."""

    path: Path
    state: LoopState
    job: dict[str, Any]
    trainable: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    best: dict[str, Any] | None = None


def job_record(job: dict[str, Any], data_fingerprint: str, precision: str, effective_batch: int, total: int) -> dict[str, Any]:
    """What of the job decides the math, flat: the MATH settings, the data, the precision, the effective batch (so
    a different micro batch x accumulation with the same product resumes fine) and the planned total steps."""
    record: dict[str, Any] = {}
    for dotted in MATH:
        value: Any = job
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        record[dotted] = value
    name = record.get("model.name_or_path")
    if isinstance(name, str) and os.path.isdir(os.path.expanduser(name)):
        record["model.name_or_path"] = os.path.abspath(os.path.expanduser(name))  # the same folder, however named
    record.update({"data": data_fingerprint, "precision": precision, "effective batch": effective_batch,
                   "total steps": total})
    return record


def trainable_state(model: Any) -> dict[str, Any]:
    """A CPU copy of every trainable tensor (the LoRA weights and modules trained in full), by name."""
    return {n: p.detach().cpu().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, state: dict[str, Any]) -> None:
    """Copy a trainable_state into `model`; CheckpointMismatch unless it holds exactly the model's trainable tensors."""
    import torch

    check_trainable_fits(state, model, "checkpoint")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))


def check_trainable_fits(state: dict[str, Any], model: Any, what: str) -> None:
    """Every trainable tensor of the model is in `state` with its shape, and nothing else is."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    problems = [f"{n}: {list(v.shape)} in the {what}, {list(params[n].shape)} in this model"
                for n, v in state.items() if n in params and tuple(v.shape) != tuple(params[n].shape)]
    unknown = [n for n in state if n not in params]
    missing = [n for n in params if n not in state]
    if unknown:
        problems.append(f"{len(unknown)} tensors this model does not train, e.g. {unknown[0]}")
    if missing:
        problems.append(f"{len(missing)} trainable tensors missing, e.g. {missing[0]}")
    if problems:
        raise CheckpointMismatch(f"the {what} does not fit this model's LoRA layers: " + "; ".join(problems[:4]))


def rng_states() -> dict[str, Any]:
    """Every RNG state as plain values and tensors (numpy's key array becomes a tensor), so weights_only loads it."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    out = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                                                  int(has_gauss), float(gauss)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore the Python, numpy, torch and (when present) CUDA RNG states that rng_states recorded."""
    import numpy as np
    import torch

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(root: Path, model: Any, optimizer: Any, scheduler: Any, state: LoopState, best: dict[str, Any] | None,
                    keep: int, job: dict[str, Any] | None = None) -> Path:
    """Rank 0 writes; every rank has the same replicated states under DDP."""
    import torch
    from safetensors.torch import save_file

    final = root / f"step-{state.step:08d}"
    with atomic_dir(final, KIND, overwrite=True) as tmp:
        save_file(trainable_state(model), str(tmp / TRAINABLE))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states()},
                   tmp / OPTIMIZER)
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / BEST))
        write_json(tmp / STATE_FILE, {**asdict(state), "format": FORMAT, "job": job or {}})
    for old in list_checkpoints(root)[:-keep]:
        remove_output(old, KIND)
    return final


def clear_checkpoints(root: Path) -> None:
    """A fresh run must not resume from, or mix with, an earlier run's checkpoints."""
    for path in list_checkpoints(root):
        remove_output(path, KIND)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def read_checkpoint(path: Path) -> Checkpoint:
    """Everything of a checkpoint, read and checked; CheckpointUnreadable says what is damaged."""
    import pickle

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    record = _read_state(path)
    try:
        trainable = load_file(str(path / TRAINABLE))
        rest = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
        best = load_file(str(path / BEST)) if (path / BEST).exists() else None
    except pickle.UnpicklingError as exc:
        raise CheckpointUnreadable(f"{path}/{OPTIMIZER} holds objects other than tensors and plain values, so "
                                   f"loading it could run code; refused ({_first_line(exc)})") from None
    except (OSError, RuntimeError, EOFError, ValueError, SafetensorError) as exc:
        raise CheckpointUnreadable(f"{path}: damaged ({type(exc).__name__}: {_first_line(exc)})") from None
    if not (isinstance(rest, dict) and {"optimizer", "scheduler", "rng"} <= set(rest)):
        raise CheckpointUnreadable(f"{path}/{OPTIMIZER}: not a finetune optimizer state")
    return Checkpoint(path, record[0], record[1], trainable, rest["optimizer"], rest["scheduler"], rest["rng"], best)


def _read_state(path: Path) -> tuple[LoopState, dict[str, Any]]:
    try:
        data = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointUnreadable(f"{path}/{STATE_FILE}: unreadable ({_first_line(exc)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        if isinstance(data, dict) and "format" not in data and (path / "optim.pt").exists():
            raise CheckpointUnreadable(
                f"{path} was written by an older finetune that pickled the optimizer state (optim.pt); loading it "
                "could run code from the file, so it is refused. Start a fresh run (without train.resume)")
        raise CheckpointUnreadable(f"{path}/{STATE_FILE}: unknown checkpoint format {data.get('format') if isinstance(data, dict) else data!r}")
    names = [f.name for f in fields(LoopState)]
    if any(n not in data for n in names):
        raise CheckpointUnreadable(f"{path}/{STATE_FILE}: the loop state is incomplete")
    state = LoopState(**{n: data[n] for n in names})
    if path.name != f"step-{state.step:08d}":
        raise CheckpointUnreadable(f"{path}: its state says step {state.step}, its name another step")
    return state, dict(data.get("job") or {})


def check_fits(found: Checkpoint, model: Any, job: dict[str, Any], total: int) -> None:
    """Refuse a checkpoint beyond this run's steps, of another LoRA shape, or of a job whose math differs."""
    if found.state.step > total:
        raise CheckpointMismatch(f"{found.path} is at step {found.state.step}, beyond the {total} steps this job runs "
                                 f"(train.max_steps / train.epochs): raise train.max_steps above {found.state.step} to "
                                 "train on from it, or start a fresh run (without train.resume)")
    changed = [f"{k}: {found.job.get(k)!r} in the checkpoint, {job.get(k)!r} now" for k in job
               if k != "total steps" and k in found.job and found.job.get(k) != job.get(k)]
    if changed:
        raise CheckpointMismatch(f"{found.path} was written by a job that computes something else, so resuming "
                                 f"would not continue that run: {'; '.join(changed)}. Resume with the job it was "
                                 "trained with, or start a fresh run (without train.resume)")
    check_trainable_fits(found.trainable, model, f"checkpoint {found.path.name}")
    if found.best is not None:
        check_trainable_fits(found.best, model, f"checkpoint {found.path.name} (best weights)")


def apply_checkpoint(found: Checkpoint, model: Any, optimizer: Any, scheduler: Any) -> None:
    """Put a checked checkpoint's weights, optimizer, scheduler and RNG states in place."""
    load_trainable(model, found.trainable)
    try:
        optimizer.load_state_dict(found.optimizer)
        scheduler.load_state_dict(found.scheduler)
        set_rng_states(found.rng)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointMismatch(f"{found.path}: its optimizer or RNG state does not fit this run ({_first_line(exc)}); "
                                 "start a fresh run (without train.resume)") from None


def resume_from(resume: str | None, root: Path, model: Any, job: dict[str, Any], total: int,
                say: Callable[[str], None]) -> Checkpoint | None:
    """The checkpoint to resume from, read and checked: `resume` 'auto' takes the newest readable one of `root`
    (saying which damaged ones it passed over; None when there are none), a path takes exactly that one."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            have = ", ".join(str(p) for p in list_checkpoints(root)) or "none"
            raise FinetuneError(f"train.resume: {path} is not a checkpoint folder (no {STATE_FILE}); checkpoints of "
                                f"this run: {have}")
        found = read_checkpoint(path)
        check_fits(found, model, job, total)
        return found
    candidates = list_checkpoints(root)
    skipped: list[str] = []
    for path in reversed(candidates):
        try:
            found = read_checkpoint(path)
        except CheckpointUnreadable as exc:
            skipped.append(str(exc))
            say(f"warning: cannot resume from {path.name}: {exc}; trying the previous checkpoint")
            continue
        check_fits(found, model, job, total)
        return found
    if skipped:
        raise FinetuneError(f"train.resume=auto: none of the {len(candidates)} checkpoints under {root} can be read:\n  "
                            + "\n  ".join(skipped) + "\nStart a fresh run without train.resume (this deletes them), "
                            "or restore a checkpoint folder")
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
