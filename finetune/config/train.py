"""`train:` the optimisation loop (accelerate), its schedule and precision."""

from typing import Literal

from pydantic import Field, model_validator

from finetune.config.base import Section, conflict
from finetune.config.preference import PreferenceConfig


class TrainConfig(Section):
    """The `train:` section."""

    seed: int = Field(default=42, description="Seed for weights init, dropout and data order.")
    objective: Literal["sft", "dpo", "orpo", "simpo"] = Field(
        default="sft",
        description="What the loss is. sft: the answers' likelihood (prompt/completion, instruction, chat, text). On "
        "preference data (prompt/chosen/rejected): dpo (against a frozen reference: the model before this run), orpo "
        "(NLL of chosen + odds ratio, no reference) or simpo (length-normalised margin, no reference).",
    )
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="Coefficients of dpo / orpo / simpo (paper defaults)."
    )
    epochs: float = Field(default=1, gt=0, le=10_000, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(default=None, ge=1, le=100_000_000, description="Optimizer steps to run; overrides epochs.")
    micro_batch_size: int = Field(default=4, ge=1, le=65_536, description="Examples per forward pass on each process.")
    gradient_accumulation: int = Field(default=1, ge=1, le=65_536, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate of AdamW.")
    schedule: Literal["linear", "cosine", "constant"] = Field(default="cosine", description="Decay after warmup.")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Share of steps spent warming up linearly.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Clip the global grad norm; null disables.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="Autocast precision. auto: bf16 where the hardware supports it, else fp32."
    )
    log_every: int = Field(default=1, ge=1, description="Write a metrics line every N optimizer steps.")

    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass: less memory, ~30% more compute."
    )
    compile: bool = Field(default=False, description="torch.compile the model (the first steps pay the compile time).")
    checkpoint_every: int | None = Field(
        default=None, ge=1, description="Save a resumable checkpoint (adapter, optimizer, scheduler, RNG, data position) every N steps."
    )
    keep_last: int = Field(default=2, ge=1, description="Checkpoints kept on disk; older ones are deleted.")
    resume: str | None = Field(
        default=None,
        description="Continue an interrupted run: 'auto' picks the newest checkpoint of this run (or starts fresh when "
        "there is none); a path picks that checkpoint folder.",
    )
    eval_every: int | None = Field(
        default=None, ge=1, description="Evaluate loss and perplexity on data.validation every N steps."
    )
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="Stop after this many evaluations without a better validation loss."
    )
    keep_best: bool = Field(
        default=True, description="With eval_every: the saved adapter is the one with the lowest validation loss."
    )
    trackers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="Extra experiment trackers (metrics.jsonl is always written). mlflow uses a local file store "
        "under the run's work folder unless MLFLOW_TRACKING_URI is set.",
    )
    plot: bool = Field(default=True, description="Write loss.png (train and eval loss) into the adapter folder.")
    profile_steps: int = Field(
        default=0, ge=0, le=10_000, description="Profile this many optimizer steps with torch.profiler; writes profile.txt."
    )
    oom_retry: bool = Field(
        default=True,
        description="On a GPU out-of-memory error, halve micro_batch_size and double gradient_accumulation (same "
        "effective batch) and retry the step.",
    )

    @model_validator(mode="after")
    def _patience_needs_eval(self) -> "TrainConfig":
        if self.early_stopping_patience and not self.eval_every:
            raise conflict("early_stopping_patience", "early stopping needs evaluations, but train.eval_every is not "
                           "set", "set how often to evaluate, e.g. train.eval_every=100")
        return self
