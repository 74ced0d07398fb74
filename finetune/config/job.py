"""The whole job: one section per pipeline stage."""

from typing import Literal

from pydantic import Field

from finetune.config.base import Section
from finetune.config.data import DataConfig
from finetune.config.lora import LoraConfig
from finetune.config.model import ModelConfig
from finetune.config.output import OutputConfig
from finetune.config.train import TrainConfig


class JobConfig(Section):
    task: Literal["causal_lm", "classification"] = Field(
        default="causal_lm", description="causal_lm: learn to generate the answers. classification: learn labels."
    )
    model: ModelConfig = Field(description="The base checkpoint.")
    data: DataConfig = Field(description="Training and validation data.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The LoRA adapter.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the adapter is saved.")
