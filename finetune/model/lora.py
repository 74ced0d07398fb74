"""Wrap the base model with a peft LoRA adapter and report what is trained."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.config.lora import LoraConfig
from finetune.errors import ModelError

if TYPE_CHECKING:
    from torch import nn


NEW_HEAD = "finetune_new_head"  # set by model.loading on a classifier whose head the checkpoint did not have


@dataclass(frozen=True)
class ParamReport:
    """What training will update: trainable and total parameters, the LoRA-wrapped linear layers and their sum of
    r*(d+k), and a note on a newly added classification head."""

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


def wrap_lora(model: nn.Module, cfg: LoraConfig, task: str = "causal_lm", start: str | Path | None = None) -> nn.Module:
    """peft LoRA on the frozen base; QLoRA bases get peft's k-bit preparation (fp32 norms, input grads). `start`: an
    adapter folder whose weights the training continues from (already checked to fit the base; see
    `lora_of_adapter` for its settings)."""
    if not cfg.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if start is not None:
        return _continue_from(model, Path(start))
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
    """The ParamReport of `model`, counted from its parameters and its LoRA layers (none under full fine-tuning)."""
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


# our lora: field -> peft's adapter_config.json key
LORA_KEYS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
             "use_rslora": "use_rslora", "use_dora": "use_dora", "modules_to_save": "modules_to_save"}
PEFT_TASKS = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS"}


def lora_of_adapter(folder: str | Path, cfg: LoraConfig, task: str = "causal_lm") -> LoraConfig:
    """The LoRA settings of the adapter training continues from (model.adapter), with the job's quantization. A
    setting the job states explicitly must agree with the adapter's: the weights cannot change shape or meaning."""
    folder = Path(folder)
    saved = _adapter_config(folder)
    if saved.get("peft_type") != "LORA":
        raise ModelError(f"model.adapter: {folder} is a {saved.get('peft_type')} adapter; only LoRA adapters can be continued")
    if saved.get("task_type") not in (None, PEFT_TASKS[task]):
        raise ModelError(f"model.adapter: {folder} was trained for {saved.get('task_type')}, this job's task is {task}")
    if not cfg.enabled:
        raise ModelError("model.adapter continues a LoRA adapter, but lora.enabled is false (full fine-tuning); remove one")
    values = {ours: _normal(ours, saved.get(theirs)) for ours, theirs in LORA_KEYS.items()}
    conflicts = [f"lora.{k}: the job sets {getattr(cfg, k)!r}, the adapter has {values[k]!r}"
                 for k in LORA_KEYS if k in cfg.model_fields_set and not _agrees(k, getattr(cfg, k), values[k], folder)]
    if conflicts:
        raise ModelError(f"model.adapter: {folder} was trained with other LoRA settings than the job's lora: section:\n  "
                         + "\n  ".join(conflicts) + "\nThe adapter's settings are reused when training continues: "
                         "remove these keys from lora: (or start a new adapter without model.adapter).")
    return cfg.model_copy(update=values)


def _adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise ModelError(f"model.adapter: {folder.resolve()} is not an adapter folder (no adapter_config.json)")
    return dict(json.loads(path.read_text(encoding="utf-8")))


def _normal(key: str, value: Any) -> Any:
    if key == "modules_to_save":
        return sorted(value or [])
    if key == "target_modules" and isinstance(value, list):
        return sorted(value)
    if key == "alpha":
        return float(value)
    return bool(value) if key in ("use_rslora", "use_dora") else value


def _agrees(key: str, given: Any, saved: Any, folder: Path) -> bool:
    if key == "target_modules" and isinstance(given, str) and isinstance(saved, list):
        # peft saves "all-linear" expanded to module names: compare with what the adapter's own job asked for
        return given == _job_targets(folder)
    return bool(_normal(key, given) == saved)


def _job_targets(folder: Path) -> Any:
    import yaml

    job = folder / "finetune.yaml"
    if not job.is_file():
        return None
    return ((yaml.safe_load(job.read_text(encoding="utf-8")) or {}).get("lora") or {}).get("target_modules")


def _continue_from(model: nn.Module, folder: Path) -> nn.Module:
    """The adapter's weights, trainable; every tensor in its file must have found its place in the model."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    loaded = set(get_peft_model_state_dict(peft_model))
    if saved != loaded:
        missing = sorted(saved ^ loaded)
        raise ModelError(f"model.adapter: {folder} did not load whole into the model ({len(missing)} tensors differ, "
                         f"e.g. {missing[:3]})")
    return peft_model


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
