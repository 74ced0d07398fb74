"""Resumable checkpoints: <work>/checkpoints/step-00000042/, written through finetune.files.atomic_dir, so a crash
mid-write leaves the previous checkpoint as the newest complete one.

A checkpoint holds the trainable weights, the optimizer and scheduler states, every RNG state, the step, the data
cursor, and the loop's bookkeeping (loss history, best eval, patience): resuming from it replays the exact run.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.files import atomic_dir, remove_output, write_json

STATE_FILE = "trainer_state.json"
KIND = "checkpoint"


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


def trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, state: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise FinetuneError(f"checkpoint does not fit this model: unknown parameters {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))


def rng_states() -> dict[str, Any]:
    import numpy as np
    import torch

    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(root: Path, model: Any, optimizer: Any, scheduler: Any, state: LoopState, best: dict[str, Any] | None, keep: int) -> Path:
    """Rank 0 writes; every rank has the same replicated states under DDP."""
    import torch

    final = root / f"step-{state.step:08d}"
    with atomic_dir(final, KIND, overwrite=True) as tmp:
        torch.save(trainable_state(model), tmp / "trainable.pt")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states()}, tmp / "optim.pt")
        if best is not None:
            torch.save(best, tmp / "best.pt")
        write_json(tmp / STATE_FILE, asdict(state))
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


def find_resume(resume: str | None, root: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        have = ", ".join(str(p) for p in list_checkpoints(root)) or "none"
        raise FinetuneError(f"train.resume: {path} is not a checkpoint folder (no {STATE_FILE}); checkpoints of this run: {have}")
    return path


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> tuple[LoopState, dict[str, Any] | None]:
    import torch

    load_trainable(model, torch.load(path / "trainable.pt", map_location="cpu"))
    rest = torch.load(path / "optim.pt", map_location="cpu", weights_only=False)  # our own file: RNG states are tuples
    optimizer.load_state_dict(rest["optimizer"])
    scheduler.load_state_dict(rest["scheduler"])
    set_rng_states(rest["rng"])
    best = torch.load(path / "best.pt", map_location="cpu") if (path / "best.pt").exists() else None
    return LoopState(**json.loads((path / STATE_FILE).read_text())), best
