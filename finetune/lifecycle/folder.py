"""Read an adapter folder written by `finetune train`: its metadata (no torch needed) or base + adapter loaded.

Eval, merge, export, publish and the demo all load adapters through here, so they see the same base, tokenizer
and chat template that training used.
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


@dataclass
class AdapterInfo:
    folder: Path
    adapter_config: dict[str, Any]
    run: dict[str, Any] = field(default_factory=dict)  # run.json, {} when absent
    job: JobConfig | None = None  # finetune.yaml, None for adapters trained elsewhere

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def base(self) -> str:
        return str(self.adapter_config.get("base_model_name_or_path") or "")

    @property
    def task(self) -> str:
        if self.job is not None:
            return self.job.task
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
    """Metadata only: adapter_config.json, run.json and finetune.yaml. Fails clearly on a folder that is no adapter."""
    folder = Path(folder)
    recover(folder)  # an overwrite interrupted between its two renames
    if not folder.is_dir():
        raise FinetuneError(f"adapter folder not found: {folder.resolve()}")
    missing = [n for n in REQUIRED_FILES if not (folder / n).is_file()]
    if missing:
        raise FinetuneError(f"{folder}: not an adapter folder, missing {', '.join(missing)}")
    check_weights_file(folder / "adapter_model.safetensors")  # a truncated copy fails here, named, not in torch
    info = AdapterInfo(folder.resolve(), _json_object(folder / "adapter_config.json"))
    if (folder / "run.json").is_file():
        info.run = _json_object(folder / "run.json")
    if (folder / "finetune.yaml").is_file():
        info.job = load_config(folder / "finetune.yaml", check_files=False)  # data files need not exist any more
    return info


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
    """(PeftModel in eval mode, tokenizer saved with the adapter, info). The base loads unquantized unless asked."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    info = read_adapter(folder)
    source, model_cfg = base_source(info, base)
    check_adapter_fits(info, source, model_cfg)  # before any weight is loaded
    tok = AutoTokenizer.from_pretrained(str(info.folder))
    set_pad_token(tok)
    quantization = info.job.lora.quantization if (info.job is not None and quantized) else "none"
    labels = info.run.get("labels")
    model = load_base_model(source, model_cfg, info.task, quantization, labels)
    check_pair(model, tok, source, info.task)
    peft_model = PeftModel.from_pretrained(model, str(info.folder))
    peft_model.eval()
    return peft_model, tok, info
