"""How a prompt becomes tokens: one function shared by training, eval and the demo, so inference sees exactly
the rendering that training saw (the "chat template lost between training and inference" bug)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, Any]]


def uses_chat_template(tok: PreTrainedTokenizerBase, policy: str = "auto") -> bool:
    """policy is data.use_chat_template: auto (when the tokenizer has one), always, never."""
    if policy == "always":
        return True
    return policy == "auto" and bool(getattr(tok, "chat_template", None))


def chat_ids(tok: PreTrainedTokenizerBase, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template (plus the assistant header when asked)."""
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False)
    return list(ids)


def prompt_ids(tok: PreTrainedTokenizerBase, prompt: str | Messages, chat: bool) -> list[int]:
    """Token ids of a prompt ready for generation: chat messages (or a string as one user turn) through the chat
    template with the generation prompt; otherwise the plain text with the tokenizer's special tokens."""
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return chat_ids(tok, messages, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise TypeError("a plain-text model takes a string prompt")
    return list(tok(prompt)["input_ids"])


def stop_token_ids(tok: PreTrainedTokenizerBase, generation_config: Any = None) -> list[int]:
    """EOS plus any end-of-turn ids the checkpoint's generation config names."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    extra = getattr(generation_config, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return sorted(ids)


def prompt_of(record: dict[str, Any], chat: bool) -> str | Messages:
    """What generation is given for a canonical pair or chat record cut at its reference: everything before the
    reference, as training rendered it (system prompt included). A preference record's prompt is its sides'."""
    if record["kind"] == "preference":
        record = record["chosen"]
    if record["kind"] == "chat":
        return list(record["messages"][:-1])
    if not chat:
        return str(record["prompt"])  # plain prompts ignore the system prompt, as training's encoding does
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return [*system, {"role": "user", "content": record["prompt"]}]


def prompt_and_reference(record: dict[str, Any], chat: bool) -> tuple[str | Messages, str] | None:
    """(prompt, reference answer) of a pair or chat record (the last assistant turn of a chat); None for text
    records and for chats whose last assistant turn has no prompt before it or no text. For a preference record:
    its prompt and the chosen answer."""
    if record["kind"] == "preference":
        record = record["chosen"]
    if record["kind"] == "pair":
        return prompt_of(record, chat), str(record["completion"])
    if record["kind"] != "chat":
        return None
    messages = record["messages"]
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=0)
    reference = messages[last].get("content")
    if last == 0 or not isinstance(reference, str):
        return None
    return prompt_of({"kind": "chat", "messages": messages[: last + 1]}, chat), reference
