"""`data:` where the examples come from and how they become token ids and loss masks."""

from typing import Literal

from pydantic import Field

from finetune.config.base import Section

Format = Literal["auto", "prompt_completion", "chat"]


class DataConfig(Section):
    train: str = Field(description="Training data: a local .jsonl/.json file.")
    validation: str | None = Field(default=None, description="Validation data file, same shape as train.")
    format: Format = Field(
        default="auto",
        description="Example shape. auto detects it from the first row: 'messages' -> chat, 'prompt'+'completion' "
        "-> prompt_completion.",
    )
    max_seq_len: int = Field(default=1024, ge=8, description="Examples longer than this many tokens are truncated.")
    use_chat_template: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Render prompt/completion pairs through the chat template as a user/assistant exchange. "
        "auto: when the tokenizer has a template. Chat data always uses the template.",
    )
