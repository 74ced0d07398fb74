"""LoRA per batch row: one loaded base, several adapters, each row of a forward with its own adapter (or none).

peft can mix adapters in a batch (`adapter_names=`), but it re-registers a hook on every LoRA layer per forward and
splits the batch in Python per layer, which made a decode step over 2x slower than the plain forward at batch 1.
Here each plain LoRA linear layer (the common case: no DoRA, no bias training, a torch Linear base) is replaced by
a RowLoraLinear (`_row_lora_linear`), which reads one shared `RowPlan` set by the batcher before each forward:

- `base`: every row runs the base (the LoRA path is skipped);
- `single`: every row uses adapter k: y = W x + B_k A_k x (two thin matmuls);
- `mixed`: the A matrices of the adapters in the batch are stacked, so every row computes its LoRA input with one
  matmul; a 0/1 mask keeps each row's own adapter's columns (base rows keep none), and one matmul with the
  stacked B adds the update: four operations per layer however many adapters share the batch (a per-adapter
  loop costs four per adapter). The stacks are built once per set of adapters and kept while the set runs;
- `merged`: adapter k is the only one in use anywhere in the engine: y = (W + B_k A_k) x, one matmul, the speed of a
  merged model. The merged weights live in separate buffers: the base weights are never modified, so switching back
  is exact and free, and computing them again costs about one decode step (only for float32 weights: merging into
  bf16/fp16 weights would round the update away from what peft computes).

DoRA adapters run here too (peft cannot mix them in a batch): their update is W x + s B A x scaled per output by
magnitude / ||W + s B A|| (computed once at load, as peft computes it in eval mode), and merged they are
that scale times (W + s B A). Every adapter's A and B are zero-padded to its largest rank over the layers, so a
column means the same adapter in every layer and one mask per forward serves them all. Layers this does not cover
(LoRA on embeddings, quantized bases, other peft variants, modules_to_save) stay peft's, and the batcher then passes peft's own `adapter_names` for them, so
every adapter still runs, just slower.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BASE_SLOT = 0  # the slot of the base model: no adapter


@dataclass
class RowPlan:
    """Which adapter each row of the next forward uses (see the module docstring)."""

    mode: str = "base"  # base | single | mixed | merged
    adapter: int = BASE_SLOT  # single / merged: the adapter slot
    stack: tuple[int, ...] = ()  # mixed: the adapter slots whose A/B are stacked, in column order
    mask: torch.Tensor | None = None  # mixed: rows x 1 x stacked columns, 1 where the column is the row's adapter
    row_index: torch.Tensor | None = None  # mixed: each row's place in (base, *stack), for per-row DoRA scales


class RowLora:
    """The replaced layers of one model and the plan they share."""

    def __init__(self, layers: list[Any], plan: RowPlan, ranks: list[int], peft_left: bool, can_merge: bool):
        self.layers, self.plan, self.ranks = layers, plan, ranks
        self.peft_left, self.can_merge = peft_left, can_merge
        self.merged_slot: int | None = None
        self.dtype = next((a.dtype for layer in layers for a in layer.a if a is not None), None)  # the LoRA weights'

    def set_rows(self, slots: list[int], engine_slots: set[int], merge: bool, device: Any = None) -> None:
        """Plan the next forward: `slots[i]` is row i's adapter; `engine_slots` every adapter the engine is running
        (merging for this forward only pays when no other adapter runs in the steps around it)."""
        import torch

        kinds = set(slots)
        plan = self.plan
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
        plan.stack = tuple(sorted(kinds - {BASE_SLOT}))
        starts, width = {}, 0
        for slot in plan.stack:
            starts[slot], width = width, width + self.ranks[slot]
        mask = torch.zeros(len(slots), 1, width)
        for row, slot in enumerate(slots):
            if slot != BASE_SLOT:
                mask[row, 0, starts[slot] : starts[slot] + self.ranks[slot]] = 1.0
        plan.mask = mask.to(device=device, dtype=self.dtype)
        place = {slot: i + 1 for i, slot in enumerate(plan.stack)}
        plan.row_index = torch.tensor([place.get(s, 0) for s in slots], dtype=torch.long, device=device)

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

    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is PeftLoraLinear and _plain(child)]
    # each adapter's largest rank over the layers: its column block width in the stacked matrices
    ranks = [max((c.r[n] for _, _, c in swaps if n is not None and n in c.lora_A), default=0) for n in peft_names]
    plan = RowPlan()
    layers = []
    for parent, name, child in swaps:
        layer = _row_lora_linear()(child, peft_names, ranks, plan)
        setattr(parent, name, layer)
        layers.append(layer)
    peft_left = any(isinstance(m, BaseTunerLayer) for m in model.modules()) or _has_modules_to_save(model)
    can_merge = bool(layers) and all(lay.base_layer.weight.dtype == torch.float32 for lay in layers)
    return RowLora(layers, plan, ranks, peft_left, can_merge)


def _plain(layer: Any) -> bool:
    """A LoRA linear layer whose adapters are all W x + s B A x (or DoRA) on an unquantized torch Linear."""
    from torch import nn

    if not isinstance(layer.base_layer, nn.Linear) or layer.fan_in_fan_out or layer.merged:
        return False
    variants = getattr(layer, "lora_variant", {}) or {}
    dora = getattr(layer, "use_dora", {}) or {}
    lora_bias = getattr(layer, "lora_bias", {}) or {}
    return all((name not in variants or dora.get(name, False)) and not lora_bias.get(name, False)
               and name in layer.lora_B for name in layer.lora_A)


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

        def __init__(self, peft_layer: Any, peft_names: list[str | None], ranks: list[int], plan: RowPlan):
            super().__init__()
            self.base_layer = peft_layer.base_layer
            self.plan, self.ranks = plan, ranks
            # per slot: A (rank x in) and B pre-scaled by alpha/r (out x rank), zero-padded to the slot's rank, and
            # the DoRA output scale (None: plain LoRA); None where the adapter does not touch this layer
            self.a: list[torch.Tensor | None] = []
            self.b: list[torch.Tensor | None] = []
            self.dora: list[torch.Tensor | None] = []
            weight = self.base_layer.weight
            for slot, name in enumerate(peft_names):
                if name is None or name not in peft_layer.lora_A:
                    self.a.append(None)
                    self.b.append(None)
                    self.dora.append(None)
                    continue
                a = peft_layer.lora_A[name].weight.detach()
                b = peft_layer.lora_B[name].weight.detach() * peft_layer.scaling[name]
                self.dora.append(None)
                if (getattr(peft_layer, "use_dora", {}) or {}).get(name, False):
                    norm = torch.linalg.norm(weight + (b @ a).to(weight.dtype), dim=1)
                    self.dora[-1] = (peft_layer.lora_magnitude_vector[name].weight.detach() / norm).to(weight.dtype)
                pad = ranks[slot] - a.shape[0]
                self.a.append(F.pad(a, (0, 0, 0, pad)) if pad else a)
                self.b.append(F.pad(b, (0, pad)) if pad else b)
            self.merged: torch.Tensor | None = None
            self._merged_buffer: torch.Tensor | None = None
            self._stacked: tuple[tuple[int, ...], Any, Any, Any] = ((), None, None, None)

        def merge(self, slot: int) -> None:
            """W + B_k A_k (DoRA: times its scale) into this layer's own buffer; the base weight is left as it is."""
            a, b, weight = self.a[slot], self.b[slot], self.base_layer.weight
            if a is None or b is None:
                self.merged = weight
                return
            if self._merged_buffer is None:
                self._merged_buffer = torch.empty_like(weight)
            torch.addmm(weight, b.to(weight.dtype), a.to(weight.dtype), out=self._merged_buffer)
            scale = self.dora[slot]
            if scale is not None:
                self._merged_buffer.mul_(scale.unsqueeze(1))
            self.merged = self._merged_buffer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            plan = self.plan
            if plan.mode == "merged":
                assert self.merged is not None
                return F.linear(x, self.merged, self.base_layer.bias)
            if plan.mode == "base":
                return self.base_layer(x)
            if plan.mode == "single":
                a, b, scale = self.a[plan.adapter], self.b[plan.adapter], self.dora[plan.adapter]
                if a is None or b is None:
                    return self.base_layer(x)
                return self._finish(x, F.linear(F.linear(x.to(a.dtype), a), b), scale)
            a, b, scales = self._stack(plan.stack)
            if a is None:
                return self.base_layer(x)
            assert plan.mask is not None and plan.row_index is not None
            update = F.linear(F.linear(x.to(a.dtype), a) * plan.mask, b)
            return self._finish(x, update, None if scales is None else scales[plan.row_index].unsqueeze(1))

        def _finish(self, x: torch.Tensor, update: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
            """W x + update, or for DoRA rows scale * (W x + update): the bias is added after the scale."""
            if scale is None:
                y = self.base_layer(x)
                return y + update.to(y.dtype)
            y = F.linear(x, self.base_layer.weight)
            y = (y + update.to(y.dtype)) * scale
            return y if self.base_layer.bias is None else y + self.base_layer.bias

        def _stack(self, slots: tuple[int, ...]) -> tuple[Any, Any, Any]:
            """These adapters' A and B side by side (zeros for one that skips this layer), and the per-place DoRA
            scales (ones for the base and plain adapters; None when no adapter here is DoRA); kept per set."""
            if self._stacked[0] != slots:
                present = [s for s in slots if self.a[s] is not None]
                if not present:
                    self._stacked = (slots, None, None, None)
                else:
                    ref_a, ref_b = self.a[present[0]], self.b[present[0]]
                    assert ref_a is not None and ref_b is not None
                    a_parts = [self.a[s] if self.a[s] is not None else ref_a.new_zeros(self.ranks[s], ref_a.shape[1])
                               for s in slots]
                    b_parts = [self.b[s] if self.b[s] is not None else ref_b.new_zeros(ref_b.shape[0], self.ranks[s])
                               for s in slots]
                    ones = self.base_layer.weight.new_ones(ref_b.shape[0])
                    scales = None
                    if any(self.dora[s] is not None for s in slots):
                        scales = torch.stack([ones] + [d if (d := self.dora[s]) is not None else ones for s in slots])
                    self._stacked = (slots, torch.cat(a_parts, 0), torch.cat(b_parts, 1), scales)  # type: ignore[arg-type]
            return self._stacked[1], self._stacked[2], self._stacked[3]

    return RowLoraLinear
