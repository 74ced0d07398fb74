"""Multi-turn chat masking checked token by token, the fast path against the exact one, and the prefix check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from finetune.config.data import DataConfig
from finetune.data import build_data
from finetune.data.chat import ChatEncoder
from finetune.errors import DataError
from finetune.testing import chat_rows, write_jsonl

IGNORE = -100


@pytest.fixture(scope="module")
def tok(tiny_lm: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm)


def expected(tok: Any, messages: list[dict[str, str]], trained_turns: set[int] | None) -> dict[str, list[int]]:
    """Independent reference: chatml pieces tokenized one by one (they are separated by special tokens), with the
    answer and its `<|im_end|>\\n` trained for the chosen assistant turns (None: every token)."""
    ids: list[int] = []
    labels: list[int] = []
    for k, m in enumerate(messages):
        head = tok(f"<|im_start|>{m['role']}\n", add_special_tokens=False)["input_ids"]
        body = tok(f"{m['content']}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        ids += head + body
        train_body = trained_turns is None or k in trained_turns
        labels += (head if trained_turns is None else [IGNORE] * len(head)) + (body if train_body else [IGNORE] * len(body))
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize(("train_on", "turns"), [("assistant", {2, 4}), ("last", {4}), ("all", None)])
def test_multi_turn_mask_token_by_token(tmp_path: Path, tok: Any, train_on: str, turns: set[int] | None) -> None:
    rows = chat_rows(3)
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    bundle = build_data(DataConfig(train=str(f), max_seq_len=256, train_on=train_on, cache=False), tok)
    for row, ex in zip(rows, bundle.train, strict=True):
        ref = expected(tok, row["messages"], turns)
        assert ex["input_ids"] == ref["input_ids"]
        for pos, (got, want) in enumerate(zip(ex["labels"], ref["labels"], strict=True)):
            assert got == want, f"position {pos} ({tok.decode([ex['input_ids'][pos]])!r}): {got} != {want}"


def test_fast_path_equals_exact_path_on_varied_conversations(tok: Any) -> None:
    words = ["alice", "bob?", "the end.", "{\"a\": 1}", "  spaced  ", "new\nline", "Paris est la capitale, café ☕ ünï"]
    convs = []
    for i in range(40):
        msgs = [{"role": "system", "content": words[i % 7]}] if i % 3 == 0 else []
        for t in range(1 + i % 3):
            msgs += [{"role": "user", "content": words[(i + t) % 7]}, {"role": "assistant", "content": words[(i + 2 * t + 1) % 7]}]
        convs.append(msgs)
    enc = ChatEncoder(tok)
    assert enc.bounds.lengths is not None  # byte-level BPE: boundaries from token byte lengths
    fast = enc.encode(convs, [f"row {i}" for i in range(40)])
    assert enc.fast and enc.fallbacks == 0
    assert fast == [ChatEncoder(tok).exact(m, "x") for m in convs]
    offsets = ChatEncoder(tok)
    offsets.bounds.lengths = None  # what a non-byte-level tokenizer gets: the tokenizer's own offsets
    assert offsets.encode(convs, [f"row {i}" for i in range(40)]) == fast and offsets.fallbacks == 0


def test_prompt_alone_must_be_a_token_prefix(tmp_path: Path, tiny_lm: Path) -> None:
    """A template that closes the conversation only when no generation prompt is asked renders an earlier turn
    differently alone than inside the conversation: refused for every turn, fine for the last turn only."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.chat_template = tok.chat_template + "{% if not add_generation_prompt %}<|endoftext|>{% endif %}"
    f = str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(2)))
    with pytest.raises(DataError, match="differently alone than inside the whole conversation"):
        build_data(DataConfig(train=f, max_seq_len=256, cache=False), tok)
    last = build_data(DataConfig(train=f, max_seq_len=256, cache=False, train_on="last"), tok)
    text = tok.decode([t for t in last.train[0]["labels"] if t != IGNORE])
    assert text == "the end<|im_end|>\n<|endoftext|>"


def test_named_template_for_a_tokenizer_without_one(tmp_path: Path, tiny_lm_plain: Path) -> None:
    from finetune.config import load_config_text
    from finetune.model import load_tokenizer, resolve_source

    f = str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(2)))
    job = load_config_text(f"model: {{name_or_path: {tiny_lm_plain}, chat_template: chatml}}\ndata: {{train: {f}}}\n")
    tok = load_tokenizer(resolve_source(job.model), job.model)
    ex = build_data(DataConfig(train=f, max_seq_len=256, cache=False), tok).train[0]
    assert tok.decode([t for t in ex["labels"] if t != IGNORE]) == "alice is a friend<|im_end|>\nthe end<|im_end|>\n"
