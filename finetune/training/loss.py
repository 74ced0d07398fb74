"""The loss, shared by training and evaluation so both score exactly the same tokens: summed (not averaged) over
the target tokens of a batch, so callers can normalise over a whole accumulated step or a whole dataset."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


def loss_sum(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Summed (not averaged) loss of a micro-batch, so the caller can normalise over the whole accumulated batch."""
    import torch
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
    logits = model(**inputs).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision up; float64 (tests) kept
    if "label" in batch:
        return F.cross_entropy(logits, batch["label"], reduction="sum")
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")


def target_count(batch: dict[str, Any]) -> int:
    """How many targets `loss_sum` sums over: label tokens (causal LM) or examples (classification)."""
    if "label" in batch:
        return int(batch["label"].numel())
    return int((batch["labels"][:, 1:] != -100).sum())
