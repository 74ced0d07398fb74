"""The dataset formats: detect one from a row, and turn each row into one of four canonical records.

A registry (FORMATS) maps a format name to its normaliser; a record is a small dict:
text {text} | pair {prompt, completion, system} | chat {messages} | cls {text, text_pair, label} |
preference {chosen, rejected}, whose two sides are pair or chat records sharing one prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finetune.config.data import ColumnsConfig
from finetune.errors import DataError

Record = dict[str, Any]
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system", "tool": "tool",
                  "function": "tool", "observation": "tool", "function_call": "assistant"}


class MissingField(DataError):
    """A row lacks a field its format needs, or has it null or of the wrong type: a bad row (see data.on_bad_rows)."""

    pass


def detect_format(row: dict[str, Any], where: str, cols: ColumnsConfig | None = None) -> str:
    """First match wins; the order puts the most specific shapes first."""
    cols = cols or ColumnsConfig()
    # Columns with values decide first; a column that is there but null (completion: null) still tells the format,
    # so the row is then refused for its null field rather than for an unknown format.
    for has in ({k for k, v in row.items() if v is not None}, set(row)):
        found = _format_of(has, cols)
        if found:
            return found
    raise DataError(
        f"{where}: cannot tell the data format from the columns {sorted(row)}. Expected one of: "
        f"'{cols.messages}' or '{cols.conversations}' (chat), '{cols.prompt}'+'{cols.completion}' (prompt_completion), "
        f"'{cols.instruction}'+'{cols.output}' (instruction), '{cols.text}'+'{cols.label}' (classification), "
        f"'{cols.text}' (text), '{cols.chosen}'+'{cols.rejected}' (preference). Set data.format and data.columns to "
        "match your columns."
    )


def _format_of(has: set[str], cols: ColumnsConfig) -> str | None:
    if cols.chosen in has and cols.rejected in has:
        return "preference"
    if cols.messages in has or cols.conversations in has:
        return "chat"
    if cols.prompt in has and cols.completion in has:
        return "prompt_completion"
    if cols.instruction in has and cols.output in has:
        return "instruction"
    if cols.text in has and cols.label in has:
        return "classification"
    if cols.text in has:
        return "text"
    return None


def field(row: dict[str, Any], name: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """`row[name]`, checked to be of `kind`; raises MissingField (naming `where` and the row's columns) otherwise."""
    value = row.get(name)
    if value is None and name in row:
        raise MissingField(f"{where}: field '{name}' is null; give it a value (or leave the row out)")
    if value is None:
        raise MissingField(f"{where}: missing field '{name}'; the row has columns {sorted(row)} (map yours with data.columns)")
    if not isinstance(value, kind):
        raise MissingField(f"{where}: field '{name}' should be {_kind_name(kind)}, got {type(value).__name__}: {str(value)[:60]!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def _text(row: dict[str, Any], c: ColumnsConfig, where: str, system: str | None) -> Record:
    return {"kind": "text", "text": field(row, c.text, where)}


def _prompt_completion(row: dict[str, Any], c: ColumnsConfig, where: str, system: str | None) -> Record:
    return {"kind": "pair", "prompt": field(row, c.prompt, where), "completion": field(row, c.completion, where),
            "system": row.get(c.system) or system}


def _instruction(row: dict[str, Any], c: ColumnsConfig, where: str, system: str | None) -> Record:
    """Alpaca: the prompt is the instruction, then the optional input after a blank line. No extra wrapper text,
    so a user typing the same instruction at inference gets exactly the prompt the model was trained on."""
    prompt = field(row, c.instruction, where)
    extra = row.get(c.input)
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    return {"kind": "pair", "prompt": prompt, "completion": field(row, c.output, where), "system": row.get(c.system) or system}


def _chat(row: dict[str, Any], c: ColumnsConfig, where: str, system: str | None) -> Record:
    if row.get(c.messages) is None and row.get(c.conversations) is None:
        raise MissingField(f"{where}: missing field '{c.messages}' (or '{c.conversations}'); the row has columns "
                           f"{sorted(row)} (map yours with data.columns)")
    if row.get(c.messages) is not None:
        messages = [_openai_message(m, where, i) for i, m in enumerate(field(row, c.messages, where, list))]
    else:
        messages = [_sharegpt_message(m, where, i) for i, m in enumerate(field(row, c.conversations, where, list))]
    system = row.get(c.system) or system
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in messages):
        raise MissingField(f"{where}: the conversation has no assistant turn, so nothing would be trained")
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first != "user":
        raise MissingField(f"{where}: the conversation starts with a{'n' if first == 'assistant' else ''} {first} "
                           "turn; after any system message the first turn must be the user's (the prompt the "
                           "model answers)")
    return {"kind": "chat", "messages": messages}


def _openai_message(m: Any, where: str, i: int) -> dict[str, Any]:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise MissingField(f"{where}: message {i} should be an object with 'role' and 'content', got {str(m)[:80]!r}")
    if not isinstance(m["role"], str):
        raise MissingField(f"{where}: message {i} has role {m['role']!r}; expected a name such as user or assistant")
    return {**m, "content": _text_content(m["content"], where, f"message {i} ({m['role']})", "content")}


def _sharegpt_message(m: Any, where: str, i: int) -> dict[str, Any]:
    if not isinstance(m, dict) or "from" not in m or "value" not in m:
        raise MissingField(f"{where}: turn {i} should be an object with 'from' and 'value', got {str(m)[:80]!r}")
    role = SHAREGPT_ROLES.get(str(m["from"]).lower())
    if role is None:
        raise MissingField(f"{where}: turn {i} has an unknown speaker 'from': {m['from']!r}; known: {sorted(SHAREGPT_ROLES)}")
    return {"role": role, "content": _text_content(m["value"], where, f"turn {i} ({m['from']})", "value")}


def _text_content(value: Any, where: str, what: str, key: str) -> str:
    """A message's text; OpenAI's list of text parts is joined. Anything else (null, a number) is a bad row, since
    chat templates concatenate it as a string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                       for p in value):
        return "".join(p["text"] for p in value)
    shown = "null" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
    raise MissingField(f"{where}: {what} has '{key}': {shown}; expected text")


def _classification(row: dict[str, Any], c: ColumnsConfig, where: str, system: str | None) -> Record:
    label = field(row, c.label, where, (int, str))
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)  # CSV cells are strings
    return {"kind": "cls", "text": field(row, c.text, where), "text_pair": row.get(c.text_pair), "label": label}


def _preference(row: dict[str, Any], c: ColumnsConfig, where: str, system: str | None) -> Record:
    """TRL's preference shapes: prompt + chosen + rejected as strings (standard), or with messages (conversational:
    the prompt a string or messages, each side a string or its assistant message), or chosen and rejected as whole
    conversations sharing their first messages (implicit prompt; a prompt column is then ignored). Both sides become
    records of one kind."""
    for name in (c.chosen, c.rejected):
        field(row, name, where, (str, list))
    if row.get(c.prompt) is not None:
        field(row, c.prompt, where, (str, list))
    prompt, sides = row.get(c.prompt), (row[c.chosen], row[c.rejected])
    system = row.get(c.system) or system
    if not any(isinstance(v, list) for v in (prompt, *sides)):
        if prompt is None:
            raise MissingField(f"{where}: missing field '{c.prompt}': string answers need the prompt they answer "
                               "(whole conversations in chosen/rejected carry their own)")
        chosen, rejected = (_answer_text(v, where, n) for v, n in zip(sides, (c.chosen, c.rejected), strict=True))
        _check_differ(chosen, rejected, where)
        return {"kind": "preference", **{n: {"kind": "pair", "prompt": prompt, "completion": a, "system": system}
                                         for n, a in (("chosen", chosen), ("rejected", rejected))}}
    messages, answers = _conversational(prompt, sides, c, where)
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    _check_differ(answers[0]["content"], answers[1]["content"], where)
    return {"kind": "preference", "chosen": {"kind": "chat", "messages": [*messages, answers[0]]},
            "rejected": {"kind": "chat", "messages": [*messages, answers[1]]}}


def _conversational(prompt: Any, sides: tuple[Any, Any], c: ColumnsConfig, where: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(prompt messages, [chosen answer, rejected answer]), each answer one assistant message."""
    convs = [[_openai_message(m, where, i) for i, m in enumerate(v)] if isinstance(v, list)
             else [{"role": "assistant", "content": v}] for v in sides]
    if prompt is None or all(len(conv) > 1 for conv in convs):
        # implicit: the prompt is what both conversations share (whole conversations, as in ultrafeedback_binarized,
        # carry their prompt even when a prompt column repeats it)
        shared = 0
        while shared < min(map(len, convs)) - 1 and convs[0][shared] == convs[1][shared]:
            shared += 1
        messages, convs = convs[0][:shared], [conv[shared:] for conv in convs]
    elif isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [_openai_message(m, where, i) for i, m in enumerate(prompt)]
    if not messages:
        raise MissingField(f"{where}: chosen and rejected share no prompt message; give a '{c.prompt}' column")
    answers = [_one_answer(conv, where, n) for conv, n in zip(convs, (c.chosen, c.rejected), strict=True)]
    return list(messages), answers


