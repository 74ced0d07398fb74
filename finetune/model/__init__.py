"""Model stage: a matching tokenizer and base checkpoint from one source (a folder, a hub id or an imported GGUF
file), checked against each other, then wrapped with peft LoRA."""

from finetune.model.loading import (
    check_pair,
    load_base_model,
    load_model,
    load_tokenizer,
    set_pad_token,
    training_dtype,
)
from finetune.model.lora import ParamReport, autocast_lora_inputs, lora_of_adapter, param_report, wrap_lora
from finetune.model.source import Source, resolve_source

__all__ = ["ParamReport", "Source", "autocast_lora_inputs", "check_pair", "load_base_model", "load_model", "load_tokenizer", "lora_of_adapter",
           "param_report",
           "resolve_source", "set_pad_token", "training_dtype", "wrap_lora"]
