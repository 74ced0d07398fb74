"""Wrap the base model with a peft LoRA adapter and report what is trained."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.config.lora import LoraConfig

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ParamReport:
    trainable: int
    total: int
    wrapped: int  # number of linear layers carrying LoRA
    formula: int  # sum of r*(d+k) over wrapped d x k weights

    def describe(self, r: int) -> str:
        share = 100 * self.trainable / max(self.total, 1)
        return (
            f"LoRA r={r} on {self.wrapped} linear layers: sum r*(d+k) = {self.formula:,}; "
            f"trainable {self.trainable:,} of {self.total:,} parameters ({share:.3f}%)"
        )


def wrap_lora(model: nn.Module, cfg: LoraConfig, task: str = "causal_lm") -> nn.Module:
    """peft LoRA on the frozen base; QLoRA bases get peft's k-bit preparation (fp32 norms, input grads)."""
    if not cfg.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_cfg = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        modules_to_save=cfg.modules_to_save or None,
    )
    return _trained_in_float32(get_peft_model(model, peft_cfg))


def _trained_in_float32(model: Any) -> Any:
    """Trained weights (LoRA matrices, a new classifier head) in float32 even on a bf16 base: AdamW's updates would
    round away in bf16, and peft keeps only the LoRA matrices in float32 by itself."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    return model


def autocast_lora_inputs(model: nn.Module) -> AbstractContextManager[Any]:
    """For forwards under autocast: LoRA layers take their input as it comes (bf16) instead of copying it to the
    LoRA weights' float32 first. Autocast casts it back to bf16 for the matmul anyway, so the numbers are the same
    (bf16 -> float32 -> bf16 is exact), without two copies of every LoRA layer's input and of its gradient. Plain
    LoRA only: DoRA and quantized bases keep peft's casting."""
    from peft.helpers import disable_input_dtype_casting

    dora = any(any(flags.values()) for m in model.modules() if isinstance(flags := getattr(m, "use_dora", None), dict))
    quantized = any(not p.is_floating_point() for p in model.parameters())
    return nullcontext() if dora or quantized else disable_input_dtype_casting(model)


def param_report(model: nn.Module) -> ParamReport:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    wrapped, formula = 0, 0
    for module in model.modules():
        lora_a: Any = getattr(module, "lora_A", None)
        if lora_a is None or "default" not in lora_a:
            continue
        lora_b: Any = module.lora_B
        a, b = lora_a["default"].weight, lora_b["default"].weight  # A: r x k, B: d x r
        wrapped += 1
        formula += a.shape[0] * (a.shape[1] + b.shape[0])
    return ParamReport(trainable, total, wrapped, formula)
