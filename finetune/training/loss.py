"""The loss, shared by training and evaluation so both score exactly the same tokens: summed (not averaged) over
the target tokens of a batch, so callers can normalise over a whole accumulated step or a whole dataset.

A causal LM's output layer runs only where there is loss: the positions whose next label is not -100 are handed to
the model as `logits_to_keep` (a boolean mask, transformers >= 5), so the vocabulary-wide projection and its float32
copy cover the target tokens alone instead of every position of the batch (answer-only chat data: about half of the
real tokens, and none of the padding). Models whose forward cannot select positions return every position's logits
and are sliced here: the same numbers, at the old cost. In training (gradients on) the output layer and the
cross-entropy run in chunks without any logits tensor (finetune.training.head_loss)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.training.head_loss import chunked_loss_sum

if TYPE_CHECKING:
    import torch
    from torch import nn

IGNORE = -100
NOT_MODEL_INPUTS = ("labels", "label")


@dataclass
class TargetLogits:
    """The logits at the positions that carry loss, flattened over the batch: `logits` (n, vocab), `targets` (n,),
    `example` (n,): which example of the batch each target belongs to (its row, or its segment in a padding-free
    row), for objectives that need a per-example sum (preference tuning)."""

    logits: torch.Tensor
    targets: torch.Tensor
    example: torch.Tensor


def loss_sum(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Summed (not averaged) loss of a micro-batch, so the caller can normalise over the whole accumulated batch."""
    import torch
    import torch.nn.functional as F

    if "label" in batch:
        logits = model(**model_inputs(batch)).logits
        return F.cross_entropy(_float(logits), batch["label"], reduction="sum")
    if torch.is_grad_enabled() and selects_positions(model):  # training: no logits tensor at all
        fused = chunked_loss_sum(model, _inner(model), model_inputs(batch), batch["labels"])
        if fused is not None:
            return fused
    out = target_logits(model, batch)
    return F.cross_entropy(_float(out.logits), out.targets, reduction="sum")


def target_logits(model: nn.Module, batch: dict[str, Any]) -> TargetLogits:
    """A causal LM's logits where the next label is a target (label t+1 is predicted at position t)."""
    import torch.nn.functional as F

    labels = batch["labels"]
    keep = F.pad(labels[:, 1:] != IGNORE, (0, 1), value=False)  # (batch, length): position t predicts label t+1
    targets = labels[:, 1:][keep[:, :-1]]
    inputs = model_inputs(batch)
    if selects_positions(model):
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        logits = logits if logits.dim() == 2 else logits[keep]
    else:
        logits = model(**inputs).logits[keep]
    return TargetLogits(logits, targets, _example_of(batch, keep))


def target_count(batch: dict[str, Any]) -> int:
    """How many targets `loss_sum` sums over: label tokens (causal LM) or examples (classification)."""
    if "label" in batch:
        return int(batch["label"].numel())
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What the model's forward takes: everything but the labels (ids, masks, positions, example boundaries)."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """Tensors moved; plain values (a padding-free batch's longest example) kept."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def processed_tokens(batch: dict[str, Any]) -> int:
    """Positions the model computes, padding included: what tokens/s measures."""
    return int(batch["input_ids"].numel())


_SELECTS: dict[type, bool] = {}


def selects_positions(model: Any) -> bool:
    """Whether the model's forward takes a boolean `logits_to_keep` mask (through DDP, compile and peft wrappers)."""
    from transformers import modeling_utils

    kind = type(_inner(model))
    if kind not in _SELECTS:
        try:
            takes = "logits_to_keep" in inspect.signature(kind.forward).parameters
        except (TypeError, ValueError):
            takes = False
        # the boolean (batch, length) form arrived with this helper; older versions read it as positions
        _SELECTS[kind] = takes and hasattr(modeling_utils, "slice_logits_to_keep")
    return _SELECTS[kind]


def _inner(model: Any) -> Any:
    """The transformers model inside DDP, compile and peft wrappers."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _example_of(batch: dict[str, Any], keep: torch.Tensor) -> torch.Tensor:
    import torch

    rows, positions = keep.nonzero(as_tuple=True)
    bounds = batch.get("cu_seq_lens_q")
    if bounds is None or keep.shape[0] != 1:
        return rows
    return torch.bucketize(positions, bounds[1:].to(positions.device), right=True)


def _float(logits: torch.Tensor) -> torch.Tensor:
    import torch

    return logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision up; float64 (tests) kept
