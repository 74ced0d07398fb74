"""`model:` which checkpoint to load (tokenizer and weights always from this one source) and how."""

from typing import Literal

from pydantic import Field

from finetune.config.base import Section


class ModelConfig(Section):
    """The `model:` section."""

    name_or_path: str = Field(
        description="Local folder of a Hugging Face checkpoint, or a hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) "
        "resolved through the local cache; HF_HUB_OFFLINE=1 is honoured. Tokenizer and weights both come from here."
    )
    revision: str | None = Field(default=None, description="Hub branch, tag or commit; ignored for a local folder.")
    gguf_file: str | None = Field(
        default=None,
        description="A GGUF file (path, or file name inside name_or_path) to import once into a cached Hugging Face "
        "folder; later runs load that folder in seconds.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Dtype the base weights are loaded in. auto: bfloat16 for a LoRA run with bf16 precision (the "
        "frozen base; LoRA weights and optimizer state stay float32), else float32 on CPU and the checkpoint's "
        "dtype on GPU.",
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flex_attention"] = Field(
        default="auto", description="Attention kernel; auto lets transformers choose (sdpa where available)."
    )
    trust_remote_code: bool = Field(
        default=False, description="Run Python code shipped with a hub checkpoint. Only for sources you trust."
    )
    chat_template: str | None = Field(
        default=None,
        description="Chat template for a tokenizer that has none: a built-in name (chatml, llama3, zephyr) or a "
        "path to a .jinja file. A tokenizer's own template is kept unless this is set.",
    )
    adapter: str | None = Field(
        default=None,
        description="Start from this adapter folder (e.g. adapters/sft) instead of a new LoRA: checked to fit the base, "
        "its LoRA settings reused (a conflicting lora: section is refused). With train.objective dpo, the reference is "
        "the base plus this adapter, frozen.",
    )
