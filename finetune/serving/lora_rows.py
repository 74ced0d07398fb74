"""LoRA per batch row: one loaded base, several adapters, each row of a forward with its own adapter (or none).

peft can mix adapters in a batch (`adapter_names=`), but it re-registers a hook on every LoRA layer per forward and
splits the batch in Python per layer, which made a decode step over 2x slower than the plain forward at batch 1.
Here each plain LoRA linear layer (the common case: no DoRA, no bias training, a torch Linear base) is replaced by
a RowLoraLinear (`_row_lora_linear`), which reads one shared `RowPlan` set by the batcher before each forward:

- `base`: every row runs the base (the LoRA path is skipped);
- `single`: every row uses adapter k: y = W x + B_k A_k x (two thin matmuls);
- `mixed`: rows grouped by adapter, each group's LoRA output added at its rows (base rows get none);
- `merged`: adapter k is the only one in use anywhere in the engine: y = (W + B_k A_k) x, one matmul, the speed of a
  merged model. The merged weights live in separate buffers: the base weights are never modified, so switching back
  is exact and free, and computing them again costs about one decode step (only for float32 weights: merging into
  bf16/fp16 weights would round the update away from what peft computes).

Layers this does not cover (DoRA, LoRA on embeddings, quantized bases, modules_to_save) stay peft's, and the
batcher then passes peft's own `adapter_names` for them, so every adapter still runs, just slower.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BASE_SLOT = 0  # the slot of the base model: no adapter


@dataclass
class RowPlan:
    """Which adapter each row of the next forward uses (see the module docstring)."""

    mode: str = "base"  # base | single | mixed | merged
    adapter: int = BASE_SLOT  # single / merged: the adapter slot
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # mixed: (adapter slot, row indices)


class RowLora:
    """The replaced layers of one model and the plan they share."""

    def __init__(self, layers: list[Any], plan: RowPlan, peft_left: bool, can_merge: bool):
        self.layers, self.plan, self.peft_left, self.can_merge = layers, plan, peft_left, can_merge
        self.merged_slot: int | None = None

    def set_rows(self, slots: list[int], engine_slots: set[int], merge: bool, device: Any = None) -> None:
        """Plan the next forward: `slots[i]` is row i's adapter; `engine_slots` every adapter the engine is running
        (merging for this forward only pays when no other adapter runs in the steps around it)."""
        import torch

        kinds = set(slots)
        plan = self.plan
        plan.groups = []
        if kinds == {BASE_SLOT}:
            plan.mode = "base"
            return
        if len(kinds) == 1:
            plan.adapter = slots[0]
            if merge and self.can_merge and engine_slots == kinds:
                self._merge(plan.adapter)
                plan.mode = "merged"
            else:
                plan.mode = "single"
            return
        plan.mode = "mixed"
        for slot in sorted(kinds - {BASE_SLOT}):
            rows = torch.tensor([i for i, s in enumerate(slots) if s == slot], dtype=torch.long, device=device)
            plan.groups.append((slot, rows))

    def _merge(self, slot: int) -> None:
        if self.merged_slot == slot:
            return
        for layer in self.layers:
            layer.merge(slot)
        self.merged_slot = slot


def install_row_lora(model: Any, peft_names: list[str | None]) -> RowLora:
    """Replace the plain LoRA linear layers of a PeftModel by RowLoraLinear; `peft_names[slot]` is the peft adapter
    name of each slot (slot 0, the base, is None)."""
    import torch
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    plan = RowPlan()
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is PeftLoraLinear and _plain(child)]
    layers = []
    for parent, name, child in swaps:
        layer = _row_lora_linear()(child, peft_names, plan)
        setattr(parent, name, layer)
        layers.append(layer)
    peft_left = any(isinstance(m, BaseTunerLayer) for m in model.modules()) or _has_modules_to_save(model)
    can_merge = bool(layers) and all(lay.base_layer.weight.dtype == torch.float32 for lay in layers)
    return RowLora(layers, plan, peft_left, can_merge)


def _plain(layer: Any) -> bool:
    """A LoRA linear layer whose adapters are all W x + s B A x on an unquantized torch Linear."""
    from torch import nn

    if not isinstance(layer.base_layer, nn.Linear) or layer.fan_in_fan_out or layer.merged:
        return False
    variants = getattr(layer, "lora_variant", {}) or {}
    lora_bias = getattr(layer, "lora_bias", {}) or {}
    return all(name not in variants and not lora_bias.get(name, False) and name in layer.lora_B
               for name in layer.lora_A)


def _has_modules_to_save(model: Any) -> bool:
    from peft.utils.other import AuxiliaryTrainingWrapper

    return any(isinstance(m, AuxiliaryTrainingWrapper) for m in model.modules())


@functools.cache
def _row_lora_linear() -> type:
    """The RowLoraLinear class, built on first use so that importing this module does not import torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RowLoraLinear(nn.Module):
        """A linear layer with per-row LoRA adapters (see the module docstring)."""

        def __init__(self, peft_layer: Any, peft_names: list[str | None], plan: RowPlan):
            super().__init__()
            self.base_layer = peft_layer.base_layer
            self.plan = plan
            # per slot: A (r x in) and B pre-scaled by alpha/r (out x r); None where the adapter skips this layer
            self.a: list[torch.Tensor | None] = []
            self.b: list[torch.Tensor | None] = []
            for name in peft_names:
                if name is None or name not in peft_layer.lora_A:
                    self.a.append(None)
                    self.b.append(None)
                else:
                    self.a.append(peft_layer.lora_A[name].weight.detach())
                    self.b.append(peft_layer.lora_B[name].weight.detach() * peft_layer.scaling[name])
            self.merged: torch.Tensor | None = None
            self._merged_buffer: torch.Tensor | None = None

        def merge(self, slot: int) -> None:
            """W + B_k A_k into this layer's own buffer (the base weight is left as it is)."""
            a, b, weight = self.a[slot], self.b[slot], self.base_layer.weight
            if a is None or b is None:
                self.merged = weight
                return
            if self._merged_buffer is None:
                self._merged_buffer = torch.empty_like(weight)
            torch.addmm(weight, b.to(weight.dtype), a.to(weight.dtype), out=self._merged_buffer)
            self.merged = self._merged_buffer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            plan = self.plan
            if plan.mode == "merged":
                assert self.merged is not None
                return F.linear(x, self.merged, self.base_layer.bias)
            y = self.base_layer(x)
            if plan.mode == "base":
                return y
            if plan.mode == "single":
                a, b = self.a[plan.adapter], self.b[plan.adapter]
                if a is None or b is None:
                    return y
                return y + F.linear(F.linear(x.to(a.dtype), a), b).to(y.dtype)
            for slot, rows in plan.groups:
                a, b = self.a[slot], self.b[slot]
                if a is not None and b is not None:
                    sub = x.index_select(0, rows).to(a.dtype)
                    y.index_add_(0, rows, F.linear(F.linear(sub, a), b).to(y.dtype))
            return y

    return RowLoraLinear
