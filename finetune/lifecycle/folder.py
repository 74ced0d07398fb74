"""Read an adapter folder written by `finetune train`: its metadata (no torch needed) or base + adapter loaded.

Eval, merge, export, publish and the demo all load adapters through here, so they see the same base, tokenizer
and chat template that training used. A folder trained with `lora.enabled: false` (full fine-tuning) holds a whole
model instead of an adapter; it is read and loaded through the same two functions (`AdapterInfo.full` tells which),
and `load_base` gives the base it started from, for comparisons.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config import JobConfig, load_config
from finetune.config.model import ModelConfig
from finetune.data.prompt_record import PROMPT_FILE, PromptRecord, describe_prompts
from finetune.errors import FinetuneError, ModelError
from finetune.files import recover
from finetune.lifecycle.fit import check_adapter_fits
from finetune.lifecycle.weights import check_weights_file
from finetune.model import Source, check_pair, load_base_model, resolve_source, set_pad_token

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
FULL_MODEL_FILES = ("config.json", "run.json")  # a whole model saved by full fine-tuning, with finetune's run record
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass
class AdapterInfo:
    """What read_adapter found in a folder, nothing loaded: adapter_config.json, run.json and finetune.yaml as read,
    and whether it holds a whole model from full fine-tuning."""

    folder: Path
    adapter_config: dict[str, Any]
    run: dict[str, Any] = field(default_factory=dict)  # run.json, {} when absent
    job: JobConfig | None = None  # finetune.yaml, None for adapters trained elsewhere
    full: bool = False  # a whole model from full fine-tuning (no adapter_config.json, adapter_config is {})

    @property
    def name(self) -> str:
        """The folder's name: how the demo, server and cards name the adapter."""
        return self.folder.name

    @property
    def base(self) -> str:
        """The base it was trained from: a hub id or an absolute folder ('' when unknown)."""
        recorded = self.adapter_config.get("base_model_name_or_path") or self.run.get("base_model_ref")
        return str(recorded or self.run.get("base_model") or "")

    @property
    def kind(self) -> str:
        """What the folder holds, in words: 'LoRA adapter' or 'fully fine-tuned model'."""
        return "fully fine-tuned model" if self.full else "LoRA adapter"

    @property
    def task(self) -> str:
        """causal_lm or classification: from finetune.yaml, else run.json (full fine-tuning) or peft's task_type."""
        if self.job is not None:
            return self.job.task
        if self.full:
            return str(self.run.get("task") or "causal_lm")
        return "classification" if self.adapter_config.get("task_type") == "SEQ_CLS" else "causal_lm"

    @property
    def chat(self) -> bool:
        """Whether prompts go through the chat template (as recorded at training time)."""
        return bool(self.run.get("data", {}).get("chat_template", False))

    @property
    def prompt(self) -> PromptRecord:
        """How training built prompts (prompt.json). Adapters saved before that record existed get what their
        finetune.yaml and data still tell: the system prompt and examples when the data files are here, else
        data.system_prompt, else nothing."""
        path = self.folder / PROMPT_FILE
        if path.is_file():
            return PromptRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
        if self.job is None:
            return PromptRecord(self.chat)
        try:
            return describe_prompts(self.job.data, self.chat)
        except (FinetuneError, OSError, ValueError):
            system = self.job.data.system_prompt
            return PromptRecord(self.chat, system, "data.system_prompt" if system else "none")


def read_adapter(folder: str | Path) -> AdapterInfo:
    """Metadata only: adapter_config.json (none for full fine-tuning), run.json and finetune.yaml. Fails clearly on a
    folder that is neither an adapter nor a model saved by `finetune train`."""
    folder = Path(folder)
    recover(folder)  # an overwrite interrupted between its two renames
    if not folder.is_dir():
        raise FinetuneError(f"adapter folder not found: {folder.resolve()}")
    if is_full_model(folder):
        info = AdapterInfo(folder.resolve(), {}, full=True)
    else:
        missing = [n for n in REQUIRED_FILES if not (folder / n).is_file()]
        if missing:
            raise FinetuneError(f"{folder}: not an adapter folder, missing {', '.join(missing)}; nor a model saved by "
                                "full fine-tuning (config.json, model.safetensors and finetune's run.json)")
        check_weights_file(folder / "adapter_model.safetensors")  # a truncated copy fails here, named, not in torch
        info = AdapterInfo(folder.resolve(), _json_object(folder / "adapter_config.json"))
    if (folder / "run.json").is_file():
        info.run = _json_object(folder / "run.json")
    if (folder / "finetune.yaml").is_file():
        # data files need not exist any more, and a job saved by an older finetune may hold retired keys
        info.job = load_config(folder / "finetune.yaml", check_files=False, saved=True)
    return info


