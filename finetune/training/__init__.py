"""Training stage: the accelerate loop over a DataBundle (one or many processes, mixed precision, exact resume),
with checkpoints, metrics and trackers, progress and profiling in their own modules."""

from finetune.training.loop import TrainResult, evaluate_loss, make_accelerator, train
from finetune.training.loss import loss_sum, target_count

__all__ = ["TrainResult", "evaluate_loss", "loss_sum", "make_accelerator", "target_count", "train"]
