"""Preference pairs -> token examples and batches (train.objective dpo, orpo, simpo).

Each side of a pair is encoded exactly as an SFT example of the same prompt would be (same chat template, same
prompt rendering as inference), and only its answer is trained: the tokens after the prompt rendered with the
generation prompt, i.e. the last assistant turn and its end-of-turn tokens. `data.train_on` does not apply.

A pair is one example {chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels}. Length handling is
shared: with overlong=drop the pair goes when either side is too long; with truncate both sides are cut to
max_seq_len and the pair goes when either side has no answer token left. A batch of n pairs is one forward batch
of 2n rows: the n chosen sides, then the n rejected sides (as TRL does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.config.data import DataConfig
from finetune.data.chat import IGNORE
from finetune.data.collate import PackedCollator, PadCollator, PaddingFreeCollator
from finetune.data.encode import Counts, Encoder, Example
from finetune.data.formats import Record, preference_sides
from finetune.errors import DataError

SIDES = ("chosen", "rejected")


class PreferenceEncoder(Encoder):
    """Encodes preference records (and only those): both sides through the SFT encoder with train_on=last."""

    def __init__(self, cfg: DataConfig, tok: Any, chat: bool, labels: list[str] | None = None):
        super().__init__(cfg.model_copy(update={"train_on": "last"}), tok, chat, None)

    def encode(self, records: list[Record], wheres: list[str], counts: Counts) -> list[Example]:
        counts.rows += len(records)
        if any(r["kind"] != "preference" for r in records):
            raise DataError(f"{wheres[0]}: preference data cannot be mixed with other formats in one job")
        if self.tok.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token, so answers cannot be ended; set one in the tokenizer")
        sides = [preference_sides(r) for r in records]
        encoded = self._causal([c for c, _ in sides] + [r for _, r in sides], wheres + wheres)
        n, out = len(records), []
        for chosen, rejected in zip(encoded[:n], encoded[n:], strict=True):
            pair = self._fit_pair(chosen, rejected, counts)
            if pair is not None:
                count_pair(counts, pair)
                out.append(pair)
        return out

    def _fit_pair(self, chosen: Example, rejected: Example, counts: Counts) -> Example | None:
        n = self.cfg.max_seq_len
        if max(len(chosen["input_ids"]), len(rejected["input_ids"])) > n:
            if self.cfg.overlong == "drop":
                counts.dropped_too_long += 1
                return None
            counts.truncated += 1
        pair = {f"{side}_{key}": ex[key][:n] for side, ex in zip(SIDES, (chosen, rejected), strict=True)
                for key in ("input_ids", "labels")}
        if any(all(t == IGNORE for t in pair[f"{side}_labels"][1:]) for side in SIDES):
            counts.dropped_no_target += 1
            return None
        return pair


def count_pair(counts: Counts, pair: Example) -> None:
    """Both sides' tokens and trained tokens; the length histogram takes the longer side."""
    counts.examples += 1
    lengths = [len(pair[f"{side}_input_ids"]) for side in SIDES]
    counts.tokens += sum(lengths)
    counts.trained_tokens += sum(sum(1 for t in pair[f"{side}_labels"][1:] if t != IGNORE) for side in SIDES)
    counts.lengths[(max(lengths) - 1) // 64 * 64] += 1


def side(pair: Example, name: str) -> Example:
    """One side of an encoded pair as an ordinary {input_ids, labels} example."""
    return {"input_ids": pair[f"{name}_input_ids"], "labels": pair[f"{name}_labels"]}


@dataclass
class PreferenceCollator:
    """n pairs -> one padded batch of 2n rows: chosen sides first, then rejected sides."""

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, pairs: list[Example]) -> dict[str, Any]:
        rows = [side(p, "chosen") for p in pairs] + [side(p, "rejected") for p in pairs]
        return PadCollator(self.pad_id, self.pad_to_multiple_of)(rows)


def is_preference(examples: Any) -> bool:
    """Whether a batch source holds encoded pairs (first example has the chosen side)."""
    first = examples[0] if examples else None
    return isinstance(first, dict) and "chosen_input_ids" in first


def encoder_for(cfg: DataConfig, tok: Any, chat: bool, labels: list[str] | None, fmt: str) -> Encoder:
    """The encoder of a data plan's format."""
    return PreferenceEncoder(cfg, tok, chat) if fmt == "preference" else Encoder(cfg, tok, chat, labels)


def collator_for(cfg: DataConfig, tok: Any, fmt: str, task: str = "causal_lm"
                 ) -> PadCollator | PackedCollator | PaddingFreeCollator | PreferenceCollator:
    """The collator of a data plan's format: pairs, padding-free micro-batches, packed rows or padded examples."""
    if fmt == "preference":
        return PreferenceCollator(tok.pad_token_id)
    if cfg.padding_free and task == "causal_lm":
        return PaddingFreeCollator(tok.pad_token_id)
    if cfg.packing:
        return PackedCollator(tok.pad_token_id, varlen=cfg.packing_attention == "varlen")
    return PadCollator(tok.pad_token_id)