def is_full_model(folder: Path) -> bool:
    """A whole model written by `finetune train` with lora.enabled: false (and no adapter beside it)."""
    return (not (folder / "adapter_config.json").is_file() and all((folder / n).is_file() for n in FULL_MODEL_FILES)
            and any((folder / n).is_file() for n in WEIGHT_FILES))


def require_adapter(info: AdapterInfo, what: str) -> None:
    """Refuse, with the reason, a command that only makes sense for a LoRA adapter (merge, export, check)."""
    if info.full:
        raise FinetuneError(f"{info.folder} is a fully fine-tuned model (lora.enabled: false), not a LoRA adapter: "
                            f"{what}. Load the folder directly with from_pretrained.")


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"{path}: not readable as JSON ({exc}); restore the file from the original adapter "
                            "folder") from None
    if not isinstance(value, dict):
        raise FinetuneError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def base_source(info: AdapterInfo, base: str | None = None) -> tuple[Source, Any]:
    """The base model of an adapter, by one rule for every command: `base` (--base) when given, else
    adapter_config.json's base_model_name_or_path (and revision), the same field `finetune check` reads and peft
    loads. finetune.yaml only says *how* to load it (dtype, attention kernel, trust_remote_code); the one
    exception is a GGUF base whose cached import was deleted: it is imported again from finetune.yaml's gguf_file."""
    ref = base or info.base
    if not ref:
        raise FinetuneError(f"{info.folder}/adapter_config.json records no base_model_name_or_path; pass --base "
                            "with the base model (a folder or a hub id)")
    settings = info.job.model if info.job is not None else ModelConfig(name_or_path=ref)
    revision = None if base else info.adapter_config.get("revision")
    model_cfg = settings.model_copy(update={"name_or_path": ref, "gguf_file": None, "revision": revision})
    if not base and settings.gguf_file and not Path(ref).is_dir():
        model_cfg = settings  # the cached import is gone; its source file may still be here
    try:
        return resolve_source(model_cfg), model_cfg
    except ModelError as exc:
        where = "--base" if base else f"base_model_name_or_path in {info.folder / 'adapter_config.json'}"
        raise ModelError(f"the base model of the adapter {info.folder.name} cannot be found ({where}: {ref}): "
                         f"{str(exc).removeprefix('model.name_or_path: ')}\n  Pass --base with the base model (a "
                         "local copy or a hub id in the local cache), or edit base_model_name_or_path in "
                         "adapter_config.json.") from None


def load_adapter(folder: str | Path, base: str | None = None, quantized: bool = False) -> tuple[Any, Any, AdapterInfo]:
    """(PeftModel in eval mode, tokenizer saved with the adapter, info). The base loads unquantized unless asked.
    A fully fine-tuned folder gives its own model instead (`base` is then ignored: the folder is the whole model)."""
    from peft import PeftModel

    info = read_adapter(folder)
    tok = _tokenizer(info)
    if info.full:
        return _load_full(info, tok), tok, info
    source, model_cfg = base_source(info, base)
    check_adapter_fits(info, source, model_cfg)  # before any weight is loaded
    quantization = info.job.lora.quantization if (info.job is not None and quantized) else "none"
    model = load_base_model(source, model_cfg, info.task, quantization, info.run.get("labels"))
    check_pair(model, tok, source, info.task)
    peft_model = PeftModel.from_pretrained(model, str(info.folder))
    peft_model.eval()
    return peft_model, tok, info


def load_base(info: AdapterInfo, tok: Any, base: str | None = None) -> Any:
    """The base model a fully fine-tuned folder started from (or `base`), in eval mode, for comparisons. A new
    classification head is initialised from torch's current seed, as training's was."""
    source, model_cfg = base_source(info, base)
    model = load_base_model(source, model_cfg, info.task, "none", info.run.get("labels"))
    check_pair(model, tok, source, info.task)
    return model.eval()


def _tokenizer(info: AdapterInfo) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(info.folder))
    set_pad_token(tok)
    return tok


def _load_full(info: AdapterInfo, tok: Any) -> Any:
    folder = str(info.folder)  # the whole model; the job's model settings (dtype, attention) still apply
    settings = info.job.model if info.job is not None else ModelConfig(name_or_path=folder)
    model_cfg = settings.model_copy(update={"name_or_path": folder, "gguf_file": None, "revision": None})
    model = load_base_model(Source(folder, folder), model_cfg, info.task, "none", info.run.get("labels"))
    check_pair(model, tok, Source(folder, folder), info.task)
    return model.eval()
