"""Pad a list of examples into a batch. Labels come from each example's own mask, never from `input_ids == pad`,
so an EOS that doubles as pad token is still trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE = -100


@dataclass
class PadCollator:
    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, Any] = {
            "input_ids": torch.full((len(examples), width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
        }
        if "labels" in examples[0]:
            batch["labels"] = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(e["input_ids"])
            batch["attention_mask"][i, :n] = 1
            if "labels" in e:
                batch["labels"][i, :n] = torch.tensor(e["labels"])
        if "label" in examples[0]:
            batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return batch
