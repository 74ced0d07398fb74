"""Check, before any weight is loaded, that an adapter fits a base model: every module it adapts exists there with
the shapes it was trained on. The base is built on the meta device from its config, so this costs no memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from finetune.errors import ModelError
from finetune.model import Source


class AdapterInfo(Protocol):
    """What the check reads of an adapter folder (finetune.lifecycle.folder.AdapterInfo, which loads through here)."""

    folder: Path
    run: dict[str, Any]

    @property
    def base(self) -> str: ...

    @property
    def task(self) -> str: ...

PREFIX = "base_model.model."
LORA_PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "EA", ".lora_embedding_B": "EB"}


def check_adapter_fits(info: AdapterInfo, source: Source, model_cfg: Any) -> None:
    """Raise ModelError listing the adapter tensors that the base at `source` cannot take."""
    from safetensors import safe_open

    problems = _architecture_problems(info, source)
    base = _meta_model(source, model_cfg, info)
    modules = dict(base.named_modules())
    params = {n: tuple(p.shape) for n, p in base.named_parameters()}
    # One line per module: a missing module would otherwise be reported once per LoRA matrix (A and B).
    per_module: dict[str, list[str]] = {}
    with safe_open(str(info.folder / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
            problem = _tensor_problem(key, tuple(f.get_slice(key).get_shape()), modules, params)
            if problem:
                found = per_module.setdefault(problem[0], [])
                if problem[1] not in found:
                    found.append(problem[1])
    problems += [f"{module}: {'; '.join(details)}" for module, details in per_module.items()]
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ModelError(
            f"the adapter {info.folder} does not fit the base model {source.ref}:\n  {shown}\n"
            f"It was trained on {info.base or 'an unknown base'}; pass that model (or an exact copy) as --base."
        )


def _architecture_problems(info: AdapterInfo, source: Source) -> list[str]:
    """Compare the model type recorded with the adapter's own base (when that folder is still here) to the new one."""
    trained = Path(info.base) / "config.json"
    given = Path(source.folder) / "config.json"
    if not (trained.is_file() and given.is_file()):
        return []
    want, have = json.loads(trained.read_text()), json.loads(given.read_text())
    out = []
    for key in ("model_type", "architectures"):
        if key in want and want.get(key) != have.get(key):
            out.append(f"{key}: the adapter was trained on {want[key]!r}, the given base is {have.get(key)!r}")
    return out


def _meta_model(source: Source, model_cfg: Any, info: AdapterInfo) -> Any:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(source.folder, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the model config of {source.ref}: {exc}") from None
    with init_empty_weights():
        if info.task == "classification":
            config.num_labels = len(info.run.get("labels") or ["0", "1"])
            return AutoModelForSequenceClassification.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)


def _tensor_problem(key: str, shape: tuple[int, ...], modules: dict[str, Any],
                    params: dict[str, tuple[int, ...]]) -> tuple[str, str] | None:
    """(module or parameter name, what is wrong) for one adapter tensor, or None when the base can take it."""
    name = key.removeprefix(PREFIX)
    part = next((p for p in LORA_PARTS if name.endswith(p)), None)
    if part is None and ".lora_" in name:  # e.g. DoRA's magnitude vector: its module must exist
        module_name = name.rsplit(".lora_", 1)[0]
        return None if module_name in modules else (module_name, "the base has no module of that name")
    if part is None:  # a full tensor saved with the adapter (modules_to_save, e.g. a classifier head)
        if name not in params:
            return name, "no such parameter in the base"
        return None if params[name] == shape else (name, f"adapter has {list(shape)}, base has {list(params[name])}")
    module_name = name[: -len(part)]
    module = modules.get(module_name)
    if module is None:
        return module_name, "the adapter adapts this module, the base has no module of that name"
    fan_in, fan_out = _fans(module)
    kind = LORA_PARTS[part]
    want = {"A": fan_in, "B": fan_out, "EA": fan_in, "EB": fan_out}[kind]
    got = shape[1] if kind in ("A", "EA") else shape[0]
    if got != want:
        side = "input" if kind in ("A", "EA") else "output"
        return module_name, f"the adapter expects {side} size {got}, the base module has {want}"
    return None


def _fans(module: Any) -> tuple[int, int]:
    """(input size, output size) of a Linear, Embedding or GPT-2 style Conv1D module."""
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    if hasattr(module, "num_embeddings"):
        return module.num_embeddings, module.embedding_dim
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)  # type: ignore[return-value]  # Conv1D stores (in, out)
    shape = tuple(module.weight.shape)
    return shape[1], shape[0]
