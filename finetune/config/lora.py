"""`lora:` the peft LoRA adapter (W + BA) and optional QLoRA quantization of the frozen base."""

from typing import Literal

from pydantic import Field, model_validator

from finetune.config.base import Section, conflict


class LoraConfig(Section):
    """The `lora:` section."""

    enabled: bool = Field(default=True, description="false trains every weight (full fine-tuning, small models only).")
    r: int = Field(default=16, ge=1, le=4096, description="Rank of the update BA; trainable params per d x k weight: r*(d+k).")
    alpha: float = Field(default=32, gt=0, description="Scale of the update: alpha/r (alpha/sqrt(r) with use_rslora).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input path.")
    target_modules: str | list[str] = Field(
        default="all-linear",
        description="Module names to wrap (e.g. [q_proj, v_proj]) or 'all-linear' (every linear layer but the output head).",
    )
    use_rslora: bool = Field(default=False, description="Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(default=False, description="Weight-decomposed LoRA (DoRA). vLLM cannot serve DoRA adapters.")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved inside the adapter (a classifier head is added automatically).",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        default="none", description="QLoRA: load the frozen base in 4-bit nf4 or 8-bit through bitsandbytes."
    )

    @model_validator(mode="after")
    def _qlora_needs_lora(self) -> "LoraConfig":
        if self.quantization != "none" and not self.enabled:
            raise conflict("quantization", f"QLoRA ({self.quantization}) trains a LoRA adapter on a frozen quantized "
                           "base, but lora.enabled is false (full fine-tuning): quantized weights cannot be trained "
                           "or saved as a model", "set lora.enabled: true, or lora.quantization: none")
        return self
