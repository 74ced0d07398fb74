"""`data:` where the examples come from and how they become token ids and loss masks."""

from typing import Literal

from pydantic import Field, model_validator

from finetune.config.base import Section, conflict

Format = Literal["auto", "text", "prompt_completion", "instruction", "chat", "classification", "preference"]


class ColumnsConfig(Section):
    """Column names per format, for data whose columns are named differently."""

    text: str = Field(default="text", description="Raw text (text format) or the input text (classification).")
    text_pair: str = Field(default="text_pair", description="Optional second text of a pair (classification).")
    label: str = Field(default="label", description="Class label, an int or a name (classification).")
    prompt: str = Field(default="prompt", description="Prompt: a string or a list of messages (prompt_completion and preference formats).")
    completion: str = Field(default="completion", description="Answer (prompt_completion format).")
    instruction: str = Field(default="instruction", description="Instruction (alpaca instruction format).")
    input: str = Field(default="input", description="Optional extra input appended to the instruction.")
    output: str = Field(default="output", description="Answer (alpaca instruction format).")
    messages: str = Field(default="messages", description="OpenAI-style list of {role, content} (chat format).")
    conversations: str = Field(default="conversations", description="ShareGPT list of {from, value} (chat format).")
    system: str = Field(default="system", description="Optional per-row system prompt (chat and instruction).")
    chosen: str = Field(default="chosen", description="Preferred answer: a string, assistant message(s) or a whole chat (preference).")
    rejected: str = Field(default="rejected", description="Dispreferred answer, same shapes as chosen (preference).")


class SourceConfig(Section):
    """One dataset of a mix: a local file/glob/folder or a hub dataset, with its own format and columns."""

    path: str | None = Field(default=None, description="Local .jsonl/.json/.csv/.parquet/.txt file, a glob, or a folder.")
    hub: str | None = Field(default=None, description="Hub dataset name for datasets.load_dataset (offline cache honoured).")
    subset: str | None = Field(default=None, description="Hub dataset configuration (subset) name.")
    split: str = Field(default="train", description="Hub dataset split.")
    weight: float = Field(default=1.0, gt=0, description="Sampling weight when several sources are interleaved.")
    format: Format = Field(default="auto", description="Format of this source; auto uses data.format.")
    columns: ColumnsConfig | None = Field(default=None, description="Column names of this source; default data.columns.")

    @model_validator(mode="after")
    def _one_origin(self) -> "SourceConfig":
        if (self.path is None) == (self.hub is None):
            raise ValueError("set exactly one of 'path' (local files) or 'hub' (a hub dataset name)")
        return self


Sources = str | list[SourceConfig]


class DataConfig(Section):
    """The `data:` section."""

    train: Sources = Field(
        description="Training data: a local file (.jsonl/.json/.csv/.parquet/.txt), a glob or a folder; or a list of "
        "sources {path|hub, subset, split, weight, format, columns} interleaved by weight."
    )
    validation: Sources | None = Field(default=None, description="Validation data, same shapes as train.")
    val_size: float | None = Field(
        default=None, gt=0,
        description="Hold out this share (<1) or number (>=1) of training rows as validation, chosen by data.seed; "
        "only when validation is not set.",
    )
    format: Format = Field(
        default="auto",
        description="Example shape. auto detects it from the first row: messages/conversations -> chat, "
        "prompt+completion -> prompt_completion, instruction+output -> instruction, text+label -> classification, "
        "text -> text, chosen+rejected (with or without prompt) -> preference. The detected format is printed.",
    )
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig, description="Column names, when they differ.")
    max_seq_len: int = Field(default=1024, ge=8, le=1_048_576, description="Longest example in tokens (and packed row length).")
    overlong: Literal["truncate", "drop"] = Field(
        default="truncate", description="What to do with examples longer than max_seq_len; counts are reported."
    )
    use_chat_template: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Render prompt/completion and instruction pairs through the chat template as a user/assistant "
        "exchange. auto: when the tokenizer has a template. Chat data always uses the template.",
    )
    train_on: Literal["assistant", "last", "all"] = Field(
        default="assistant",
        description="Chat tokens that carry loss: every assistant turn, the last assistant turn only, or all tokens.",
    )
    labels: list[str] | None = Field(
        default=None,
        description="Classification class names in index order (the label map): a name in the label column maps to "
        "its position. Default: the sorted distinct names found; int labels are used as they are.",
    )
    system_prompt: str | None = Field(
        default=None, description="System prompt added to chat/instruction rows that have none."
    )
    packing: bool = Field(
        default=False,
        description="Pack examples into rows of max_seq_len; attention never crosses examples (block-diagonal mask).",
    )
    packing_attention: Literal["block_mask", "varlen"] = Field(
        default="block_mask",
        description="How packed examples are kept apart when data.padding_free is off: block_mask (a 4D mask, for "
        "sdpa/eager, CPU or GPU) or varlen (position_ids only, for model.attn_implementation=flash_attention_2).",
    )
    padding_free: bool = Field(
        default=True,
        description="Causal LM: run each micro-batch as one row of its examples back to back, no padding, attention "
        "kept inside each example (sdpa once per example, or flash attention's varlen kernel). Same loss and "
        "gradients as padded batches, without computing the padding. Needs attn_implementation auto, sdpa or "
        "flash_attention_2; off: padded batches (eager, flex_attention).",
    )
    streaming: bool = Field(
        default=False,
        description="Read and tokenize lazily while training (memory stays flat); needs train.max_steps.",
    )
    shuffle_buffer: int = Field(default=1000, ge=1, le=10_000_000, description="Shuffle buffer (examples) when streaming.")
    on_bad_rows: Literal["error", "skip"] = Field(
        default="error", description="A malformed line or row: stop with its file and line, or skip and count it."
    )
    seed: int = Field(default=42, description="Seed for val_size hold-out and source interleaving.")
    cache: bool = Field(
        default=True,
        description="Cache tokenized data by fingerprint (files + data config + tokenizer) so a rerun skips the work.",
    )
    cache_dir: str | None = Field(
        default=None, description="Where the cache lives; default $FINETUNE_CACHE/data or ~/.cache/finetune/data."
    )

    @model_validator(mode="after")
    def _one_validation_source(self) -> "DataConfig":
        if self.val_size is not None and self.validation is not None:
            raise conflict("val_size", "set either data.validation (files) or data.val_size (a hold-out of the "
                           "training rows), not both", "remove one of the two")
        if self.val_size is not None and self.val_size >= 1 and self.val_size != int(self.val_size):
            raise conflict("val_size", f"{self.val_size} is neither a share below 1 nor a whole number of rows",
                           "e.g. data.val_size=0.1 (10% of the rows) or data.val_size=200 (200 rows)")
        return self
