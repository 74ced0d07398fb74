"""Canonical records -> token examples, a batch at a time (one tokenizer call per batch), with the length policy.

Causal LM examples are {input_ids, labels} (labels -100 where not trained); classification examples are
{input_ids, label} (plus token_type_ids when the tokenizer makes them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from finetune.config.data import DataConfig
from finetune.data.chat import IGNORE, ChatEncoder
from finetune.data.formats import Record
from finetune.data.prompting import prompt_ids
from finetune.errors import DataError

Example = dict[str, Any]


@dataclass
class Counts:
    """What the length policy did; goes into the bundle's stats."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: Counter[int] = field(default_factory=Counter)  # histogram in buckets of 64 tokens

    def add(self, ex: Example) -> None:
        n = len(ex["input_ids"])
        self.examples += 1
        self.tokens += n
        self.trained_tokens += sum(1 for t in ex["labels"][1:] if t != IGNORE) if "labels" in ex else 1
        self.lengths[(n - 1) // 64 * 64] += 1


class Encoder:
    """Canonical records -> token examples under the length policy (data.max_seq_len, data.overlong); chats go
    through a ChatEncoder when `chat`, and class names in `labels` map to their index."""

    def __init__(self, cfg: DataConfig, tok: Any, chat: bool, labels: list[str] | None):
        self.cfg, self.tok, self.chat = cfg, tok, chat
        self.chat_encoder = ChatEncoder(tok, cfg.train_on) if chat else None
        self.label_index = {name: i for i, name in enumerate(labels or [])}

    def encode(self, records: list[Record], wheres: list[str], counts: Counts) -> list[Example]:
        """Records of one kind; returns the examples that survive the length policy."""
        counts.rows += len(records)
        kind = records[0]["kind"]
        if kind != "cls" and self.tok.eos_token_id is None:
            # Classification needs no EOS (encoders such as BERT have none); generation does.
            raise DataError("the tokenizer has no EOS token, so answers cannot be ended; set one in the tokenizer")
        if kind == "cls":
            raw = self._classification(records, wheres)
        elif kind == "text":
            return self._text(records, counts)
        else:
            raw = self._causal(records, wheres)
        out = []
        for ex in raw:
            fitted = self._fit(ex, counts)
            if fitted is not None:
                counts.add(fitted)
                out.append(fitted)
        return out

    def _causal(self, records: list[Record], wheres: list[str]) -> list[Example]:
        if self.chat_encoder is not None:
            return self.chat_encoder.encode([_as_messages(r) for r in records], wheres)
        if any(r["kind"] == "chat" for r in records):
            raise DataError(f"{wheres[0]}: chat rows need the chat template, but data.use_chat_template is never")
        return self._pairs_plain(records)

    def _pairs_plain(self, records: list[Record]) -> list[Example]:
        """Prompt tokenized alone with the tokenizer's special tokens (exactly as prompting.prompt_ids does at
        inference), then the completion and EOS, which are trained."""
        prompts = self.tok([r["prompt"] for r in records])["input_ids"]
        answers = self.tok([r["completion"] for r in records], add_special_tokens=False)["input_ids"]
        eos = self.tok.eos_token_id
        if records and list(prompts[0]) != prompt_ids(self.tok, records[0]["prompt"], chat=False):
            raise DataError("batched prompt tokenization differs from prompting.prompt_ids; please report this")
        return [{"input_ids": list(p) + list(c) + [eos], "labels": [IGNORE] * len(p) + list(c) + [eos]}
                for p, c in zip(prompts, answers, strict=True)]

    def _text(self, records: list[Record], counts: Counts) -> list[Example]:
        """Raw text for continued pre-training: each document + EOS, cut into max_seq_len chunks, all trained."""
        n = self.cfg.max_seq_len
        out = []
        for ids in self.tok([r["text"] for r in records])["input_ids"]:
            ids = list(ids) + [self.tok.eos_token_id]
            for i in range(0, len(ids), n):
                chunk = ids[i : i + n]
                if len(chunk) > 1:
                    ex = {"input_ids": chunk, "labels": list(chunk)}
                    counts.add(ex)
                    out.append(ex)
        return out

    def _classification(self, records: list[Record], wheres: list[str]) -> list[Example]:
        texts = [r["text"] for r in records]
        pairs = [r["text_pair"] for r in records]
        has_pair = any(p is not None for p in pairs)
        if has_pair and not all(isinstance(p, str) for p in pairs):
            i = next(i for i, p in enumerate(pairs) if not isinstance(p, str))
            raise DataError(f"{wheres[i]}: some rows have a text_pair and this one does not; give every row one")
        enc = self.tok(texts, pairs) if has_pair else self.tok(texts)
        out = []
        for i, r in enumerate(records):
            ex: Example = {"input_ids": list(enc["input_ids"][i]), "label": self._label(r["label"], wheres[i])}
            if "token_type_ids" in enc:
                ex["token_type_ids"] = list(enc["token_type_ids"][i])
            out.append(ex)
        return out

    def _label(self, value: int | str, where: str) -> int:
        if isinstance(value, int):
            if value < 0 or (self.label_index and value >= len(self.label_index)):
                raise DataError(f"{where}: label {value} is outside 0..{len(self.label_index) - 1} (data.labels)")
            return value
        if value not in self.label_index:
            raise DataError(f"{where}: label {value!r} is not one of data.labels {sorted(self.label_index)}")
        return self.label_index[value]

    def _fit(self, ex: Example, counts: Counts) -> Example | None:
        n = self.cfg.max_seq_len
        if len(ex["input_ids"]) > n:
            if self.cfg.overlong == "drop":
                counts.dropped_too_long += 1
                return None
            counts.truncated += 1
            ex = {k: v[:n] if isinstance(v, list) else v for k, v in ex.items()}
        if "labels" in ex and all(t == IGNORE for t in ex["labels"][1:]):
            counts.dropped_no_target += 1
            return None
        return ex


def _as_messages(r: Record) -> list[dict[str, Any]]:
    if r["kind"] == "chat":
        return list(r["messages"])
    system = [{"role": "system", "content": r["system"]}] if r.get("system") else []
    return [*system, {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
