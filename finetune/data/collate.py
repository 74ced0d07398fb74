"""Batch examples. Labels come from each example's own mask, never from `input_ids == pad`, so an EOS that doubles
as pad token is still trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE = -100


@dataclass
class PadCollator:
    """Unpacked examples -> a right-padded batch: input_ids, attention_mask, labels (-100 on padding), plus
    token_type_ids and the class `label` when the examples have them; width rounded up to pad_to_multiple_of."""

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = _width(examples, self.pad_to_multiple_of)
        batch: dict[str, Any] = {
            "input_ids": _pad(examples, "input_ids", width, self.pad_id),
            "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
        }
        for i, e in enumerate(examples):
            batch["attention_mask"][i, : len(e["input_ids"])] = 1
        if "labels" in examples[0]:
            batch["labels"] = _pad(examples, "labels", width, IGNORE)
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = _pad(examples, "token_type_ids", width, 0)
        if "label" in examples[0]:
            batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return batch


@dataclass
class PackedCollator:
    """Packed rows (with `seq_lens`) -> input_ids, labels, position_ids restarting per example, and either a 4D
    block-diagonal causal mask (position ids alone do NOT stop cross-attention in sdpa/eager) or no mask at all
    (varlen: flash attention finds the example boundaries from the position ids).

    transformers hands a 4D mask to the kernel as it is: sdpa reads a boolean one, but eager *adds* the mask to
    the scores, so a boolean mask would leak there. The default is therefore additive (0 / most negative float),
    which both read correctly; mask_dtype="bool" saves memory where only sdpa is used."""

    pad_id: int
    varlen: bool = False
    pad_to_multiple_of: int | None = None
    mask_dtype: str = "float32"  # additive in float32 / bfloat16 / float64, or "bool"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = _width(rows, self.pad_to_multiple_of)
        # an unpacked example (e.g. a streamed validation example) is a row of one
        segments = [_segments(r.get("seq_lens") or [len(r["input_ids"])], width) for r in rows]
        positions = torch.tensor([[p for n in seg for p in range(n)] for seg in segments], dtype=torch.long)
        batch: dict[str, Any] = {"input_ids": _pad(rows, "input_ids", width, self.pad_id),
                                 "labels": _pad(rows, "labels", width, IGNORE), "position_ids": positions}
        if not self.varlen:
            allowed = torch.stack([block_causal_mask(seg) for seg in segments])[:, None]
            batch["attention_mask"] = allowed if self.mask_dtype == "bool" else additive(allowed, self.mask_dtype)
        return batch


@dataclass
class PaddingFreeCollator:
    """A micro-batch as ONE row without padding: the examples (or the examples of packed rows) one after another,
    position ids restarting per example, and the example boundaries as `cu_seq_lens_q/k` + `max_length_q/k` (the
    names transformers' flash-attention path reads; finetune.model.attention reads them on sdpa). Attention stays
    inside each example, so loss and gradients equal the padded batch's while no position is spent on padding.

    The first label of each example is masked: the row's shifted loss would otherwise predict it from the previous
    example's last token (a padded example never uses its first label either, so nothing trained is lost)."""

    pad_id: int  # for `padded`, the same rows as a padded batch (probes, and models that cannot take segments)

    padding_free = True  # the training loop switches the model to per-example attention for these batches

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        lens = [n for r in rows for n in (r.get("seq_lens") or [len(r["input_ids"])])]
        ids = [t for r in rows for t in r["input_ids"]]
        labels = [t for r in rows for t in r["labels"]]
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        for s in starts[:-1]:
            labels[s] = IGNORE
        cu = torch.tensor(starts, dtype=torch.int32)
        longest = max(lens)
        return {"input_ids": torch.tensor([ids], dtype=torch.long), "labels": torch.tensor([labels], dtype=torch.long),
                "position_ids": torch.tensor([[p for n in lens for p in range(n)]], dtype=torch.long),
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}

    def padded(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The same examples as a padded batch (packed rows keep their block mask)."""
        if any(r.get("seq_lens") for r in rows):
            return PackedCollator(self.pad_id)(rows)
        return PadCollator(self.pad_id)(rows)


def additive(allowed: Any, dtype_name: str) -> Any:
    """The boolean mask `allowed` as an additive one of torch dtype `dtype_name`: 0 where allowed, else its minimum."""
    import torch

    dtype = getattr(torch, dtype_name)
    out = torch.zeros(allowed.shape, dtype=dtype)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


def block_causal_mask(seq_lens: list[int]) -> Any:
    """(L, L) bool, True where query i may attend key j: same example and j <= i."""
    import torch

    ids = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
    same = ids[:, None] == ids[None, :]
    return same & torch.ones_like(same).tril()


def _segments(seq_lens: list[int], width: int) -> list[int]:
    """The trailing padding is one more segment, so pad rows attend only to pad (no fully masked softmax rows)."""
    pad = width - sum(seq_lens)
    return list(seq_lens) + ([pad] if pad else [])


def _width(examples: list[dict[str, Any]], multiple: int | None) -> int:
    width = max(len(e["input_ids"]) for e in examples)
    return -(-width // multiple) * multiple if multiple else width


def _pad(examples: list[dict[str, Any]], key: str, width: int, value: int) -> Any:
    import torch

    out = torch.full((len(examples), width), value, dtype=torch.long)
    for i, e in enumerate(examples):
        out[i, : len(e[key])] = torch.as_tensor(e[key], dtype=torch.long)
    return out
