"""Turn one row into {input_ids, labels}: the loss sees only the answer tokens and the EOS that ends them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune.errors import DataError
from finetune.prompting import chat_ids, prompt_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100
Example = dict[str, list[int]]


def detect_format(row: dict[str, Any], where: str) -> str:
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise DataError(
        f"{where}: cannot tell the data format from the columns {sorted(row)}; expected 'messages' (chat) or "
        "'prompt' and 'completion'. Set data.format explicitly or rename the columns."
    )


def encode_row(tok: PreTrainedTokenizerBase, row: dict[str, Any], fmt: str, chat: bool, where: str) -> Example:
    if fmt == "chat":
        return encode_chat(tok, _field(row, "messages", where), where)
    prompt, completion = _field(row, "prompt", where), _field(row, "completion", where)
    if chat:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return encode_chat(tok, messages, where)
    return encode_prompt_completion(tok, prompt, completion)


def encode_prompt_completion(tok: PreTrainedTokenizerBase, prompt: str, completion: str) -> Example:
    """Prompt tokenized alone (as inference will see it), then the completion, then EOS, which is trained."""
    p = prompt_ids(tok, prompt, chat=False)
    c = list(tok(completion, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    return {"input_ids": p + c, "labels": [IGNORE] * len(p) + c}


def encode_chat(tok: PreTrainedTokenizerBase, messages: list[dict[str, Any]], where: str) -> Example:
    """Label the assistant turns by rendering prefixes of the conversation, without `{% generation %}` markers.

    For each assistant turn k, the tokens between render(messages[:k], generation prompt) and render(messages[:k+1])
    are that turn's answer plus its end-of-turn token. Each prefix must be a token prefix of the full rendering,
    otherwise what inference would see differs from what training saw, and we refuse.
    """
    ids = chat_ids(tok, messages)
    labels = [IGNORE] * len(ids)
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = _checked_prefix(tok, ids, messages[:k], True, where)
        end = _checked_prefix(tok, ids, messages[: k + 1], False, where)
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "labels": labels}


def _checked_prefix(tok: PreTrainedTokenizerBase, ids: list[int], part: list[dict[str, Any]], gen: bool, where: str) -> int:
    prefix = chat_ids(tok, part, add_generation_prompt=gen) if part or gen else []
    if ids[: len(prefix)] != prefix:
        raise DataError(
            f"{where}: the chat template renders the first {len(part)} message(s) differently alone than inside the "
            "whole conversation, so the prompt at inference would not match training. Use a template whose "
            "renderings are prefixes of each other (set model.chat_template), or a different format."
        )
    return len(prefix)


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    if name not in row or row[name] is None:
        raise DataError(f"{where}: missing field '{name}'; the row has columns {sorted(row)}")
    return row[name]
