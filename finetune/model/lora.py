"""Wrap the base model with a peft LoRA adapter and report what is trained."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.config.lora import LoraConfig
from finetune.errors import ModelError

if TYPE_CHECKING:
    from torch import nn


NEW_HEAD = "finetune_new_head"  # set by model.loading on a classifier whose head the checkpoint did not have


@dataclass(frozen=True)
class ParamReport:
    trainable: int
    total: int
    wrapped: int  # number of linear layers carrying LoRA
    formula: int  # sum of r*(d+k) over wrapped d x k weights
    head: str = ""  # what the report says about a new classification head, "" when there is none

    def describe(self, r: int | None) -> str:
        """The training log line; r=None is full fine-tuning (lora.enabled: false)."""
        share = 100 * self.trainable / max(self.total, 1)
        trainable = f"trainable {self.trainable:,} of {self.total:,} parameters ({share:.3f}%)"
        if r is None:
            text = f"full fine-tuning (no LoRA): {trainable}"
        else:
            text = f"LoRA r={r} on {self.wrapped} linear layers: sum r*(d+k) = {self.formula:,}; {trainable}"
        return f"{text}\n{self.head}" if self.head else text


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
    try:
        return _trained_in_float32(get_peft_model(model, peft_cfg))
    except ValueError as exc:
        if "not found in the base model" not in str(exc) and "Target modules" not in str(exc):
            raise
        raise ModelError(f"lora.target_modules: {cfg.target_modules!r} names no module of this model. Its linear "
                         f"layers are called: {', '.join(linear_names(model))} (or use 'all-linear')") from None
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower() and "memory" not in str(exc).lower():
            raise
        need = _lora_params(model, cfg)
        raise ModelError(f"lora.r={cfg.r}: the LoRA matrices need {need:,} parameters ({need * 4 / 2**30:.1f} GiB in "
                         "float32, three times that with AdamW's state) and could not be allocated; lower lora.r "
                         "(8-64 is usual) or target fewer modules") from None


def linear_names(model: nn.Module) -> list[str]:
    """The distinct short names (q_proj, dense, ...) of the layers LoRA can wrap, in model order."""
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if _is_adaptable(module) and name:
            names.setdefault(name.rsplit(".", 1)[-1], None)
    return list(names)


def _is_adaptable(module: Any) -> bool:
    return type(module).__name__ in ("Linear", "Conv1D", "Embedding", "Linear4bit", "Linear8bitLt") or (
        hasattr(module, "in_features") and hasattr(module, "out_features"))


def _lora_params(model: nn.Module, cfg: LoraConfig) -> int:
    """sum r*(d+k) over the layers `cfg` targets (every linear layer but the output head for 'all-linear')."""
    targets = cfg.target_modules
    total = 0
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        wanted = short in targets if isinstance(targets, list) else (
            targets == "all-linear" and short not in ("lm_head", "score", "classifier") or targets == short)
        if wanted and hasattr(module, "in_features"):
            total += cfg.r * (module.in_features + module.out_features)
    return total


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
    return ParamReport(trainable, total, wrapped, formula, _head_note(model))


def _head_note(model: nn.Module) -> str:
    """Our own word on a new classification head, instead of transformers' "MISSING ... consider training" table."""
    wrapper: Any = model
    base: Any = wrapper.get_base_model() if hasattr(wrapper, "get_base_model") else wrapper
    keys: list[str] = list(getattr(base, NEW_HEAD, None) or [])
    if not keys:
        return ""
    modules = sorted({k.rsplit(".", 1)[0] for k in keys})
    size = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    labels = list((getattr(base.config, "id2label", None) or {}).values())
    shown = ", ".join(map(str, labels[:6])) + (", ..." if len(labels) > 6 else "")
    trained = "trained in full next to the LoRA matrices and saved inside the adapter" if size else "NOT trained"
    return (f"classification head: {', '.join(modules)} is new ({len(labels)} labels: {shown}); the base checkpoint "
            f"has no such layer, so it starts from random weights and is {trained} ({size:,} parameters)")
