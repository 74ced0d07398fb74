"""The whole job: one section per pipeline stage."""

from typing import Literal

from pydantic import Field, model_validator

from finetune.config.base import Section, conflict
from finetune.config.data import DataConfig
from finetune.config.lora import LoraConfig
from finetune.config.model import ModelConfig
from finetune.config.output import OutputConfig
from finetune.config.train import TrainConfig


class JobConfig(Section):
    """The whole job YAML: the top-level `task` and one section per pipeline stage, checked against each other."""

    task: Literal["causal_lm", "classification"] = Field(
        default="causal_lm", description="causal_lm: learn to generate the answers. classification: learn labels."
    )
    model: ModelConfig = Field(description="The base checkpoint.")
    data: DataConfig = Field(description="Training and validation data.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The LoRA adapter.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the adapter is saved.")

    @model_validator(mode="after")
    def _sections_agree(self) -> "JobConfig":
        """What training would refuse later (after loading the model, or at the end of the run), refused now."""
        data, train = self.data, self.train
        if data.streaming and train.max_steps is None:
            raise conflict("train.max_steps", "data.streaming reads the data lazily, so its length (and the number "
                           "of steps an epoch takes) is unknown", "set train.max_steps, e.g. train.max_steps=1000", "data.streaming")
        if train.eval_every and data.validation is None and data.val_size is None:
            raise conflict("train.eval_every", "evaluating every few steps needs validation data, but neither "
                           "data.validation nor data.val_size is set", "add data.validation (a file) or "
                           "data.val_size (e.g. 0.05), or remove train.eval_every", "data")
        if self.task == "classification" and data.packing:
            raise conflict("data.packing", "packing concatenates causal LM examples; a classification example is "
                           "one text with one label", "set data.packing: false for task: classification")
        return self