def _one_answer(conv: list[dict[str, Any]], where: str, name: str) -> dict[str, Any]:
    if len(conv) != 1 or conv[0]["role"] != "assistant":
        raise MissingField(f"{where}: '{name}' should be one assistant answer after the prompt, got the roles "
                           f"{[m['role'] for m in conv]}")
    return {"role": "assistant", "content": _answer_text(conv[0]["content"], where, name)}


def _answer_text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MissingField(f"{where}: '{name}' is empty: there is no answer to train on")
    return value


def _check_differ(chosen: str, rejected: str, where: str) -> None:
    if chosen == rejected:
        raise MissingField(f"{where}: chosen and rejected are identical, so there is nothing to prefer")


def preference_sides(record: Record) -> tuple[Record, Record]:
    """(chosen, rejected) records of a preference record, each a pair or chat record."""
    return record["chosen"], record["rejected"]


Normaliser = Callable[[dict[str, Any], ColumnsConfig, str, str | None], Record]
FORMATS: dict[str, Normaliser] = {"text": _text, "prompt_completion": _prompt_completion, "instruction": _instruction,
                                  "chat": _chat, "classification": _classification, "preference": _preference}


def normalise(row: dict[str, Any], fmt: str, cols: ColumnsConfig, where: str, system: str | None = None) -> Record:
    """The canonical record of `row` in format `fmt`; `system` is the default system prompt for rows without one.

    Raises MissingField (a DataError) when a field the format needs is missing, null or of the wrong type."""
    return FORMATS[fmt](row, cols, where, system)
